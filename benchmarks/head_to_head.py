"""Head to head: v2flow against a mainstream VQ tokenizer (diffusers' VQModel) at equal bits per image, equal
optimiser steps and equal batch size, on MNIST and on 64x64 crops of the scikit-image photographs.

    python benchmarks/head_to_head.py --datasets mnist photos --max-steps 4400 --batch-size 64 \
        --accelerator auto --out BENCHMARKS.md --runs-dir runs/head_to_head

Per data set there are two operating points, 16 and 64 tokens per image, both at 12 bits per token (a
4,096-entry vocabulary subset for v2flow, a 4,096-entry codebook for the VQ model, whose 4x4 and 8x8 latent
grids give the 16 and 64 tokens). Each model is trained from its configs (``configs/mnist.yaml`` with the
override ``configs/mnist_{16,64}.yaml``; ``configs/photos_16.yaml`` and ``configs/vq_{mnist,photos}_16.yaml``,
each with its 64-token override) through the project's Lightning CLI
(:func:`v2flow.cli.lightning_cli`), with ``--trainer.max_steps``, ``--data.init_args.batch_size`` and
``--trainer.accelerator`` overridden, so a pair differs only in the model; the EMA weights are exported to
``<runs-dir>/<name>/export`` (``--reuse`` loads an export made with the same steps and batch size instead of
training).

Measured:

* train img/s: batch size x timed optimiser steps / their time (forward, backward, optimiser and EMA update,
  from ``on_train_batch_start`` to ``on_train_batch_end``; data loading and validation excluded), after
  ``--warmup-steps`` untimed steps.
* PSNR, SSIM, FD (and KID, MS-SSIM in the JSON): :class:`v2flow.metrics.ReconstructionMetrics` on the held-out
  split (MNIST test digits; fixed crops of the held-out photo for photos), reconstructions through the token
  ids. MNIST FD uses the project's digit classifier (``checkpoints/mnist-classifier``) as feature extractor.
  For photos the project has no trained feature extractor; FD is left out unless ``--inception-weights`` gives
  the FID Inception-v3 weights file (not available offline here).
* encode / decode img/s: best of ``--repeats`` timed calls on one batch of ``--speed-batch`` held-out images,
  after a warm-up call; v2flow decodes with its config's ODE steps, solver and noise temperature (stated in the
  table), the VQ model with one decoder pass. ``--v2flow-decode default num_steps=2,temperature=0`` evaluates
  each v2flow model at several decode settings, one row (and one goal verdict) each: a flow decoder trades
  PSNR (best near temperature 0, the mean-like decode) against sample sharpness (FD, best at temperature 1).
* params: trainable parameters (v2flow also holds its frozen K x d_llm LLM rows as a buffer, not counted).

Writes JSON (``--json``, one entry per data set, merged with what the file holds) and prints the markdown; with
``--out`` it also replaces (or appends) this data set's section of that file, between
``<!-- head_to_head:<dataset>:start -->`` and ``<!-- head_to_head:<dataset>:end -->``. The table and the goal
verdicts: :mod:`v2flow.eval.head_to_head`.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from v2flow.eval.head_to_head import (
    DATASETS,
    DECODE_KEYS,
    KINDS,
    decode_setting,
    goal_verdicts,
    markdown_section,
    parse_decode,
)
from v2flow.eval.report import device_name, merge_json, replace_section

ROOT = Path(__file__).resolve().parent.parent
TRAIN_STATS = "head_to_head_train.json"


# ---------------------------------------------------------------------------- training


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Times optimiser steps after `warmup_steps` (from batch start to batch end, so data loading and
    validation are excluded) and counts their images."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.seconds, self.steps, self.images = 0.0, 0, 0
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.warmup_steps:
            synchronize(pl_module.device)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._start is None:
            return
        synchronize(pl_module.device)
        self.seconds += time.perf_counter() - self._start
        self.steps += 1
        self.images += len(batch[0] if isinstance(batch, (list, tuple)) else batch)
        self._start = None

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None


def config_paths(dataset: str, kind: str, tokens: int) -> list[Path]:
    """The configs of one model, in the order the Lightning CLI merges them (an override after its base)."""
    configs = ROOT / "configs"
    if kind == "v2flow" and dataset == "mnist":  # small overrides of configs/mnist.yaml
        return [configs / "mnist.yaml", configs / f"mnist_{tokens}.yaml"]
    prefix = "vq_" if kind == "vq" else ""
    base = configs / f"{prefix}{dataset}_16.yaml"  # the 64-token configs override the 16-token ones
    return [base] if tokens == 16 else [base, configs / f"{prefix}{dataset}_{tokens}.yaml"]


def load_export(kind: str, path: Path):
    if kind == "v2flow":
        from v2flow import V2FlowTokenizer

        return V2FlowTokenizer.from_pretrained(path)
    from v2flow.eval.baseline import VQTokenizer

    return VQTokenizer.from_pretrained(path)


def train(dataset: str, kind: str, tokens: int, a: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one model through the Lightning CLI (or load its export with --reuse); returns (tokenizer, stats)."""
    from v2flow.cli import lightning_cli

    name = f"{dataset}_{kind}_{tokens}"
    run_dir = Path(a.runs_dir) / name
    export = run_dir / "export"
    stats_file = run_dir / TRAIN_STATS
    if a.reuse and export.is_dir() and stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        if (stats["max_steps"], stats["batch_size"]) != (a.max_steps, a.batch_size):
            raise SystemExit(
                f"{export} was trained with {stats['max_steps']} steps at batch {stats['batch_size']}, not "
                f"{a.max_steps} at {a.batch_size}; drop --reuse or choose another --runs-dir"
            )
        print(f"[{name}] reusing {export}", flush=True)
        return load_export(kind, export), stats
    config = config_paths(dataset, kind, tokens)
    args = [
        *(arg for path in config for arg in ("--config", str(path))),
        f"--trainer.max_steps={a.max_steps}",
        f"--trainer.accelerator={a.accelerator}",
        f"--data.init_args.batch_size={a.batch_size}",
        f"--trainer.logger.init_args.save_dir={a.runs_dir}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.enable_progress_bar={str(a.progress).lower()}",
    ]
    if a.precision:
        args.append(f"--trainer.precision={a.precision}")
    config_text = " + ".join(str(c.relative_to(ROOT)) for c in config)
    print(f"[{name}] training {config_text} for {a.max_steps} steps at batch {a.batch_size}", flush=True)
    with warnings.catch_warnings():  # "args given and sys.argv too": the script's own flags are in sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = lightning_cli(args, run=False, task="tokenizer" if kind == "v2flow" else "vq")
    timer = StepTimer(min(a.warmup_steps, max(a.max_steps - 1, 0)))
    cli.trainer.callbacks.append(timer)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    if cli.trainer.global_step != a.max_steps:
        raise RuntimeError(f"[{name}] stopped at step {cli.trainer.global_step}, not {a.max_steps}")
    tokenizer = cli.model.tokenizer  # the EMA callback copies the averaged weights in when training ends
    tokenizer.cpu().save_pretrained(export)
    stats = {
        "config": config_text,
        "max_steps": a.max_steps,
        "batch_size": a.batch_size,
        "accelerator": a.accelerator,
        "device": str(cli.trainer.strategy.root_device),
        "precision": str(cli.trainer.precision),
        "train_seconds": round(seconds, 2),
        "timed_steps": timer.steps,
        "train_images_per_second": timer.images_per_second,
        "export": str(export),
    }
    stats_file.write_text(json.dumps(stats, indent=1) + "\n")
    return load_export(kind, export), stats  # evaluate what was saved


