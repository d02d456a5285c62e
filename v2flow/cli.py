"""The ``v2flow`` command.

* ``v2flow fit|validate|test --config configs/mnist.yaml``: the Lightning CLI (YAML configs with OmegaConf
  interpolation, ``--print_config``, ``--ckpt_path`` to resume).
* ``v2flow lm fit|validate --config configs/lm_mnist.yaml``: fine-tune a causal LLM to write images.
* ``v2flow classifier fit|validate|test --config configs/classifier_mnist.yaml``: train the MNIST judge.
* ``v2flow export``: a Lightning checkpoint -> a pretrained directory (config.json + model.safetensors).
* ``v2flow encode``: image files -> token ids (JSON or .pt, with the LLM token strings beside them).
* ``v2flow decode``: token ids -> PNG images.
* ``v2flow reconstruct``: image files -> ids -> images, plus a comparison grid and PSNR/SSIM.
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
from pathlib import Path

TOOL_COMMANDS = ("export", "encode", "decode", "reconstruct", "cache-latents")


def lightning_cli(args: list[str] | None = None, run: bool = True, task: str = "tokenizer"):
    """The Lightning CLI of one training task: ``tokenizer`` (default), ``lm`` or ``classifier``."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    if task == "tokenizer":
        from .training import V2FlowModule as module
    elif task == "lm":
        from .lm_training import ImageLMModule as module
    elif task == "classifier":
        from .classifier import ClassifierModule as module
    else:
        raise ValueError(f"unknown task {task!r}")

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            if task == "lm":  # one image tokenizer for the LM and its cached tokens
                parser.link_arguments("model.image_tokenizer", "data.init_args.image_tokenizer")

    return CLI(
        module,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def _decode_kwargs(a: argparse.Namespace, device: str):
    import torch

    return {
        "num_steps": a.num_steps,
        "solver": a.solver,
        "num_iters": a.num_iters,
        "cfg_scale": a.cfg_scale,
        "shift": a.shift,
        "temperature": a.temperature,
        "generator": torch.Generator(device=device).manual_seed(a.seed),
    }


def _output_stems(files: list[Path]) -> list[str]:
    """Output names for input files; refuses names that would overwrite each other."""
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
        raise ValueError(f"several inputs share the names {dup}; outputs would overwrite each other")
    return stems


def _image_files(inputs: list[str]) -> list[Path]:
    from .data import IMAGE_SUFFIXES, list_images

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


def _image_batches(files: list[Path], tokenizer, resize: bool, batch_size: int, desc: str):
    """Stream the files as (B, C, H, W) batches in [-1, 1] (bounded memory), with a progress bar."""
    from torch.utils.data import DataLoader, Dataset
    from tqdm.auto import tqdm

    from .data import load_image

    cfg = tokenizer.config
    size = cfg["image_size"]

    class Files(Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            image = load_image(files[i], cfg["in_channels"], size if resize else None)
            if image.shape[-2:] != (size, size):
                raise ValueError(
                    f"{files[i]} is {image.shape[-1]}x{image.shape[-2]} but the tokenizer expects {size}x{size}; "
                    "pass --resize to resize and centre-crop"
                )
            return image

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    loader = DataLoader(Files(), batch_size=batch_size)
    return tqdm(loader, desc=desc, unit="batch", disable=None)


def tool_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="v2flow", description="v2flow tokenizer tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="Lightning checkpoint -> pretrained directory")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--weights", choices=["ema", "current"], default="ema", help="EMA (default) or raw weights")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override sample_* decode defaults")

    p = sub.add_parser("encode", help="image files -> token ids")
    p.add_argument("tokenizer", help="pretrained tokenizer directory")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output .json or .pt")
    p.add_argument("--resize", action="store_true", help="resize and centre-crop images to the tokenizer's size")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (memory stays bounded)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("decode", help="token ids -> images")
    p.add_argument("tokenizer")
    p.add_argument("ids", help=".json or .pt written by `v2flow encode` (or a (B, N) list / tensor)")
    p.add_argument("-o", "--output", required=True, help="output folder for PNG files")
    _decode_options(p)

    p = sub.add_parser("reconstruct", help="image files -> ids -> images, with a comparison grid")
    p.add_argument("tokenizer")
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--resize", action="store_true")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (memory stays bounded)")
    p.add_argument("--grid-size", type=int, default=16, help="images in comparison.png (the first ones)")
    _decode_options(p)

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
    p.add_argument("--device", default="cpu")

    a = parser.parse_args(argv)
    commands = {
        "export": _export,
        "encode": _encode,
        "decode": _decode,
        "reconstruct": _reconstruct,
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
        device=a.device,
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
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(ckpt, dict) and "v2flow_classifier_config" in ckpt:
        return "classifier"
    if isinstance(ckpt, dict) and "v2flow_lm_layout" in ckpt:
        return "lm"
    return "tokenizer"


def _export(a: argparse.Namespace) -> int:
    from .training import tokenizer_from_checkpoint

    out = Path(a.output)
    if out.exists() and not a.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    kind = _checkpoint_kind(a.checkpoint)
    if kind != "tokenizer" and a.set:
        raise ValueError("--set applies to tokenizer checkpoints only")
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
    import yaml

    from .tokenizer import V2FlowTokenizer

    tokenizer = tokenizer_from_checkpoint(a.checkpoint, weights=a.weights)
    overrides = {}
    for item in a.set:
        key, _, value = item.partition("=")
        if not key.startswith("sample_") or key not in tokenizer.config:
            raise ValueError(
                f"--set accepts the decode defaults only: {[k for k in tokenizer.config if k.startswith('sample_')]}"
            )
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
    ids = data["ids"] if isinstance(data, dict) else data
    names = data.get("files") if isinstance(data, dict) else None
    ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)
    return ids, names


def _encode(a: argparse.Namespace) -> int:
    import torch

    from .tokenizer import V2FlowTokenizer

    tokenizer = V2FlowTokenizer.from_pretrained(a.tokenizer, map_location=a.device)
    files = _image_files(a.inputs)
    batches = _image_batches(files, tokenizer, a.resize, a.batch_size, "encoding")
    ids = torch.cat([tokenizer.encode(images.to(a.device)).ids.cpu() for images in batches])
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
    images = tokenizer.decode(ids.to(a.device), **_decode_kwargs(a, a.device)).images
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
    kwargs = _decode_kwargs(a, a.device)  # one generator for the whole stream
    psnr, ssim = [], StructuralSimilarityIndexMeasure(data_range=2.0).to(a.device)
    shown: list[torch.Tensor] = []
    done = 0
    for images in _image_batches(files, tokenizer, a.resize, a.batch_size, "reconstructing"):
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOL_COMMANDS:
        try:
            return tool_main(argv)
        except (ValueError, FileNotFoundError, FileExistsError) as err:
            print(f"v2flow {argv[0]}: error: {err}", file=sys.stderr)
            return 2
    if argv and argv[0] in ("lm", "classifier"):
        lightning_cli(argv[1:], task=argv[0])
        return 0
    lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
