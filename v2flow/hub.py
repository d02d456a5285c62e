"""Where pretrained directories come from and how their files are read, with errors that say what to do.

A pretrained name is a local directory, or a Hugging Face Hub repository id (``owner/name``) that
``huggingface_hub.snapshot_download`` fetches or finds in the local hub cache (with ``HF_HUB_OFFLINE=1`` only
the cache is read). Every saved model is written through :func:`staged_directory`, so a save is atomic and
never deletes a directory that is not a saved model of the same kind. Only the ground module ``utils``
is imported from the package.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .utils import replace_dir

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


# ---------------------------------------------------------------------------- atomic writes


@contextmanager
def staged_directory(path: str | os.PathLike, marker: str, overwrite: bool = True) -> Iterator[Path]:
    """The one way a model directory is written: into a temporary sibling of `path` that replaces `path` only
    once the block has written everything (on an error it is removed and `path` is untouched).

    An existing non-empty `path` is replaced only when it holds `marker` (the file that makes it a saved model
    of this kind, e.g. ``config.json``) and `overwrite` is true: a directory of other files is never deleted.
    Files get the permissions of ordinary new files (safetensors writes 0600).
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} is a file; give a directory to save into")
        names = {p.name for p in path.iterdir()}
        if names and marker not in names:
            raise FileExistsError(
                f"{path} holds files but no {marker}, so it is not a directory this model wrote; refusing to "
                "replace it: choose a new or empty directory"
            )
        if names and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True or choose a new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    replace_dir(staged, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staged.write_text(text)
    return staged.replace(path)


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors (contiguous CPU tensors, pt format metadata)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def load_state_checked(path: Path, expected: dict[str, torch.Tensor], map_location="cpu") -> dict[str, torch.Tensor]:
    """The tensors of `path`, checked against a freshly built model's ``state_dict()``: every key present, no
    extra key, every shape equal; a ValueError names the file and what differs."""
    state = load_weights(path)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{path.name}: {key} has shape {tuple(value.shape)}, the config expects {tuple(expected[key].shape)}"
            )
    return {k: v.to(map_location) for k, v in state.items()}
