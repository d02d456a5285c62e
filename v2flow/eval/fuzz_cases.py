"""Bad-input fuzzing: generated cases over image tensors, id tensors and image files, and the rule they are judged by.

The rule: every case either works, with outputs of the right shape, dtype and range, or raises the package's own
clear error, a ValueError / TypeError / FileNotFoundError raised by code inside ``v2flow`` with a message that
names the problem. Outcomes:

- ``ok``: it worked and the output met the contract;
- ``clear_error``: it raised such an error;
- ``crash``: any other exception, or one raised from inside torch, Pillow or numpy rather than by ``v2flow``;
- ``wrong``: a silent wrong answer: an output that breaks the contract, bad input accepted, or good input refused.

Each kind of case has a space of choices (``image_tensor_space``, ``id_tensor_space``, ``image_file_space``: a dict
of field -> choices, the valid choice first). ``tests/test_fuzz.py`` lets hypothesis draw from those spaces (and
shrink failures towards the valid choices); the ``*_cases`` generators and :func:`sweep` draw from the same spaces
with a seeded ``random.Random`` and count the outcomes (``python benchmarks/fuzz_cases.py``,
``python benchmarks/reliability.py``).

An error raised by this module itself (a broken case, not the code under test) never counts as the package's
clear error.
"""

from __future__ import annotations

import contextlib
import io
import random
import struct
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, features

from ..checks import RANGE_TOLERANCE
from ..images import load_image
from ..tokenizer import V2FlowTokenizer

THIS_FILE = Path(__file__).resolve()
PACKAGE_DIR = THIS_FILE.parents[1]  # v2flow/
CLEAR_ERRORS = (ValueError, TypeError, FileNotFoundError)
MIN_MESSAGE_CHARS = 20  # a message shorter than this cannot name both the problem and the fix
OUTCOMES = ("ok", "clear_error", "crash", "wrong")
FAST_DECODE = {"num_steps": 1, "num_iters": 1, "solver": "euler"}  # outcomes do not depend on decode quality
# fields whose every choice is a legitimate variation (drawn freely); the others are drawn valid or faulty
FREE_FIELDS = frozenset({"verb", "layout", "autocast", "allow_truncation", "kind", "file_width", "file_height", "seed"})
MAX_CHANGES = 3  # faulty fields in one case at most


class WrongAnswer(AssertionError):
    """The call returned, but its output breaks the contract."""


class Case(NamedTuple):
    """One generated input: `call` runs it and checks the output (raising :class:`WrongAnswer` when it is wrong);
    `expected` is ``"ok"``, ``"error"`` or None (either is right, e.g. a file cut in its trailer still loads)."""

    description: str
    call: Callable[[], object]
    expected: str | None


# ---------------------------------------------------------------------------- the outcome rule