# ---------------------------------------------------------------------------- evaluation


def held_out_images(dataset: str, limit: int) -> torch.Tensor:
    """The held-out evaluation images (n, C, H, W) in [-1, 1]: MNIST test digits or the fixed photo crops."""
    if dataset == "mnist":
        from v2flow.data import load_mnist

        images = load_mnist("test")[0]
    else:
        from v2flow.data import PhotoCropsDataModule

        module = PhotoCropsDataModule(crop_size=64)
        module.setup("test")
        images = torch.stack([module.test_set[i][0] for i in range(len(module.test_set))])
    return images[: limit or len(images)]


def feature_extractor(dataset: str, a: argparse.Namespace) -> tuple[torch.nn.Module | None, str]:
    """The FD feature extractor of a data set and a note naming it (or why there is none)."""
    if dataset == "mnist":
        from v2flow.eval.classifier import DigitClassifier

        path = Path(a.classifier).resolve()
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        note = f"features of the project's digit classifier (`{shown}`)"
        return DigitClassifier.from_pretrained(a.classifier), note
    if a.inception_weights:
        from v2flow.metrics import inception_extractor

        return inception_extractor(a.inception_weights), "Inception-v3 pool features (FID weights)"
    return None, (
        "omitted: the project trains no feature extractor for natural images and the FID Inception-v3 "
        "weights are not available offline (pass --inception-weights FILE to add it)"
    )


def num_codes(tokenizer) -> int:
    return tokenizer.resampler.num_codes if hasattr(tokenizer, "resampler") else tokenizer.num_codes


def decode(tokenizer, ids: torch.Tensor, seed: int, settings: dict[str, Any]) -> torch.Tensor:
    if hasattr(tokenizer, "resampler"):  # v2flow: the flow ODE starts from seeded noise
        generator = torch.Generator(device=ids.device).manual_seed(seed)
        return tokenizer.decode(ids, generator=generator, **settings).images
    return tokenizer.decode(ids).images


