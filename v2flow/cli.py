"""The ``v2flow`` command.

* ``v2flow fit|validate|test --config configs/mnist.yaml``: the Lightning CLI (YAML configs with OmegaConf
  interpolation, ``--print_config``, ``--ckpt_path`` to resume).
* ``v2flow lm fit|validate --config configs/lm_mnist.yaml``: fine-tune a causal LLM to write images.
* ``v2flow classifier fit|validate|test --config configs/classifier_mnist.yaml``: train the MNIST judge.
* ``v2flow vq fit|validate|test --config configs/vq_mnist_16.yaml``: train the diffusers VQModel baseline.
* ``v2flow export``: a Lightning checkpoint -> a pretrained directory (config.json + model.safetensors).
* ``v2flow encode``: image files -> token ids (JSON or .pt, with the LLM token strings beside them).
* ``v2flow decode``: token ids -> PNG images.
* ``v2flow reconstruct``: image files -> ids -> images, plus a comparison grid and PSNR/SSIM.
* ``v2flow evaluate``: a data set (MNIST, held-out photo crops, a folder) -> PSNR, SSIM, MS-SSIM, FD/KID and
  vocabulary statistics, as JSON and a markdown table row.
* ``v2flow cache-latents``: an image folder -> sharded autoencoder latents (resumable), to train from.

Several devices and nodes (DDP; every rank reads its own shard of each epoch's shuffled order):

* one node: ``v2flow fit --config c.yaml --trainer.strategy=ddp --trainer.devices=4`` (Lightning starts the
  other ranks itself by re-running the command).
* torchrun, on every node: ``torchrun --nnodes=2 --nproc_per_node=4 --node_rank=$NODE --rdzv_backend=c10d
  --rdzv_endpoint=$HOST:29500 -m v2flow.cli fit --config c.yaml --trainer.strategy=ddp --trainer.num_nodes=2
  --trainer.devices=4``.
* SLURM (``#SBATCH --nodes=2 --ntasks-per-node=4 --gpus-per-node=4``): ``srun v2flow fit --config c.yaml
  --trainer.strategy=ddp --trainer.num_nodes=2 --trainer.devices=4``; ``--ntasks-per-node`` must equal devices.

``--trainer.num_nodes`` x ``--trainer.devices`` must equal the number of processes the launcher starts. The
global batch is ``devices x num_nodes x batch_size``. ``--ckpt_path`` resumes mid-epoch exactly with the same
world size and batch size. ``--trainer.callbacks+=v2flow.training.ReplicaCheck`` checks that ranks stay in step.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

TOOL_COMMANDS = ("export", "encode", "decode", "reconstruct", "evaluate", "calibrate", "cache-latents")
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
TASKS = {
    "lm": "fine-tune a causal LLM to write image tokens (configs/lm_mnist.yaml)",
    "classifier": "the MNIST digit judge (configs/classifier_mnist.yaml)",
    "vq": "the diffusers VQModel baseline (configs/vq_mnist_16.yaml)",
}


def lightning_cli(args: list[str] | None = None, run: bool = True, task: str = "tokenizer"):
    """The Lightning CLI of one training task: ``tokenizer`` (default), ``lm``, ``classifier`` or ``vq`` (the
    diffusers VQModel baseline, :mod:`v2flow.baseline`)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    if task == "tokenizer":
        from .training import V2FlowModule as module
    elif task == "lm":
        from .lm_training import ImageLMModule as module
    elif task == "classifier":
        from .classifier import ClassifierModule as module
    elif task == "vq":
        from .baseline import VQBaselineModule as module
    else:
        raise ValueError(f"unknown task {task!r}")

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            if task == "lm":  # one image tokenizer for the LM and its cached tokens
                parser.link_arguments("model.image_tokenizer", "data.init_args.image_tokenizer")

    with warnings.catch_warnings():
        # `args` is how `v2flow lm fit ...` hands Lightning the words after the task name, on purpose
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return CLI(
            module,
            L.LightningDataModule,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf", "prog": "v2flow" if task == "tokenizer" else f"v2flow {task}"},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def _decode_options(p: argparse.ArgumentParser) -> None:
    from .sampling import SOLVERS

    p.add_argument("--num-steps", type=int, default=None, help="ODE steps per iteration (default: the checkpoint's)")
    p.add_argument("--solver", choices=SOLVERS, default=None)
    p.add_argument("--num-iters", type=int, default=None, help="mask-schedule iterations")
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None, help="scale of the starting noise")
    p.add_argument("--seed", type=int, default=0, help="seed of the decode's noise and reveal order")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")