def raised_by_package(err: BaseException) -> bool:
    """Whether the frame that raised `err` (the traceback's last) is a file of the ``v2flow`` package other than
    this one."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    where = Path(frames[-1].filename).resolve()
    return where.is_relative_to(PACKAGE_DIR) and where != THIS_FILE


def is_clear_error(err: BaseException) -> bool:
    """A ValueError / TypeError / FileNotFoundError raised inside ``v2flow`` with a non-trivial message."""
    return isinstance(err, CLEAR_ERRORS) and raised_by_package(err) and len(str(err).strip()) >= MIN_MESSAGE_CHARS


def run_case(call: Callable[[], object], expected: str | None = None) -> tuple[str, str]:
    """Run `call` and return (outcome, detail): the outcome as in the module docstring, the detail a line that
    says what happened (the exception, where it was raised)."""
    try:
        call()
    except WrongAnswer as err:
        return "wrong", f"bad output: {err}"
    except Exception as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{type(err).__name__} at {Path(frame.filename).name}:{frame.lineno}: {str(err)[:300]}"
        if not is_clear_error(err):
            return "crash", where
        if expected == "ok":
            return "wrong", f"valid input refused: {where}"
        return "clear_error", where
    if expected == "error":
        return "wrong", "bad input accepted silently"
    return "ok", ""


def classify(call: Callable[[], object], expected: str | None = None) -> str:
    """The outcome of `call`: ``"ok"``, ``"clear_error"``, ``"crash"`` or ``"wrong"``."""
    return run_case(call, expected)[0]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise WrongAnswer(message)


def _check_images(images: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    _expect(tuple(images.shape) == shape, f"images have shape {tuple(images.shape)}, expected {shape}")
    _expect(images.dtype == dtype, f"images are {images.dtype}, expected {dtype}")
    _expect(images.device == device, f"images are on {images.device}, expected {device}")
    _expect(bool(torch.isfinite(images).all()), "images hold NaN or inf")
    _expect(images.numel() == 0 or -1 <= float(images.min()) <= float(images.max()) <= 1, "images outside [-1, 1]")


def _valid_ids(tokenizer: V2FlowTokenizer) -> list[int]:
    if tokenizer.config["quantizer"] == "vq":
        return list(range(tokenizer.resampler.num_codes))
    return tokenizer.vocabulary.token_ids.tolist()


def _check_ids(tokenizer: V2FlowTokenizer, ids: torch.Tensor, batch: int) -> None:
    n = tokenizer.config["num_tokens"]
    _expect(tuple(ids.shape) == (batch, n), f"ids have shape {tuple(ids.shape)}, expected {(batch, n)}")
    _expect(ids.dtype == torch.long, f"ids are {ids.dtype}, expected torch.int64")
    _expect(set(ids.flatten().tolist()) <= set(_valid_ids(tokenizer)), "ids outside the tokenizer's vocabulary")


def _weight(tokenizer: V2FlowTokenizer) -> torch.Tensor:
    return next(tokenizer.encoder.parameters())


def _one_of(*choices):
    """The choices in order, without repeats (sizes derived from a config may coincide)."""
    return tuple(dict.fromkeys(choices))


def draw(space: dict[str, tuple], rng: random.Random) -> dict:
    """One choice per field of `space`: free fields from all their choices, and up to `MAX_CHANGES` of the others
    away from their valid (first) choice, so that valid inputs, single faults and combinations all occur."""
    fields = [field for field, choices in space.items() if field not in FREE_FIELDS and len(choices) > 1]
    changed = set(rng.sample(fields, rng.randint(0, min(MAX_CHANGES, len(fields)))))
    return {
        field: rng.choice(choices if field in FREE_FIELDS else choices[1:] if field in changed else choices[:1])
        for field, choices in space.items()
    }


def one_at_a_time(space: dict[str, tuple]) -> Iterator[dict]:
    """Every choice of every field once, the other fields at their first (valid) choice; seeds stay at 0."""
    base = {field: choices[0] for field, choices in space.items()}
    yield base
    for field, choices in space.items():
        if field == "seed":
            continue
        for choice in choices[1:]:
            yield {**base, field: choice}


# ---------------------------------------------------------------------------- image tensors


def image_tensor_space(tokenizer: V2FlowTokenizer) -> dict[str, tuple]:
    """Choices for images given to ``encode`` / ``reconstruct`` (the valid choice first)."""
    c, s = tokenizer.config["in_channels"], tokenizer.config["image_size"]
    return {
        "verb": ("encode", "reconstruct"),
        "rank": (4, 3, 5, 2, 1, 0),
        "dtype": (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool),
        "batch": (2, 1, 3, 0),
        "channels": _one_of(c, c + 1, 1, 3, 0),
        "height": _one_of(s, s + 1, s // 2, 1, 0),
        "width": _one_of(s, s - 1, 2 * s),
        "values": (
            "in_range",
            "bounds",
            "zeros",
            "within_tolerance",
            "slightly_out",
            "far_out",
            "pixel_range",
            "nan",
            "inf",
            "neg_inf",
        ),
        "layout": ("contiguous", "channels_last", "non_contiguous", "expanded"),
        "device": ("same", "meta"),
        "autocast": (False, True),
        "seed": range(1000),
    }


def _image_values(shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    flat = x.view(-1)
    one = int(torch.randint(max(flat.numel(), 1), (), generator=g))  # the element a single bad value goes to
    single = {"within_tolerance": 1 + RANGE_TOLERANCE / 2, "slightly_out": 1 + 10 * RANGE_TOLERANCE}
    single.update({"nan": float("nan"), "inf": float("inf"), "neg_inf": float("-inf")})
    if kind in single and flat.numel():
        flat[one] = single[kind]
    elif kind == "bounds":
        x = torch.where(x < 0, -1.0, 1.0).to(torch.float64)
    elif kind == "zeros":
        x.zero_()
    elif kind == "far_out":
        x = x * 50
    elif kind == "pixel_range":
        x = (x + 1) * 127.5
    return x


def image_tensor_case(tokenizer: V2FlowTokenizer, choices: dict) -> Case:
    """The case for one choice of each field of :func:`image_tensor_space`."""
    cfg = tokenizer.config
    weight = _weight(tokenizer)
    b, rank, dtype = choices["batch"], choices["rank"], choices["dtype"]
    full = (b, choices["channels"], choices["height"], choices["width"])
    shape = (b, 1, *full[1:]) if rank == 5 else full[4 - rank :]
    x = _image_values(shape, choices["values"], choices["seed"]).to(dtype)
    layout = choices["layout"]
    if layout == "channels_last" and rank == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous" and rank >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "expanded" and rank >= 1 and shape[0] >= 1:
        x = x[:1].expand(shape)
    values = x.double()
    valid = (
        rank == 4
        and dtype == weight.dtype
        and choices["device"] == "same"
        and tuple(shape[1:]) == (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
        and b >= 1
        and bool(torch.isfinite(values).all())
        and -1 - RANGE_TOLERANCE <= float(values.min()) <= float(values.max()) <= 1 + RANGE_TOLERANCE
    )
    x = x.to(weight.device if choices["device"] == "same" else torch.device(choices["device"]))
    verb = choices["verb"]

    def call() -> None:
        ctx = (
            torch.autocast(weight.device.type, dtype=torch.bfloat16)
            if choices["autocast"]
            else contextlib.nullcontext()
        )
        with ctx:
            out = tokenizer.encode(x) if verb == "encode" else tokenizer.reconstruct(x, **FAST_DECODE)
        _check_ids(tokenizer, out.ids, b)
        if verb == "encode":
            emb = out.soft_embeddings
            _expect(tuple(emb.shape[:2]) == (b, cfg["num_tokens"]), f"soft_embeddings {tuple(emb.shape)}")
            _expect(emb.is_floating_point() and bool(torch.isfinite(emb).all()), "soft_embeddings not finite floats")
            _expect(torch.equal(out.ids, tokenizer._indices_to_ids(out.indices)), "ids do not match their indices")
        else:
            _check_images(
                out.images, (b, cfg["in_channels"], cfg["image_size"], cfg["image_size"]), weight.dtype, weight.device
            )

    text = ", ".join(
        f"{k}={v}" for k, v in choices.items() if k not in ("rank", "batch", "channels", "height", "width")
    )
    return Case(f"{verb} images {tuple(shape)}: {text}", call, "ok" if valid else "error")


def image_tensor_cases(tokenizer: V2FlowTokenizer, n: int, seed: int) -> Iterator[Case]:
    """`n` image-tensor cases drawn from :func:`image_tensor_space` with ``random.Random(seed)``."""
    rng, space = random.Random(seed), image_tensor_space(tokenizer)
    for _ in range(n):
        yield image_tensor_case(tokenizer, draw(space, rng))


# ---------------------------------------------------------------------------- id tensors


def id_tensor_space(tokenizer: V2FlowTokenizer) -> dict[str, tuple]:
    """Choices for ids given to ``decode`` (the valid choice first)."""
    n = tokenizer.config["num_tokens"]
    return {
        "container": ("tensor", "list", "numpy"),
        "dtype": (
            torch.int64,
            torch.int32,
            torch.int16,
            torch.uint8,
            torch.uint64,
            torch.float32,
            torch.float64,
            torch.bool,
            torch.complex64,
        ),
        "rank": (2, 1, 3, 0),
        "batch": (2, 1, 3, 0),
        "length": _one_of(n, max(n - 1, 1), 1, 0, n + 1, 2 * n),
        "values": ("valid", "zeros", "outside_subset", "negative", "vocab_size", "huge", "all_negative"),
        "allow_truncation": (False, True),
        "device": ("same", "meta"),
        "seed": range(1000),
    }


def _id_values(tokenizer: V2FlowTokenizer, shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    valid = _valid_ids(tokenizer)
    vq = tokenizer.config["quantizer"] == "vq"
    size = tokenizer.resampler.num_codes if vq else tokenizer.vocabulary.llm_vocab_size
    outside = sorted(set(range(size)) - set(valid)) or [size]  # LLM ids outside the visual subset
    count = int(np.prod(shape))
    values = [rng.choice(valid) for _ in range(count)]
    bad = {
        "outside_subset": rng.choice(outside),
        "negative": -1 - rng.randrange(100),
        "vocab_size": size,
        "huge": 2**40 + rng.randrange(2**20),
    }
    if kind in bad and count:
        values[rng.randrange(count)] = bad[kind]
    elif kind == "zeros":
        values = [0] * count
    elif kind == "all_negative":
        values = [-1] * count
    return torch.tensor(values, dtype=torch.long).reshape(shape)


def id_tensor_case(tokenizer: V2FlowTokenizer, choices: dict) -> Case:
    """The case for one choice of each field of :func:`id_tensor_space`."""
    cfg = tokenizer.config
    weight = _weight(tokenizer)
    n, b, length, rank = cfg["num_tokens"], choices["batch"], choices["length"], choices["rank"]
    shape = {0: (), 1: (length,), 2: (b, length), 3: (b, length, 1)}[rank]
    x = _id_values(tokenizer, shape, choices["values"], choices["seed"]).to(choices["dtype"])
    integer = not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
    prefix_ok = length == n or cfg["token_order"] == "ordered" or choices["allow_truncation"]
    valid = (
        choices["container"] == "tensor"
        and choices["device"] == "same"
        and integer
        and rank == 2
        and b >= 1
        and 1 <= length <= n
        and prefix_ok
        and set(x.flatten().tolist()) <= set(_valid_ids(tokenizer))
    )
    if choices["container"] == "list":
        given = x.tolist()
    elif choices["container"] == "numpy":
        given = x.numpy()
    else:
        given = x.to("meta") if choices["device"] == "meta" else x

    def call() -> None:
        out = tokenizer.decode(given, allow_truncation=choices["allow_truncation"], **FAST_DECODE)
        _check_images(
            out.images, (b, cfg["in_channels"], cfg["image_size"], cfg["image_size"]), weight.dtype, weight.device
        )

    text = ", ".join(f"{k}={v}" for k, v in choices.items() if k not in ("rank", "batch", "length"))
    name = f"{cfg['quantizer']}/{cfg['token_order']}"
    return Case(f"decode ({name}) ids {tuple(shape)}: {text}", call, "ok" if valid else "error")


def id_tensor_cases(tokenizer: V2FlowTokenizer, n: int, seed: int) -> Iterator[Case]:
    """`n` id-tensor cases drawn from :func:`id_tensor_space` with ``random.Random(seed)``."""
    rng, space = random.Random(seed), id_tensor_space(tokenizer)
    for _ in range(n):
        yield id_tensor_case(tokenizer, draw(space, rng))


# ---------------------------------------------------------------------------- image files

FILE_KINDS = (
    "png_RGB",
    "png_L",
    "png_RGBA",
    "png_LA",
    "png_P",
    "png_P_transparency",
    "png_1bit",
    "png_I16",
    "tiff_I32",
    "tiff_I32_wide",
    "tiff_F",
    "jpeg_RGB",
    "jpeg_L",
    "jpeg_CMYK",
    "bmp_RGB",
    "gif_P",
    "webp_RGB",
    "png_named_jpg",
    "jpeg_named_png",
    "text_named_png",
    "zero_bytes",
    "truncated_png",
    "truncated_jpeg",
    "huge_png_header",
    "missing",
    "directory",
)
REFUSED_KINDS = ("tiff_I32_wide", "tiff_F", "text_named_png", "zero_bytes", "huge_png_header", "missing", "directory")


def image_file_space() -> dict[str, tuple]:
    """Choices for files given to ``v2flow.data.load_image(path, channels, size)`` (the valid choice first)."""
    return {
        "kind": FILE_KINDS,
        "file_width": (13, 8, 1, 40),
        "file_height": (9, 8, 1, 31),
        "channels": (3, 1, 2, 4, 0),
        "size": (None, 8, 5, 1, 0, -2),
        "seed": range(1000),
    }


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def huge_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side 8-bit gray pixels (the data never comes): a decompression bomb."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _file_bytes(kind: str, width: int, height: int, seed: int) -> tuple[bytes, np.ndarray | None]:
    """The file content of `kind` and, for lossless kinds, the pixels (H, W) or (H, W, 3) that a loader must give."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
    if kind in ("png_RGB", "png_named_jpg"):
        return _encoded(Image.fromarray(rgb), "PNG"), rgb
    if kind == "bmp_RGB":
        return _encoded(Image.fromarray(rgb), "BMP"), rgb
    if kind == "png_L":
        return _encoded(Image.fromarray(gray), "PNG"), gray
    if kind == "png_RGBA":
        return _encoded(Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8)), "PNG"), None
    if kind == "png_LA":
        return _encoded(Image.fromarray(rng.integers(0, 256, (height, width, 2), dtype=np.uint8)), "PNG"), None
    if kind in ("png_P", "gif_P"):
        return _encoded(Image.fromarray(rgb).convert("P"), "PNG" if kind == "png_P" else "GIF"), None
    if kind == "png_P_transparency":
        return _encoded(Image.fromarray(rgb).convert("P"), "PNG", transparency=0), None
    if kind == "png_1bit":
        return _encoded(Image.fromarray(gray > 127), "PNG"), None
    if kind in ("png_I16", "tiff_I32"):
        values = rng.integers(0, 65536, (height, width))
        img = Image.fromarray(values.astype(np.uint16 if kind == "png_I16" else np.int32))
        return _encoded(img, "PNG" if kind == "png_I16" else "TIFF"), np.rint(values * (255 / 65535)).astype(np.uint8)
    if kind == "tiff_I32_wide":
        return _encoded(Image.fromarray(rng.integers(-70_000, 70_000, (height, width)).astype(np.int32)), "TIFF"), None
    if kind == "tiff_F":
        return _encoded(Image.fromarray(rng.random((height, width), dtype=np.float32)), "TIFF"), None
    if kind in ("jpeg_RGB", "jpeg_named_png"):
        return _encoded(Image.fromarray(rgb), "JPEG"), None
    if kind == "jpeg_L":
        return _encoded(Image.fromarray(gray), "JPEG"), None
    if kind == "jpeg_CMYK":
        return _encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"), None
    if kind == "webp_RGB":  # a build of Pillow without WebP writes a PNG under the .webp name instead
        return _encoded(Image.fromarray(rgb), "WEBP" if features.check("webp") else "PNG", lossless=True), rgb
    if kind == "text_named_png":
        return b"this is not an image, just text in a .png file\n", None
    if kind == "zero_bytes":
        return b"", None
    if kind in ("truncated_png", "truncated_jpeg"):
        full = _encoded(Image.fromarray(rgb), "PNG" if kind == "truncated_png" else "JPEG")
        return full[: random.Random(seed).randrange(1, len(full))], None
    if kind == "huge_png_header":
        return huge_png(), None
    raise ValueError(f"unknown file kind {kind!r}")