def best_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def evaluate(
    tokenizer, images: torch.Tensor, extractor, a: argparse.Namespace, settings: dict[str, Any]
) -> dict[str, Any]:
    from v2flow.metrics import ReconstructionMetrics

    device = torch.device(a.device)
    tokenizer = tokenizer.to(device).eval()
    metrics = ReconstructionMetrics(feature_extractor=extractor, device=device, seed=a.seed)
    for i, batch in enumerate(images.split(a.eval_batch_size)):
        batch = batch.to(device)
        encoded = tokenizer.encode(batch)
        metrics.update(decode(tokenizer, encoded.ids, a.seed + i, settings), batch)
        metrics.update_tokens(encoded.indices, num_codes(tokenizer))
    result = metrics.compute()
    speed_batch = images[: a.speed_batch].to(device)
    ids = tokenizer.encode(speed_batch).ids
    encode_s = best_time(lambda: tokenizer.encode(speed_batch), a.repeats, device)
    decode_s = best_time(lambda: decode(tokenizer, ids, a.seed, settings), a.repeats, device)
    result |= {
        "params": sum(p.numel() for p in tokenizer.parameters() if p.requires_grad),
        "tokens": ids.shape[1],
        "decode_setting": decode_setting(tokenizer, settings),
        "decode_overrides": settings,
        "speed_batch": len(speed_batch),
        "encode_images_per_second": len(speed_batch) / encode_s,
        "decode_images_per_second": len(speed_batch) / decode_s,
    }
    tokenizer.cpu()
    return result


# ---------------------------------------------------------------------------- main


def run_dataset(dataset: str, a: argparse.Namespace) -> dict[str, Any]:
    images = held_out_images(dataset, a.limit_eval)
    extractor, fd_note = feature_extractor(dataset, a)
    models = []
    for tokens in a.tokens:
        for kind in KINDS:
            tokenizer, stats = train(dataset, kind, tokens, a)
            name = "v2flow" if kind == "v2flow" else "VQ (diffusers VQModel)"
            for overrides in a.v2flow_decode if kind == "v2flow" else [{}]:
                shown = decode_setting(tokenizer, overrides)
                print(f"[{dataset}_{kind}_{tokens}] evaluating on {len(images)} held-out images ({shown})", flush=True)
                result = evaluate(tokenizer, images, extractor, a, overrides)
                models.append({"model": name, "kind": kind, "train": stats, "eval": result})
    train_device, eval_device = device_name(models[0]["train"]["device"]), device_name(a.device)
    if train_device != eval_device:
        train_device = f"trained on {train_device}, evaluated on {eval_device}"
    settings = {
        "max_steps": a.max_steps,
        "batch_size": a.batch_size,
        "device": train_device,
        "date": time.strftime("%Y-%m-%d"),
        "eval_images": len(images),
        "speed_batch": min(a.speed_batch, len(images)),
        "repeats": a.repeats,
        "seed": a.seed,
    }
    entry = {"settings": settings, "fd_note": fd_note, "models": models}
    entry["goal"] = goal_verdicts(models)
    return entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--tokens", nargs="+", type=int, choices=(16, 64), default=[16, 64], help="operating points")
    p.add_argument("--max-steps", type=int, default=4400, help="optimiser steps of every model")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size of every model")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator for training")
    p.add_argument("--precision", default=None, help="override the configs' trainer.precision (e.g. bf16-mixed)")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps before train img/s is measured")
    p.add_argument("--runs-dir", default="runs/head_to_head", help="logs and exports, one folder per model")
    p.add_argument("--reuse", action="store_true", help="load an export trained with these steps and batch size")
    p.add_argument("--limit-eval", type=int, default=0, help="first n held-out images only (0 = all)")
    p.add_argument("--eval-batch-size", type=int, default=250)
    p.add_argument("--speed-batch", type=int, default=256, help="images per timed encode / decode call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the best is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="evaluation device")
    p.add_argument("--classifier", default=str(ROOT / "checkpoints" / "mnist-classifier"), help="MNIST FD features")
    p.add_argument("--inception-weights", default=None, help="FID Inception-v3 weights file, for the photos FD")
    p.add_argument("--seed", type=int, default=0, help="decode noise and KID subsets")
    p.add_argument(
        "--v2flow-decode",
        nargs="+",
        type=parse_decode,
        default=[{}],
        metavar="SETTING",
        help="v2flow decode settings, one table row each: 'default' (the config's) or key=value pairs joined by "
        f"commas, keys {', '.join(DECODE_KEYS)} (e.g. default num_steps=2,temperature=0)",
    )
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "head_to_head.json"))
    p.add_argument("--out", default=None, help="markdown file whose head-to-head sections are replaced")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    a = p.parse_args(argv)
    if a.max_steps < 1 or a.batch_size < 1:
        p.error(f"--max-steps and --batch-size must be >= 1, got {a.max_steps} and {a.batch_size}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for dataset in a.datasets:
        entry = run_dataset(dataset, a)
        merge_json(a.json, dataset, entry)
        section = markdown_section(dataset, entry)
        if a.out:
            replace_section(a.out, f"head_to_head:{dataset}", section)
        print("\n" + section, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