def _decode_kwargs(a: argparse.Namespace, tokenizer) -> dict:
    """The decode keywords of the command line: the checkpoint's defaults with the given options over them
    (:meth:`v2flow.settings.DecodeSettings.resolve`), and a generator seeded with ``--seed``."""
    import torch

    settings = tokenizer.decode_defaults.resolve(
        num_steps=a.num_steps,
        solver=a.solver,
        num_iters=a.num_iters,
        cfg_scale=a.cfg_scale,
        shift=a.shift,
        temperature=a.temperature,
    )
    return {**settings.as_dict(), "generator": torch.Generator(device=a.device).manual_seed(a.seed)}


def _device(name: str):
    """``--device`` as a torch.device that this machine has, or a ValueError saying what to use."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name ({err}); use cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: this torch has no usable CUDA device (torch.cuda.is_available() is False, "
                f"torch {torch.__version__}); use --device cpu, or install a CUDA build of torch on a GPU machine"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: v2flow runs on cpu, cuda or mps")
    return device


def _output_stems(files: list[Path]) -> list[str]:
    """Output names for input files; refuses names that would overwrite each other."""
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
        raise ValueError(f"several inputs share the names {dup}; outputs would overwrite each other")
    return stems


def _image_files(inputs: list[str]) -> list[Path]:
    from .images import IMAGE_SUFFIXES, list_images

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(list_images(path))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{path} does not look like an image file ({', '.join(IMAGE_SUFFIXES)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


def _add_image_options(p: argparse.ArgumentParser, resize_help: str) -> None:
    p.add_argument("--resize", action="store_true", help=resize_help)
    p.add_argument(
        "--pad",
        action="store_true",
        help="pad smaller images with black background (-1), centred, to the tokenizer's size: how 28x28 MNIST "
        "digits were padded to 32x32 for the shipped MNIST tokenizers (use this, not --resize, for them)",
    )
    p.add_argument(
        "--convert", action="store_true", help="convert colour images to grey for a 1-channel tokenizer (else refused)"
    )


def _image_batches(files: list[Path], tokenizer, a: argparse.Namespace, desc: str):
    """Stream the files as (B, C, H, W) batches in [-1, 1] (bounded memory), with a progress bar; ``--resize``,
    ``--pad`` and ``--convert`` say what may be done to them."""
    from torch.utils.data import DataLoader, Dataset
    from tqdm.auto import tqdm

    from .images import load_image, pad_to_size
    from .utils import releasing_heap

    cfg = tokenizer.config
    size = cfg["image_size"]
    if a.resize and a.pad:
        raise ValueError("--resize and --pad are two ways to reach the tokenizer's size; choose one")

    class Files(Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            image = load_image(files[i], cfg["in_channels"], size if a.resize else None, convert=a.convert)
            h, w = image.shape[-2:]
            if a.pad and (h, w) != (size, size):
                image = pad_to_size(image, size)
            if image.shape[-2:] != (size, size):
                smaller = h <= size and w <= size
                raise ValueError(
                    f"{files[i]} is {w}x{h} but the tokenizer expects {size}x{size}; pass "
                    + (
                        "--pad to pad it with black background (as 28x28 MNIST digits were padded for training; "
                        "this matches the shipped MNIST tokenizers) or --resize to scale it up and centre-crop"
                        if smaller
                        else "--resize to resize (shorter side) and centre-crop"
                    )
                )
            return image

    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
    loader = DataLoader(Files(), batch_size=a.batch_size)
    return releasing_heap(tqdm(loader, desc=desc, unit="batch", disable=None))


def tool_parser() -> argparse.ArgumentParser:
    """The parser of the tool commands (``TOOL_COMMANDS``)."""
    parser = argparse.ArgumentParser(prog="v2flow", description="v2flow tokenizer tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="Lightning checkpoint -> pretrained directory")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--weights",
        choices=["ema", "current"],
        default=None,
        help="tokenizer and vq checkpoints: EMA (default) or raw weights (LM and classifier runs keep no EMA)",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override sample_* decode defaults")

    p = sub.add_parser("encode", help="image files -> token ids")
    p.add_argument("tokenizer", help="pretrained tokenizer directory")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output .json or .pt")
    _add_image_options(p, "resize (shorter side, bicubic) and centre-crop images to the tokenizer's size")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (memory stays bounded)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")

    p = sub.add_parser("decode", help="token ids -> images")
    p.add_argument("tokenizer")
    p.add_argument("ids", help=".json or .pt written by `v2flow encode` (or a (B, N) list / tensor)")
    p.add_argument("-o", "--output", required=True, help="output folder for PNG files")
    p.add_argument(
        "--allow-truncation",
        action="store_true",
        help="decode ids shorter than the tokenizer's N as a prefix with the tail masked, also for an unordered "
        "tokenizer (whose prefixes are not coarse versions of the image)",
    )
    _decode_options(p)

    p = sub.add_parser("reconstruct", help="image files -> ids -> images, with a comparison grid")
    p.add_argument("tokenizer")
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True, help="output folder")
    _add_image_options(p, "resize (shorter side, bicubic) and centre-crop images to the tokenizer's size")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (memory stays bounded)")
    p.add_argument("--grid-size", type=int, default=16, help="images in comparison.png (the first ones)")
    _decode_options(p)

    p = sub.add_parser(
        "evaluate",
        help="reconstruction metrics of a data set: JSON and a markdown table row",
        description=EVALUATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="pretrained tokenizer directory")
    p.add_argument("--data", required=True, help="mnist-test, mnist-val, photos-test, or an image folder / file")
    p.add_argument("--limit", type=int, default=0, help="the first n images only (0 = all)")
    p.add_argument("--batch-size", type=int, default=250, help="images per batch (memory stays bounded)")
    _add_image_options(p, "folders: resize (shorter side) and centre-crop")
    p.add_argument(
        "--features",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="FD/KID features: 'classifier [DIR]' (default for MNIST: checkpoints/mnist-classifier), "
        "'inception WEIGHTS' (a local pt_inception-2015-12-05-6726825d.pth; needs torch-fidelity) or 'none' "
        "(default for other data)",
    )
    p.add_argument(
        "--kid-subset-size",
        type=int,
        default=None,
        help="images per KID subset (default: KID over all images, with its standard error)",
    )
    p.add_argument("--output", default=None, help="also write the JSON to this file")
    _decode_options(p)

    p = sub.add_parser(
        "calibrate",
        help="store the statistics of a tokenizer's training images in its directory (encode warns off them)",
    )
    p.add_argument("tokenizer", help="pretrained tokenizer directory (rewritten in place, atomically)")
    p.add_argument("--data", required=True, help="mnist-train, or an image folder of the training images")
    p.add_argument("--limit", type=int, default=10000, help="the first n images (0 = all)")
    p.add_argument("--description", default=None, help="what the data are, shown in warnings")
    _add_image_options(p, "folders: resize (shorter side) and centre-crop")
    p.add_argument("--batch-size", type=int, default=500, help="images per batch")

    p = sub.add_parser("cache-latents", help="image folder -> sharded latents of a frozen diffusers autoencoder")
    p.add_argument("--autoencoder", required=True, help="diffusers autoencoder directory or hub id")
    p.add_argument("--subfolder", default=None, help="its sub-directory, e.g. vae")
    p.add_argument("--data", required=True, help="image folder (recursive)")
    p.add_argument("--image-size", type=int, required=True, help="resize (shorter side) and centre-crop to this")
    p.add_argument("-o", "--output", required=True, help="cache directory; an interrupted cache resumes")
    p.add_argument("--no-hflip", action="store_true", help="do not store flipped latents")
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    return parser


def tool_main(argv: list[str]) -> int:
    a = tool_parser().parse_args(argv)
    if getattr(a, "device", None) is not None:
        a.device = _device(a.device)
    commands = {
        "export": _export,
        "encode": _encode,
        "decode": _decode,
        "reconstruct": _reconstruct,
        "evaluate": _evaluate,
        "calibrate": _calibrate,
        "cache-latents": _cache_latents,
    }
    return commands[a.command](a)


def _cache_latents(a: argparse.Namespace) -> int:
    from .latent_cache import cache_latents

    index = cache_latents(
        a.autoencoder,
        a.data,
        a.output,
        image_size=a.image_size,
        subfolder=a.subfolder,
        hflip=not a.no_hflip,
        shard_size=a.shard_size,
        batch_size=a.batch_size,
        num_workers=a.num_workers,
        dtype=a.dtype,
        device=str(a.device),
    )
    meta = index["meta"]
    print(
        json.dumps(
            {
                "output": a.output,
                "images": meta["num_images"],
                "shards": len(index["shards"]),
                "latent_shape": meta["latent_shape"],
            }
        )
    )
    return 0


def _checkpoint_kind(path: str) -> str:
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise ValueError(
            f"{path} is not a Lightning checkpoint (torch.load cannot read it: {type(err).__name__}); "
            "give a .ckpt file that `v2flow fit` wrote, e.g. runs/<name>/version_0/checkpoints/last.ckpt"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not a Lightning checkpoint (no state_dict); give a .ckpt file that `v2flow fit` wrote"
        )
    if isinstance(ckpt, dict) and "v2flow_classifier_config" in ckpt:
        return "classifier"
    if isinstance(ckpt, dict) and "v2flow_lm_layout" in ckpt:
        return "lm"
    if isinstance(ckpt, dict) and "v2flow_vq_config" in ckpt:
        return "vq"
    return "tokenizer"


def _export(a: argparse.Namespace) -> int:
    from .training import tokenizer_from_checkpoint

    out = Path(a.output)
    if out.exists() and not a.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    kind = _checkpoint_kind(a.checkpoint)
    if kind != "tokenizer" and a.set:
        raise ValueError("--set applies to tokenizer checkpoints only")
    if kind in ("classifier", "lm") and a.weights is not None:
        raise ValueError(f"--weights applies to tokenizer and vq checkpoints only; a {kind} run keeps no EMA copy")
    weights = a.weights or "ema"
    if kind == "classifier":
        from .classifier import classifier_from_checkpoint

        classifier_from_checkpoint(a.checkpoint).save_pretrained(out, overwrite=a.overwrite)
        print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))
        return 0
    if kind == "lm":
        from .lm_training import image_lm_from_checkpoint

        image_lm_from_checkpoint(a.checkpoint).save_pretrained(out, overwrite=a.overwrite)
        print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))
        return 0
    if kind == "vq":
        from .baseline import vq_from_checkpoint

        vq_from_checkpoint(a.checkpoint, weights=weights).save_pretrained(out)
        print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))
        return 0
    import yaml

    from .settings import CONFIG_KEYS
    from .tokenizer import V2FlowTokenizer

    tokenizer = tokenizer_from_checkpoint(a.checkpoint, weights=weights)
    overrides = {}
    for item in a.set:
        key, _, value = item.partition("=")
        decode_keys = list(CONFIG_KEYS.values())
        if key not in decode_keys:  # (sample_entropy_weight is a training loss weight, not a decode default)
            raise ValueError(f"--set accepts the decode defaults only: {decode_keys}; got {key!r}")
        overrides[key] = yaml.safe_load(value)
    if overrides:
        V2FlowTokenizer.from_config({**tokenizer.config, **overrides})  # validates the new defaults
        tokenizer.config.update(overrides)
    tokenizer.save_pretrained(out)
    print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def _write_ids(path: Path, payload: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".pt":
        torch.save(payload, tmp)
    elif path.suffix == ".json":
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n")
    else:
        raise ValueError(f"output must end in .json or .pt, got {path}")
    tmp.replace(path)


def _read_ids(path: Path):
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"ids file {path} does not exist")
    if path.suffix == ".pt":
        data = torch.load(path, weights_only=True)
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
    else:
        raise ValueError(f"ids file must end in .json or .pt, got {path}")
    if isinstance(data, dict) and "ids" not in data:
        raise ValueError(
            f"{path} holds no 'ids' entry (keys: {sorted(data)[:8]}); give a file written by `v2flow encode`, "
            "or a (B, N) list / tensor of token ids"
        )
    ids = data["ids"] if isinstance(data, dict) else data
    names = data.get("files") if isinstance(data, dict) else None
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"the ids in {path} are not a (B, N) array of integers ({err})") from err
    return ids, names


def _encode(a: argparse.Namespace) -> int:
    import torch

    from .tokenizer import V2FlowTokenizer

    tokenizer = V2FlowTokenizer.from_pretrained(a.tokenizer, map_location=a.device)
    files = _image_files(a.inputs)
    # one (n, N) output written in place, rather than small per-batch tensors kept alive between the batches'
    # large temporaries, where they can pin heap pages that glibc would otherwise hand back
    ids = torch.empty(len(files), tokenizer.config["num_tokens"], dtype=torch.long)
    done = 0
    for images in _image_batches(files, tokenizer, a, "encoding"):
        ids[done : done + len(images)] = tokenizer.encode(images.to(a.device)).ids.cpu()
        done += len(images)
    payload = {"files": [str(f) for f in files], "llm": tokenizer.vocabulary.llm_name}
    out = Path(a.output)
    payload["ids"] = ids if out.suffix == ".pt" else ids.tolist()
    if tokenizer.config["quantizer"] == "vocab" and tokenizer.vocabulary.token_strings is not None:
        payload["tokens"] = tokenizer.token_strings(ids)
    _write_ids(out, payload)
    print(json.dumps({"images": len(files), "tokens_per_image": ids.shape[1], "output": str(out)}))
    return 0


def _decode(a: argparse.Namespace) -> int:
    from .tokenizer import V2FlowTokenizer
    from .utils import save_image

    tokenizer = V2FlowTokenizer.from_pretrained(a.tokenizer, map_location=a.device)
    ids, names = _read_ids(Path(a.ids))
    images = tokenizer.decode(ids.to(a.device), allow_truncation=a.allow_truncation, **_decode_kwargs(a, tokenizer))
    images = images.images
    out = Path(a.output)
    stems = _output_stems([Path(n) for n in names]) if names else [f"{i:05d}" for i in range(len(images))]
    for stem, image in zip(stems, images, strict=True):
        save_image(image, out / f"{stem}.png")
    print(json.dumps({"images": len(images), "output": str(out)}))
    return 0


def _reconstruct(a: argparse.Namespace) -> int:
    import torch
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    from .metrics import psnr_per_image
    from .tokenizer import V2FlowTokenizer
    from .utils import save_image, save_image_grid

    tokenizer = V2FlowTokenizer.from_pretrained(a.tokenizer, map_location=a.device)
    files = _image_files(a.inputs)
    stems = _output_stems(files)
    folder = Path(a.output)
    kwargs = _decode_kwargs(a, tokenizer)  # one generator for the whole stream
    psnr, ssim = [], StructuralSimilarityIndexMeasure(data_range=2.0).to(a.device)
    shown: list[torch.Tensor] = []
    done = 0
    for images in _image_batches(files, tokenizer, a, "reconstructing"):
        images = images.to(a.device)
        recon = tokenizer.reconstruct(images, **kwargs).images
        for image in recon:
            save_image(image, folder / f"{stems[done]}_recon.png")
            done += 1
        psnr.append(psnr_per_image(recon, images).cpu())
        ssim.update(recon, images)
        if sum(len(x) for x in shown) < 2 * a.grid_size:
            keep = a.grid_size - sum(len(x) for x in shown) // 2
            shown += [images[:keep].cpu(), recon[:keep].cpu()]
    originals, recons = torch.cat(shown[0::2]), torch.cat(shown[1::2])
    nrow = min(len(originals), 16)
    rows = [t for k in range(0, len(originals), nrow) for t in (originals[k : k + nrow], recons[k : k + nrow])]
    save_image_grid(torch.cat(rows), folder / "comparison.png", nrow=nrow)
    metrics = {"psnr": float(torch.cat(psnr).mean()), "ssim": float(ssim.compute())}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps({"images": len(files), **metrics, "grid": str(folder / "comparison.png")}))
    return 0


EVALUATE_HELP = """Reconstruct a data set batch by batch (bounded memory, progress bar) and print its metrics as JSON
and as a markdown table row (with its header).