SUFFIXES = {"png_named_jpg": ".jpg", "jpeg_named_png": ".png", "text_named_png": ".png", "zero_bytes": ".png"}
SUFFIXES.update({"truncated_png": ".png", "truncated_jpeg": ".jpg", "huge_png_header": ".png", "missing": ".png"})


def image_file_case(tmp_dir: str | Path, choices: dict) -> Case:
    """The case for one choice of each field of :func:`image_file_space`; the file is written under `tmp_dir`."""
    kind, w, h, channels, size = (choices[k] for k in ("kind", "file_width", "file_height", "channels", "size"))
    tmp_dir = Path(tmp_dir)
    reference = None
    if kind == "directory":
        path = tmp_dir / "a_folder.png"
        path.mkdir(parents=True, exist_ok=True)
    else:
        suffix = SUFFIXES.get(kind, "." + kind.split("_")[0].replace("jpeg", "jpg"))
        path = tmp_dir / f"{kind}_{w}x{h}_{choices['seed']}{suffix}"
        if path.is_dir():
            path.rmdir()
        path.unlink(missing_ok=True)
        if kind != "missing":
            data, reference = _file_bytes(kind, w, h, choices["seed"])
            path.write_bytes(data)
    bad_args = channels not in (1, 3) or (size is not None and size < 1)
    expected = "error" if bad_args or kind in REFUSED_KINDS else None if kind.startswith("truncated") else "ok"

    def call() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about palette transparency; the outcome is what counts
            image = load_image(path, channels, size)
        side = (size, size) if size is not None else (h, w)
        _check_images(image, (channels, *side), torch.float32, torch.device("cpu"))
        if reference is not None and size is None:
            want = reference if reference.ndim == 2 or channels == 3 else None
            if reference.ndim == 2 and channels == 3:
                want = np.repeat(reference[..., None], 3, axis=-1)  # gray to RGB repeats the channel
            if want is not None:
                want = torch.from_numpy(want.astype(np.float32) / 127.5 - 1.0)
                want = want[None] if want.ndim == 2 else want.permute(2, 0, 1)
                _expect(torch.allclose(image, want, atol=1e-6), "pixels differ from the file's")

    text = f"{kind} {w}x{h}, channels={channels}, size={size}, seed={choices['seed']}"
    return Case(f"load_image {path.name}: {text}", call, expected)


