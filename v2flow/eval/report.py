"""Where benchmark results go: JSON files merged by key, and sections of a markdown report (``BENCHMARKS.md``)
replaced in place, so each benchmark rewrites only its own part of the report. Both are written under a
temporary name and renamed: an interrupted run never leaves a half-written file."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..hub import write_text_atomic


def device_name(device: str | torch.device) -> str:
    """The machine a measurement ran on, in words: the GPU's name, or the CPU's cores and torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}, {torch.get_num_threads()} torch threads)"


def replace_section(path: str | Path, key: str, section: str) -> Path:
    """Replace the text between ``<!-- {key}:start -->`` and ``<!-- {key}:end -->`` in the markdown file
    `path` with `section`, or append the marked section when the file (or the section) is not there yet."""
    path = Path(path)
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{section.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text and text.index(start) < text.index(end):
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    return write_text_atomic(path, text)


def merge_json(path: str | Path, key: str, entry: Any) -> Path:
    """Set ``data[key] = entry`` in the JSON object stored at `path` (other keys are kept)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = entry
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")
