"""DecodeSettings: one validated type for the decode choices; checkpoint defaults apply only where they mean
something."""

import math

import pytest
import torch

from v2flow.settings import NAMES, DecodeSettings, upgrade_config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shift": 0}, "shift must be > 0"),
        ({"shift": -2.0}, "shift must be > 0"),
        ({"shift": float("nan")}, "shift must be finite"),
        ({"shift": 1e-12}, "squeezes the 8-step time grid"),
        ({"cfg_scale": float("nan")}, "cfg_scale must be finite"),
        ({"cfg_scale": math.inf}, "cfg_scale must be finite"),
        ({"num_steps": 2.5}, "num_steps must be a whole number"),
        ({"num_steps": True}, "num_steps must be a whole number"),
        ({"num_steps": 0}, "num_steps must be >= 1"),
        ({"num_iters": 1.0}, "num_iters must be a whole number"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": "1"}, "temperature must be a real number"),
        ({"solver": "heun"}, "unknown solver 'heun'"),
        ({"solver": "dopri5", "shift": 2.0}, "dopri5 is adaptive"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeSettings(**kwargs)


def test_extreme_shift_warns():
    with pytest.warns(UserWarning, match="almost every step"):
        DecodeSettings(shift=0.01)
    with pytest.warns(UserWarning, match="almost every step"):
        DecodeSettings(shift=50.0)


def test_checkpoint_shift_does_not_follow_dopri5():
    defaults = DecodeSettings(num_steps=2, shift=2.0, temperature=0.0)
    assert defaults.resolve(solver="dopri5").shift == 1.0  # the default shift means nothing to dopri5
    assert defaults.resolve(solver="rk4").shift == 2.0  # ... but shapes every fixed grid
    with pytest.raises(ValueError, match="dopri5 is adaptive"):
        defaults.resolve(solver="dopri5", shift=3.0)  # a shift the caller gave is an error, not ignored
    chosen = defaults.resolve(num_steps=4, cfg_scale=None)
    assert (chosen.num_steps, chosen.cfg_scale, chosen.temperature) == (4, 1.0, 0.0)
    with pytest.raises(ValueError, match="unknown decode settings"):
        defaults.resolve(steps=3)


def test_config_round_trip_uses_the_same_names():
    settings = DecodeSettings(num_steps=3, solver="rk4", num_iters=2, cfg_scale=1.5, shift=2, temperature=0)
    config = settings.as_dict()
    assert tuple(config) == NAMES
    assert DecodeSettings.from_config(config) == settings
    assert DecodeSettings.from_config(None) == DecodeSettings()
    assert isinstance(settings.shift, float) and isinstance(settings.num_steps, int)
    with pytest.raises(ValueError, match="shift must be > 0"):
        DecodeSettings.from_config({**config, "shift": 0})
    with pytest.raises(ValueError, match=r"unknown decode settings \['sample_steps'\]"):
        DecodeSettings.from_config({"sample_steps": 2})


def test_configs_of_older_exports_are_read_with_the_one_name():
    old = {"num_tokens": 4, "sample_steps": 3, "sample_shift": 2.0, "sample_entropy_weight": 0.1}
    assert upgrade_config(old) == {
        "num_tokens": 4,
        "sample_entropy_weight": 0.1,  # a training weight, not a decode setting
        "decode": {"num_steps": 3, "shift": 2.0},
    }
    assert upgrade_config({"decode": {"num_steps": 2}}) == {"decode": {"num_steps": 2}}


def test_tokenizer_decode_validates_and_resolves(tokenizer, images):
    ids = tokenizer.encode(images).ids
    for kwargs, message in [
        ({"shift": 0}, "shift must be > 0"),
        ({"cfg_scale": float("nan")}, "cfg_scale must be finite"),
        ({"num_steps": 2.5}, "whole number"),
        ({"shift": 1e-12}, "squeezes"),
    ]:
        with pytest.raises(ValueError, match=message):
            tokenizer.decode(ids, **kwargs)
    tokenizer.decode_defaults = DecodeSettings(shift=2.0)  # a checkpoint whose default shift is not 1 ...
    out = tokenizer.decode(ids, solver="dopri5", generator=torch.Generator().manual_seed(0))  # ... decodes dopri5
    assert torch.isfinite(out.images).all()