def image_file_cases(tmp_dir: str | Path, n: int, seed: int) -> Iterator[Case]:
    """`n` image-file cases drawn from :func:`image_file_space` with ``random.Random(seed)``."""
    rng, space = random.Random(seed), image_file_space()
    for _ in range(n):
        yield image_file_case(tmp_dir, draw(space, rng))


# ---------------------------------------------------------------------------- the sweep


def sweep(tokenizer: V2FlowTokenizer, n: int, seed: int, tmp_dir: str | Path) -> dict:
    """Run `n` seeded cases of each kind; return counts per kind and outcome, and the cases that failed the rule."""
    kinds = {
        "image_tensor": image_tensor_cases(tokenizer, n, seed),
        "id_tensor": id_tensor_cases(tokenizer, n, seed),
        "image_file": image_file_cases(tmp_dir, n, seed),
    }
    result: dict = {"counts": {}, "failures": []}
    for kind, cases in kinds.items():
        counts = dict.fromkeys(OUTCOMES, 0)
        for case in cases:
            outcome, detail = run_case(case.call, case.expected)
            counts[outcome] += 1
            if outcome in ("crash", "wrong"):
                result["failures"].append(
                    {"kind": kind, "outcome": outcome, "case": case.description, "detail": detail}
                )
        result["counts"][kind] = counts
    return result
