"""Decode settings: one type for the six choices that shape a decode, validated in one place.

A tokenizer stores its defaults in its config as ``sample_steps``, ``sample_solver``, ``sample_iters``,
``sample_cfg``, ``sample_shift`` and ``sample_temperature``; :meth:`DecodeSettings.from_config` reads them and
:meth:`DecodeSettings.resolve` lays a caller's explicit choices over them.

A default only applies where it means something: the checkpoint's ``sample_shift`` shapes the grid of the
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

# config key of each decode setting
CONFIG_KEYS = {
    "num_steps": "sample_steps",
    "solver": "sample_solver",
    "num_iters": "sample_iters",
    "cfg_scale": "sample_cfg",
    "shift": "sample_shift",
    "temperature": "sample_temperature",
}


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
    """

    num_steps: int = 8
    solver: str = "euler"
    num_iters: int = 1
    cfg_scale: float = 1.0
    shift: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        steps = _whole("num_steps", self.num_steps)
        if steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {steps}")
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
    def from_config(cls, config: dict) -> DecodeSettings:
        """The defaults a tokenizer config stores under its ``sample_*`` keys."""
        try:
            return cls(**{name: config[key] for name, key in CONFIG_KEYS.items()})
        except ValueError as err:
            raise ValueError(f"the config's sample_* decode defaults are invalid: {err}") from err

    def resolve(self, **given) -> DecodeSettings:
        """These settings (the defaults) with the caller's explicit choices laid over them.

        `given` holds keyword values, None meaning "not given". The default shift does not follow a given
        ``solver="dopri5"``: it only shapes fixed grids, so dopri5 decodes with shift 1 unless a shift is given.
        """
        unknown = sorted(set(given) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown decode settings {unknown}; valid ones are {list(CONFIG_KEYS)}")
        chosen = {k: v for k, v in given.items() if v is not None}
        if chosen.get("solver") == "dopri5" and "shift" not in chosen:
            chosen["shift"] = 1.0
        return DecodeSettings(**{**asdict(self), **chosen})

    def to_config(self) -> dict:
        """The ``sample_*`` config entries of these settings."""
        return {CONFIG_KEYS[f.name]: getattr(self, f.name) for f in fields(self)}

    def as_dict(self) -> dict:
        return asdict(self)
