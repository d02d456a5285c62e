"""Decode settings: one type for the seven choices that shape a decode, validated in one place.

The names are the same everywhere: ``decode(num_steps=...)``, a tokenizer config's ``decode: {num_steps: ...}``
(its defaults), ``v2flow decode --num-steps``, ``v2flow export --set num_steps=...``, the training module's
``val_decode`` and the benchmarks' JSON. :meth:`DecodeSettings.resolve` lays a caller's explicit choices over a
tokenizer's defaults.

A default only applies where it means something: the checkpoint's default ``shift`` shapes the grid of the
fixed-step solvers and the flow-matching scheduler, so ``solver="dopri5"`` (adaptive, no grid) decodes with
shift 1 unless the caller passes a shift, which is then an error.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields

import torch

from .sampling import FIXED_SOLVERS, SOLVERS, time_grid

# how tokenizer configs written before the settings had one name spelled them (read, never written)
LEGACY_CONFIG_KEYS = {
    "sample_steps": "num_steps",
    "sample_solver": "solver",
    "sample_iters": "num_iters",
    "sample_cfg": "cfg_scale",
    "sample_shift": "shift",
    "sample_temperature": "temperature",
    "sample_mode": "mode",
}
MODES = ("sample", "mean")


def _whole(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DecodeSettings:
    """How tokens are decoded.

    Args:
        num_steps: ODE steps per mask-schedule iteration (fixed-grid solvers and the scheduler), >= 1.
        solver: ``euler``, ``midpoint``, ``rk4``, ``dopri5`` (adaptive) or ``flow_match_euler``.
        num_iters: mask-schedule iterations (1 = all patches at once), >= 1.
        cfg_scale: classifier-free guidance scale (1 = none); any finite number.
        shift: timestep shift of the grid (SD3 convention; > 1 spends more steps near the noise). Must be 1
            with ``dopri5``.
        temperature: scale of the starting noise, >= 0 (0 is deterministic).
        mode: ``"sample"``, the flow sample (integrate the ODE to t = 0: realism, FD), or ``"mean"``, the
            deterministic fidelity decode: the velocity network's one-step estimate of the clean image,
            ``x_t - t v``, where every token is in play (at t = 1, from the starting noise, for unordered
            tokens; at the last token's entry level for ordered ones); deterministic at temperature 0. It estimates the mean of the images the tokens
            allow, which PSNR and SSIM reward.
    """

    num_steps: int = 8
    solver: str = "euler"
    num_iters: int = 1
    cfg_scale: float = 1.0
    shift: float = 1.0
    temperature: float = 1.0
    mode: str = "sample"

    def __post_init__(self) -> None:
        steps = _whole("num_steps", self.num_steps)
        if steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {steps}")
        if self.mode not in MODES:
            raise ValueError(f"unknown decode mode {self.mode!r}; choose one of {MODES}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {SOLVERS}")
        iters = _whole("num_iters", self.num_iters)
        if iters < 1:
            raise ValueError(f"num_iters must be >= 1, got {iters}")
        cfg = _real("cfg_scale", self.cfg_scale)
        shift = _real("shift", self.shift)
        if shift <= 0:
            raise ValueError(f"shift must be > 0 (1 = the uniform grid), got {shift}")
        temperature = _real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if self.solver == "dopri5" and shift != 1.0:
            raise ValueError(
                f"shift={shift:g} changes the grid of fixed-step solvers only; dopri5 is adaptive: use shift=1.0 "
                f"with dopri5, or a fixed-step solver ({', '.join(FIXED_SOLVERS)}) with this shift"
            )
        if self.solver != "dopri5":
            grid = time_grid(steps, shift)
            if not (
                bool(torch.isfinite(grid).all())
                and abs(float(grid[0]) - 1.0) < 1e-3
                and bool((grid[1:] < grid[:-1]).all())
            ):
                raise ValueError(
                    f"shift={shift:g} squeezes the {steps}-step time grid so that steps coincide in float32 "
                    "or lose its start at t = 1 (the ODE would return NaN or not start from noise); use a shift in [0.1, 10]"
                )
        if not 0.1 <= shift <= 10.0:
            warnings.warn(
                f"shift={shift:g} puts almost every step at the {'noise' if shift > 1 else 'data'} end of the time "
                "grid; shifts in [0.1, 10] are the useful range (1 = uniform)",
                stacklevel=3,
            )
        for name, value in (("num_steps", steps), ("num_iters", iters)):
            object.__setattr__(self, name, value)
        for name, value in (("cfg_scale", cfg), ("shift", shift), ("temperature", temperature)):
            object.__setattr__(self, name, value)

    @classmethod
    def from_config(cls, settings: dict | None) -> DecodeSettings:
        """The settings of a config's ``decode`` entry (a dict of some of the fields; the rest default)."""
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ValueError(f"decode must be a dict of decode settings, got {settings!r}")
        unknown = sorted(set(settings) - set(NAMES))
        if unknown:
            raise ValueError(f"unknown decode settings {unknown}; valid ones are {list(NAMES)}")
        return cls(**settings)

    def resolve(self, **given) -> DecodeSettings:
        """These settings (the defaults) with the caller's explicit choices laid over them.

        `given` holds keyword values, None meaning "not given". The default shift does not follow a given
        ``solver="dopri5"``: it only shapes fixed grids, so dopri5 decodes with shift 1 unless a shift is given.
        """
        unknown = sorted(set(given) - set(NAMES))
        if unknown:
            raise ValueError(f"unknown decode settings {unknown}; valid ones are {list(NAMES)}")
        chosen = {k: v for k, v in given.items() if v is not None}
        if chosen.get("solver") == "dopri5" and "shift" not in chosen:
            chosen["shift"] = 1.0
        return DecodeSettings(**{**asdict(self), **chosen})

    def as_dict(self) -> dict:
        return asdict(self)


NAMES = tuple(f.name for f in fields(DecodeSettings))


def upgrade_config(config: dict) -> dict:
    """A tokenizer config with decode defaults under the ``sample_*`` keys of older exports moved into its
    ``decode`` entry (the same settings under their one name); other configs are returned as they are."""
    legacy = {k: v for k, v in config.items() if k in LEGACY_CONFIG_KEYS}
    if not legacy:
        return config
    rest = {k: v for k, v in config.items() if k not in LEGACY_CONFIG_KEYS}
    return {**rest, "decode": {**(config.get("decode") or {}), **{LEGACY_CONFIG_KEYS[k]: v for k, v in legacy.items()}}}
