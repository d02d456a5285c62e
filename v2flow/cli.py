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
    diffusers VQModel baseline, :mod:`v2flow.eval.baseline`)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    if task == "tokenizer":
        from .training import V2FlowModule as module
    elif task == "lm":
        from .lm_training import ImageLMModule as module
    elif task == "classifier":
        from .eval.classifier import ClassifierModule as module
    elif task == "vq":
        from .eval.baseline import VQBaselineModule as module
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
    from .settings import MODES

    p.add_argument("--num-steps", type=int, default=None, help="ODE steps per iteration (default: the checkpoint's)")
    p.add_argument("--solver", choices=SOLVERS, default=None)
    p.add_argument("--num-iters", type=int, default=None, help="mask-schedule iterations")
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None, help="scale of the starting noise")
    p.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="sample: the flow sample (realism); mean: the one-step estimate of the clean image (fidelity)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the decode's noise and reveal order")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")


def _decode_kwargs(a: argparse.Namespace, tokenizer) -> dict:
    """The decode keywords of the command line: the checkpoint's defaults with the given options over them
    (:meth:`v2flow.settings.DecodeSettings.resolve`), and a generator seeded with ``--seed``."""
    import torch

    from .settings import NAMES

    settings = tokenizer.decode_defaults.resolve(**{name: getattr(a, name) for name in NAMES})
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
    """Stream the files as batches at the tokenizer's size (:func:`v2flow.images.image_batches`); ``--resize``,
    ``--pad`` and ``--convert`` say what may be done to them."""
    from .images import image_batches

    cfg = tokenizer.config
    return image_batches(
        files,
        cfg["image_size"],
        cfg["in_channels"],
        a.batch_size,
        resize=a.resize,
        pad=a.pad,
        convert=a.convert,
        desc=desc,
    )


def _add_export(sub) -> None:
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
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override decode defaults, e.g. num_steps=2 temperature=0",
    )


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="image files -> token ids")
    p.add_argument("tokenizer", help="pretrained tokenizer directory")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output .json or .pt")
    _add_image_options(p, "resize (shorter side, bicubic) and centre-crop images to the tokenizer's size")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (memory stays bounded)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")


def _add_decode(sub) -> None:
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


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="image files -> ids -> images, with a comparison grid")
    p.add_argument("tokenizer")
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True, help="output folder")
    _add_image_options(p, "resize (shorter side, bicubic) and centre-crop images to the tokenizer's size")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (memory stays bounded)")
    p.add_argument("--grid-size", type=int, default=16, help="images in comparison.png (the first ones)")
    _decode_options(p)


def _add_evaluate(sub) -> None:
    from .eval.evaluation import EVALUATE_HELP

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


def _add_calibrate(sub) -> None:
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


def _add_cache_latents(sub) -> None:
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


def tool_parser() -> argparse.ArgumentParser:
    """The parser of the tool commands (``TOOL_COMMANDS``)."""
    parser = argparse.ArgumentParser(prog="v2flow", description="v2flow tokenizer tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_export,
        _add_encode,
        _add_decode,
        _add_reconstruct,
        _add_evaluate,
        _add_calibrate,
        _add_cache_latents,
    ):
        add(sub)
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
        from .eval.classifier import classifier_from_checkpoint

        classifier_from_checkpoint(a.checkpoint).save_pretrained(out, overwrite=a.overwrite)
    elif kind == "lm":
        from .lm_training import image_lm_from_checkpoint

        image_lm_from_checkpoint(a.checkpoint).save_pretrained(out, overwrite=a.overwrite)
    elif kind == "vq":
        from .eval.baseline import vq_from_checkpoint

        vq_from_checkpoint(a.checkpoint, weights=weights).save_pretrained(out)
    else:
        _export_tokenizer(a.checkpoint, out, weights, a.set)
    print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def _export_tokenizer(checkpoint: str, out: Path, weights: str, settings: list[str]) -> None:
    """A tokenizer checkpoint -> a pretrained directory, with `settings` ("name=value") laid over its decode
    defaults."""
    import yaml

    from .settings import NAMES
    from .training import tokenizer_from_checkpoint

    tokenizer = tokenizer_from_checkpoint(checkpoint, weights=weights)
    overrides = {}
    for item in settings:
        key, _, value = item.partition("=")
        if key not in NAMES:
            raise ValueError(f"--set accepts the decode settings only: {list(NAMES)}; got {key!r}")
        overrides[key] = yaml.safe_load(value)
    if overrides:  # validated as decode() validates them
        tokenizer.decode_defaults = tokenizer.decode_defaults.resolve(**overrides)
        tokenizer.config["decode"] = tokenizer.decode_defaults.as_dict()
    tokenizer.save_pretrained(out)


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

    from .images import image_files
    from .tokenizer import V2FlowTokenizer

    tokenizer = V2FlowTokenizer.from_pretrained(a.tokenizer, map_location=a.device)
    files = image_files(a.inputs)
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

    from .images import image_files
    from .metrics import SSIM, psnr_per_image
    from .tokenizer import V2FlowTokenizer
    from .utils import save_image, save_image_grid

    tokenizer = V2FlowTokenizer.from_pretrained(a.tokenizer, map_location=a.device)
    files = image_files(a.inputs)
    stems = _output_stems(files)
    folder = Path(a.output)
    kwargs = _decode_kwargs(a, tokenizer)  # one generator for the whole stream
    psnr, ssim = [], SSIM().to(a.device)  # the standard way: [0, 1], data range 1
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


def _evaluate(a: argparse.Namespace) -> int:
    from .eval.evaluation import evaluate, markdown_row
    from .settings import NAMES

    result = evaluate(
        checkpoint=a.checkpoint,
        data=a.data,
        limit=a.limit,
        batch_size=a.batch_size,
        resize=a.resize,
        pad=a.pad,
        convert=a.convert,
        features=a.features,
        kid_subset_size=a.kid_subset_size,
        decode={name: getattr(a, name) for name in NAMES},
        seed=a.seed,
        device=a.device,
    )
    text = json.dumps(result, indent=1)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text + "\n")
    print(text)
    print()
    print(markdown_row(result, header=True))
    return 0


def _calibrate(a: argparse.Namespace) -> int:
    import torch

    from .checks import image_features, input_statistics
    from .hub import CONFIG_NAME, read_json, write_text_atomic
    from .images import image_files
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
        batches = _image_batches(image_files([a.data])[:limit], tokenizer, a, "calibrating")
        description = f"the images in {a.data}"
    statistics = input_statistics(torch.cat([image_features(x) for x in batches]), a.description or description)
    path = Path(a.tokenizer) / CONFIG_NAME
    config = {**read_json(path), "input_statistics": statistics}
    # validated before anything is written, and stored in the current format (the decode defaults by name)
    config = {"_class_name": "V2FlowTokenizer", **V2FlowTokenizer.from_config(config).config}
    write_text_atomic(path, json.dumps(config, indent=2) + "\n")  # only config.json: the weights are not touched
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
