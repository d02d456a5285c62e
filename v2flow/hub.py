"""Where pretrained directories come from and how their files are read, with errors that say what to do.

A pretrained name is a local directory, or a Hugging Face Hub repository id (``owner/name``) that
``huggingface_hub.snapshot_download`` fetches or finds in the local hub cache (with ``HF_HUB_OFFLINE=1`` only
the cache is read). Nothing here imports from the package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VOCAB_NAME = "vocab.json"
AUTOENCODER_DIR = "autoencoder"


def resolve_pretrained(path: str | os.PathLike, what: str, required: tuple[str, ...]) -> Path:
    """The local directory of a pretrained `what` (e.g. "tokenizer") holding every file in `required`.

    Raises:
        FileNotFoundError: no such local directory and no such hub repository (or no network and no cached
            copy), or a required file is missing.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        text = str(path)
        looks_local = text.startswith((".", "/", "~")) or directory.suffix or text.count("/") != 1
        if directory.exists():
            raise FileNotFoundError(f"{path} is a file; a pretrained {what} is a directory holding {list(required)}")
        if looks_local:
            raise FileNotFoundError(f"no pretrained {what} directory at {path}")
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(text))
        except Exception as err:  # network, missing repository, offline mode: one message with the way out
            raise FileNotFoundError(
                f"{path} is not a local directory, and fetching it as a Hugging Face Hub repository failed "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Give the local directory written by "
                "save_pretrained / `v2flow export`; hub ids load only with network access or from the local hub "
                "cache (HF_HUB_OFFLINE=1 reads the cache only)"
            ) from err
    for name in required:
        if not (directory / name).exists():
            raise FileNotFoundError(
                f"{directory} has no {name}; a pretrained {what} directory holds {', '.join(required)} "
                "(write one with save_pretrained or `v2flow export`)"
            )
    return directory


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a ValueError naming the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged: re-export the directory") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a ValueError naming the file when it is truncated or corrupt."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError (no path, no fix)
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt, e.g. by an "
            "interrupted copy or download; copy or export the directory again"
        ) from err