What the metrics compare: each reconstruction with the exact tensor given to the tokenizer, never with a
differently cropped or resized original.
  mnist-test, mnist-val  the 28x28 digits padded with background to the tokenizer's size (no resize)
  photos-test            fixed (seeded) crops of the held-out scikit-image photo, at native resolution
  a folder / file        the images at their own size, or with --resize the shorter side resized (bicubic)
                         to the tokenizer's size and centre-cropped: the metrics then measure the tokenizer
                         on that resized crop, not the resize.

FD/KID: for MNIST the project's digit classifier (checkpoints/mnist-classifier, test accuracy 99.39 %)
gives 128-d features; for natural images standard rFID needs --features inception WEIGHTS (a local
pt_inception-2015-12-05-6726825d.pth and `pip install torch-fidelity`). Without features FD/KID are null,
with fd_note saying why. FD and KID depend on the number of images: compare them at equal --limit.
MS-SSIM under 176 px uses fewer scales and a smaller window (see ms_ssim_note)."""

MNIST_DATA = ("mnist-test", "mnist-val")
NAMED_DATA = (*MNIST_DATA, "photos-test")
DEFAULT_CLASSIFIER = Path("checkpoints") / "mnist-classifier"  # in the working directory, else in the repository


def _default_classifier() -> Path:
    for path in (DEFAULT_CLASSIFIER, Path(__file__).resolve().parents[1] / DEFAULT_CLASSIFIER):
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"the default MNIST feature extractor {DEFAULT_CLASSIFIER} was not found; pass --features classifier DIR "
        "or --features none"
    )


def _evaluation_batches(a: argparse.Namespace, tokenizer):
    """(batches with a progress bar, number of images, the crop/resize policy) of ``--data``."""
    from tqdm.auto import tqdm

    from .utils import releasing_heap

    cfg = tokenizer.config
    c, s, limit = cfg["in_channels"], cfg["image_size"], a.limit or None
    if a.limit < 0 or a.batch_size < 1:
        raise ValueError(f"need --limit >= 0 and --batch-size >= 1, got {a.limit} and {a.batch_size}")
    if a.data in NAMED_DATA and (a.resize or a.pad or a.convert):
        raise ValueError(f"--resize, --pad and --convert apply to folders only; {a.data} has a fixed crop policy")
    if a.data in MNIST_DATA:
        from .data import load_mnist

        if c != 1 or s < 28:
            raise ValueError(f"MNIST digits are 1x28x28 (padded); this tokenizer takes {c}x{s}x{s} images")
        images = load_mnist(a.data.removeprefix("mnist-"), pad_to=s)[0][:limit]
        batches = releasing_heap(tqdm(images.split(a.batch_size), desc="evaluating", unit="batch", disable=None))
        return batches, len(images), f"28x28 digits padded with background to {s}x{s}; no resize"
    if a.data == "photos-test":
        from .data import SKIMAGE_HELD_OUT, PhotoCropsDataModule

        if c != 3:
            raise ValueError(f"photos-test gives RGB crops; this tokenizer takes {c}-channel images")
        held, length = SKIMAGE_HELD_OUT, limit or 2048  # the data module's default test length
        dm = PhotoCropsDataModule(
            crop_size=s, eval_batch_size=a.batch_size, test_length=length, photos=held, held_out=held
        )
        dm.setup("test")
        loader = dm.test_dataloader()
        batches = (x for x, _ in releasing_heap(tqdm(loader, desc="evaluating", unit="batch", disable=None)))
        return batches, len(dm.test_set), f"fixed {s}x{s} crops of the held-out photo(s) {list(held)}; no resize"
    files = _image_files([a.data])[:limit]
    policy = (
        f"shorter side resized (bicubic) to {s} and centre-cropped; compared with that crop"
        if a.resize
        else "the images as stored (no crop, no resize)"
    )
    return _image_batches(files, tokenizer, a, "evaluating"), len(files), policy


def _feature_extractor(a: argparse.Namespace, tokenizer):
    """(extractor or None, a description for the JSON) from ``--features``."""
    spec = a.features or (["classifier"] if a.data in MNIST_DATA else ["none"])
    kind, rest = spec[0], spec[1:]
    if kind == "none" and not rest:
        why = "no --features given" if a.features is None else "--features none"
        return None, {
            "kind": "none",
            "note": f"{why}: FD/KID need a feature extractor (classifier DIR or inception "
            "WEIGHTS); MNIST data default to the shipped classifier",
        }
    if kind == "classifier" and len(rest) <= 1:
        from .classifier import DigitClassifier

        path = Path(rest[0]) if rest else _default_classifier()
        model = DigitClassifier.from_pretrained(path, map_location=a.device)
        cfg, want = tokenizer.config, model.config
        if (cfg["in_channels"], cfg["image_size"]) != (want["in_channels"], want["image_size"]):
            raise ValueError(
                f"the classifier at {path} takes {want['in_channels']}x{want['image_size']}x{want['image_size']} "
                f"images; this tokenizer's are {cfg['in_channels']}x{cfg['image_size']}x{cfg['image_size']}"
            )
        return model, {"kind": "classifier", "path": str(path), "num_features": model.num_features}
    if kind == "inception" and len(rest) == 1:
        from .metrics import inception_extractor

        try:
            model = inception_extractor(rest[0]).to(a.device)
        except ModuleNotFoundError as err:  # torch-fidelity missing: a usage error, reported as such
            raise ValueError(str(err)) from err
        return model, {"kind": "inception", "path": rest[0], "num_features": model.num_features}
    raise ValueError(f"--features takes 'classifier [DIR]', 'inception WEIGHTS' or 'none', got {' '.join(spec)!r}")


def _evaluate(a: argparse.Namespace) -> int:
    import time

    from .metrics import ReconstructionMetrics, evaluate_tokenizer
    from .tokenizer import V2FlowTokenizer

    tokenizer = V2FlowTokenizer.from_pretrained(a.checkpoint, map_location=a.device)
    batches, num_images, policy = _evaluation_batches(a, tokenizer)
    if num_images == 0:
        raise ValueError(f"{a.data} holds no images")
    extractor, features = _feature_extractor(a, tokenizer)
    kwargs = _decode_kwargs(a, tokenizer)
    decode = {k: v for k, v in kwargs.items() if k != "generator"}
    metrics = ReconstructionMetrics(
        feature_extractor=extractor, kid_subset_size=a.kid_subset_size, device=a.device, seed=a.seed
    )
    start = time.perf_counter()
    evaluate_tokenizer(tokenizer, batches, metrics, **kwargs)
    seconds = time.perf_counter() - start
    result = metrics.compute()
    if extractor is None:
        result["fd_note"] = features.pop("note")
    result = {
        "checkpoint": a.checkpoint,
        "data": a.data,
        "policy": policy,
        "decode": decode,
        "seed": a.seed,
        "features": features,
        **result,
        "seconds": round(seconds, 2),
    }
    text = json.dumps(result, indent=1)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text + "\n")
    print(text)
    print()
    print(_markdown_row(result, header=True))
    return 0


def _markdown_row(r: dict, header: bool = False) -> str:
    """One markdown table row of an evaluation result (with the header and rule lines above it)."""

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    d = r["decode"]
    cells = {
        "checkpoint": r["checkpoint"],
        "data": r["data"],
        "images": r["num_images"],
        "steps": d["num_steps"],
        "solver": d["solver"],
        "iters": d["num_iters"],
        "cfg": d["cfg_scale"],
        "temperature": d["temperature"],
        "shift": d["shift"],
        "PSNR (dB)": fmt(r["psnr"], ".2f"),
        "SSIM": fmt(r["ssim"], ".4f"),
        "MS-SSIM": fmt(r["ms_ssim"], ".4f"),
        "FD": fmt(r["fd"], ".3f"),
        "KID": fmt(r["kid_mean"], ".4f"),
        "distinct ids": r["distinct_ids"],
        "perplexity": fmt(r["perplexity"], ".0f"),
        "bits/image": fmt(r["bits_per_image"], ".0f"),
        "mean position entropy (bits)": fmt(r["mean_position_entropy"], ".2f"),
    }
    row = "| " + " | ".join(str(v) for v in cells.values()) + " |"
    if not header:
        return row
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells) + "\n" + row


def _calibrate(a: argparse.Namespace) -> int:
    import os

    import torch

    from .checks import image_features, input_statistics
    from .hub import CONFIG_NAME, read_json
    from .tokenizer import V2FlowTokenizer

    tokenizer = V2FlowTokenizer.from_pretrained(a.tokenizer)
    if a.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {a.limit}")
    limit, size = a.limit or None, tokenizer.config["image_size"]
    if a.data == "mnist-train":
        from .data import load_mnist

        if (a.resize, a.pad, a.convert) != (False, False, False):
            raise ValueError("--resize, --pad and --convert apply to folders only; mnist-train is padded to size")
        if tokenizer.config["in_channels"] != 1 or size < 28:
            raise ValueError("MNIST digits are 1x28x28 (padded); this tokenizer takes other images")
        batches = load_mnist("train", pad_to=size)[0][:limit].split(a.batch_size)
        description = f"MNIST training digits: white on black, 28x28 padded to {size}x{size}, in [-1, 1]"
    else:
        batches = _image_batches(_image_files([a.data])[:limit], tokenizer, a, "calibrating")
        description = f"the images in {a.data}"
    statistics = input_statistics(torch.cat([image_features(x) for x in batches]), a.description or description)
    path = Path(a.tokenizer) / CONFIG_NAME
    config = {**read_json(path), "input_statistics": statistics}
    V2FlowTokenizer.from_config(config)  # validates before anything is written
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)  # atomic: the weights and other files are not touched
    print(json.dumps({"tokenizer": a.tokenizer, "input_statistics": statistics}))
    return 0


def _overview() -> str:
    """The text of ``v2flow --help``: every command, with the tools' own help lines."""
    tools = next(x for x in tool_parser()._actions if isinstance(x, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in tools._choices_actions}
    lines = [
        "usage: v2flow COMMAND [options]   (`v2flow COMMAND --help` for a command's options)",
        "",
        "Training and evaluation through the Lightning CLI (--config YAML, --ckpt_path to resume):",
        f"  {'fit | validate | test | predict':34s} the image tokenizer (configs/mnist.yaml, configs/quickstart.yaml)",
    ]
    lines += [f"  {task + ' fit | validate | test':34s} {text}" for task, text in TASKS.items()]
    lines += ["", "Tools:"]
    lines += [f"  {name:34s} {helps[name]}" for name in TOOL_COMMANDS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command = argv[0]
    if command in TOOL_COMMANDS:
        try:
            return tool_main(argv)
        except (ValueError, FileNotFoundError, FileExistsError) as err:
            print(f"v2flow {command}: error: {err}", file=sys.stderr)
            return 2
    if command in TASKS:
        lightning_cli(argv[1:], task=command)
        return 0
    if command in LIGHTNING_SUBCOMMANDS or command.startswith("-"):
        lightning_cli(argv)
        return 0
    known = [*LIGHTNING_SUBCOMMANDS, *TASKS, *TOOL_COMMANDS]
    print(f"v2flow: error: unknown command {command!r}; choose one of {', '.join(known)}", file=sys.stderr)
    print(_overview(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
