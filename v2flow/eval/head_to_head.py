"""What the head-to-head benchmark (``benchmarks/head_to_head.py``) reports: v2flow against diffusers' ``VQModel``
at equal bits per image, as rows of a markdown section with a goal verdict per operating point.

* :func:`parse_decode`, :func:`decode_setting`: the v2flow decode settings a row is measured with, from text and
  in words.
* :func:`goal_verdicts`: per operating point, is v2flow's FD lower than the VQ model's and its PSNR within 1 dB?
* :func:`markdown_section`: one data set's section of the report, as measured.
"""

from __future__ import annotations

import argparse
from typing import Any

DATASETS = ("mnist", "photos")
KINDS = ("v2flow", "vq")
DATASET_TITLES = {
    "mnist": "MNIST, 32x32 digits (held out: the 10k test digits)",
    "photos": "64x64 crops of the scikit-image photographs (held out: fixed crops of the photo 'chelsea')",
}

# v2flow decode setting -> how its command-line value is read (see v2flow.settings.DecodeSettings)
DECODE_KEYS = {
    "num_steps": int,
    "solver": str,
    "num_iters": int,
    "cfg_scale": float,
    "shift": float,
    "temperature": float,
    "mode": str,
}


def parse_decode(text: str) -> dict[str, Any]:
    """``"default"`` -> {} (the config's decode defaults); ``"num_steps=2,temperature=0"`` -> decode keywords."""
    if text == "default":
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in DECODE_KEYS:
            raise argparse.ArgumentTypeError(
                f"bad decode setting {item!r} in {text!r}: write 'default' or key=value pairs joined by commas, "
                f"with keys from {sorted(DECODE_KEYS)}"
            )
        try:
            out[key] = DECODE_KEYS[key](value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad value {value!r} for {key} in {text!r}") from None
    return out


def decode_setting(tokenizer, settings: dict[str, Any]) -> str:
    """The decode a row was measured with, in words (config defaults with `settings` on top)."""
    if not hasattr(tokenizer, "resampler"):
        return "1 decoder pass"
    s = tokenizer.decode_defaults.resolve(**settings)
    if s.mode == "mean":
        return "one-step mean estimate"
    text = f"{s.num_steps} {s.solver} steps x {s.num_iters} iter, T={s.temperature:g}"
    if s.cfg_scale != 1.0:
        text += f", cfg {s.cfg_scale:g}"
    if s.shift != 1.0:
        text += f", shift {s.shift:g}"
    return text


# ---------------------------------------------------------------------------- markdown


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_section(dataset: str, entry: dict[str, Any]) -> str:
    """The markdown of one data set: a heading, the settings, the table and the goal check, as measured."""
    s = entry["settings"]
    lines = [
        f"### Head to head: {DATASET_TITLES[dataset]}",
        "",
        f"v2flow vs diffusers `VQModel` (VQ-VAE / VQGAN architecture, pixel MSE + VQ loss, no GAN or LPIPS), "
        f"trained with the same Lightning harness for **{s['max_steps']} steps at batch {s['batch_size']}** "
        f"(`benchmarks/head_to_head.py`, {s['device']}, {s['date']}). Evaluated on {s['eval_images']} held-out "
        f"images through the token ids; speed on batches of {s['speed_batch']}, best of {s['repeats']}.",
        "",
        "| model | tokens | bits/image | params | train img/s | PSNR (dB) | SSIM | FD | codes used | encode img/s "
        "| decode img/s (at stated steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in entry["models"]:
        r = m["eval"]
        lines.append(
            f"| {m['model']} | {r['tokens']} | {r['bits_per_image']:.0f} | {r['params'] / 1e6:.2f}M "
            f"| {_fmt(m['train']['train_images_per_second'], '.0f')} | {r['psnr']:.2f} | {r['ssim']:.4f} "
            f"| {_fmt(r['fd'], '.3f')} | {r['distinct_ids']} / {r['vocabulary_entries']} "
            f"| {r['encode_images_per_second']:.0f} | {r['decode_images_per_second']:.0f} ({r['decode_setting']}) |"
        )
    lines += ["", f"FD: {entry['fd_note']}.", ""]
    for tokens, verdict in entry["goal"].items():
        lines.append(f"* {tokens} tokens: {verdict}")
    return "\n".join(lines) + "\n"


def goal_verdicts(models: list[dict[str, Any]]) -> dict[str, str]:
    """Per operating point: is v2flow's FD lower than the VQ model's, and its PSNR within 1 dB or better? One
    verdict per v2flow decode setting (rows of the same operating point)."""
    out = {}
    by_tokens: dict[int, dict[str, list[dict]]] = {}
    for m in models:
        by_tokens.setdefault(m["eval"]["tokens"], {}).setdefault(m["kind"], []).append(m["eval"])
    for tokens, rows in sorted(by_tokens.items()):
        if set(rows) != set(KINDS):
            continue
        vq = rows["vq"][0]
        verdicts = []
        for ours in rows["v2flow"]:
            psnr_gap = ours["psnr"] - vq["psnr"]
            met = "met" if psnr_gap >= -1.0 else "not met"
            psnr = f"PSNR {ours['psnr']:.2f} vs {vq['psnr']:.2f} dB ({psnr_gap:+.2f} dB; goal >= -1 dB: {met})"
            if ours["fd"] is None or vq["fd"] is None:
                fd = "FD not measured"
            else:
                met = "met" if ours["fd"] < vq["fd"] else "not met"
                fd = f"FD {ours['fd']:.3f} vs {vq['fd']:.3f} (goal lower: {met})"
            who = "v2flow" if len(rows["v2flow"]) == 1 else f"v2flow ({ours['decode_setting']})"
            verdicts.append(f"{who} vs VQ: {fd}; {psnr}.")
        out[str(tokens)] = " ".join(verdicts)
    return out
