"""The cross-component rules of a tokenizer config: what each key may be given the others.

Each part validates its own arguments at construction; the rules here span parts (sizes that must divide,
keys that only mean something in one mode). A key of another mode with a value other than its default is
refused rather than silently ignored.
"""

from __future__ import annotations

from .checks import check_statistics
from .objective import check_objective_config
from .velocity_transformer import VELOCITY_DECODERS

TOKEN_ORDERS = ("unordered", "ordered")

# keys that mean something in one mode only: (key, whether it applies, the mode it belongs to). A value other
# than the default in another mode is refused rather than silently ignored.
_MODE_KEYS = (
    ("codebook_size", lambda c: c["quantizer"] == "vq", "quantizer='vq'"),
    ("code_dim", lambda c: c["quantizer"] == "vocab" and c["estimator"] == "projected", "estimator='projected'"),
    ("estimator", lambda c: c["quantizer"] == "vocab", "quantizer='vocab'"),
    ("vocab_selection", lambda c: c["quantizer"] == "vocab", "quantizer='vocab'"),
    ("prefix_sampling", lambda c: c["truncation_prob"] > 0, "truncation_prob > 0"),
    ("truncation_tail", lambda c: c["truncation_prob"] > 0, "truncation_prob > 0"),
    ("time_mean", lambda c: c["time_sampling"] != "uniform", "time_sampling='logit_normal' or 'mixture'"),
    ("time_std", lambda c: c["time_sampling"] != "uniform", "time_sampling='logit_normal' or 'mixture'"),
    ("time_uniform_share", lambda c: c["time_sampling"] == "mixture", "time_sampling='mixture'"),
)


def refuse_keys_of_other_modes(config: dict, defaults: dict) -> None:
    """Raise a ValueError for a key of ``_MODE_KEYS`` set away from its default where it does not apply."""
    for key, applies, mode in _MODE_KEYS:
        if config[key] != defaults[key] and not applies(config):
            raise ValueError(
                f"{key}={config[key]!r} applies to {mode} only and this config would ignore it; "
                f"remove {key} or choose {mode}"
            )


def check_tokenizer_config(config: dict, defaults: dict) -> None:
    """Raise a ValueError naming the keys for a config whose keys do not fit together (`defaults`: the
    constructor's default of every key)."""
    image_size, patch_size = config["image_size"], config["patch_size"]
    if image_size % patch_size:
        raise ValueError(
            f"image_size {image_size} is not a multiple of patch_size {patch_size}; "
            f"choose image_size = k * {patch_size}"
        )
    if config["velocity_decoder"] not in VELOCITY_DECODERS:
        raise ValueError(f"unknown velocity_decoder {config['velocity_decoder']!r}; choose one of {VELOCITY_DECODERS}")
    if config["velocity_decoder"] == "transformer" and (config["decode"] or {}).get("num_iters", 1) != 1:
        raise ValueError("velocity_decoder='transformer' decodes every patch at once: set decode num_iters: 1")
    if config["token_order"] not in TOKEN_ORDERS:
        raise ValueError(f"unknown token_order {config['token_order']!r}; choose one of {TOKEN_ORDERS}")
    if config["order_stages"] is not None and config["token_order"] != "ordered":
        raise ValueError("order_stages applies to token_order='ordered' only")
    if config["first_stage"] != "autoencoder" and (
        config["autoencoder"] is not None or config["autoencoder_subfolder"] is not None
    ):
        raise ValueError("autoencoder / autoencoder_subfolder apply to first_stage='autoencoder' only")
    check_statistics(config["input_statistics"])
    check_objective_config(config)
    refuse_keys_of_other_modes(config, defaults)
