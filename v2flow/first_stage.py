"""First stage: what the tokenizer patchifies. Pixels, or the latents of a frozen diffusers autoencoder.

Both expose the same interface: ``encode`` images (B, C, H, W) in [-1, 1] -> latents (B, c, h, w) and
``decode`` latents -> images, plus ``latent_channels`` and ``latent_size``.

The autoencoder first stage is built from its shape alone (``latent_channels``, ``latent_downsample``) and
holds no weights until :meth:`AutoencoderFirstStage.set_autoencoder` installs a frozen diffusers model
(``AutoencoderKL``, ``AutoencoderDC``, or any diffusers autoencoder with the same ``encode``/``decode``
outputs). The autoencoder is deliberately *not* a registered submodule: it is frozen, so it stays out of
``state_dict()`` (training checkpoints, EMA copies, DDP broadcasts and optimisers never carry its weights);
device and dtype moves still reach it through :meth:`_apply`. ``V2FlowTokenizer.save_pretrained`` writes it
to an ``autoencoder/`` sub-directory with diffusers' own ``save_pretrained``.

Latents are ``(z - shift_factor) * scaling_factor`` with both factors read from the autoencoder's config
(``shift_factor`` is 0 when the config has none), the convention of diffusers pipelines. Encoding takes the
mean of the posterior (``AutoencoderKL``) or the deterministic latent (``AutoencoderDC``): the tokenizer's
targets are then a function of the image.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

FIRST_STAGES = ("pixels", "autoencoder")


class PixelFirstStage(nn.Module):
    """The identity: latents are the pixels themselves, in [-1, 1].

    Args:
        in_channels: image channels.
        image_size: image height and width.
    """

    def __init__(self, *, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.latent_channels = in_channels
        self.latent_size = image_size

    @property
    def ready(self) -> bool:
        return True

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return latents


def autoencoder_downsample(autoencoder: nn.Module) -> int:
    """Spatial compression of a diffusers autoencoder, from its config."""
    ratio = getattr(autoencoder, "spatial_compression_ratio", None)
    if isinstance(ratio, int):
        return ratio
    config = autoencoder.config
    channels = config.get("block_out_channels") or config.get("encoder_block_out_channels")
    if channels is None:
        raise ValueError(f"cannot tell the spatial compression of {type(autoencoder).__name__} from its config")
    return 2 ** (len(channels) - 1)


class AutoencoderFirstStage(nn.Module):
    """Latents of a frozen diffusers autoencoder.

    Args:
        in_channels: image channels (the autoencoder's ``in_channels``).
        image_size: image height and width (a multiple of `latent_downsample`).
        latent_channels: the autoencoder's latent channels (4 for SD-style VAEs, 16 for SD3/Flux, 32 for DC-AE).
        latent_downsample: its spatial compression (8 for SD-style VAEs, 32 for DC-AE f32).
    """

    def __init__(self, *, in_channels: int, image_size: int, latent_channels: int, latent_downsample: int) -> None:
        super().__init__()
        if latent_channels < 1 or latent_downsample < 1:
            raise ValueError(
                f"latent_channels and latent_downsample must be >= 1, got {latent_channels}, {latent_downsample}"
            )
        if image_size % latent_downsample:
            raise ValueError(
                f"image_size {image_size} is not a multiple of the autoencoder's downsampling {latent_downsample}"
            )
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.latent_downsample = latent_downsample
        self.latent_size = image_size // latent_downsample
        self.__dict__["autoencoder"] = None  # not a submodule: see the module docstring
        self.scaling_factor, self.shift_factor = 1.0, 0.0

    @property
    def ready(self) -> bool:
        return self.autoencoder is not None

    def set_autoencoder(self, autoencoder: nn.Module) -> None:
        """Install a diffusers autoencoder: checked against the configured shape, frozen, put in eval mode."""
        name = type(autoencoder).__name__
        if not (hasattr(autoencoder, "encode") and hasattr(autoencoder, "decode") and hasattr(autoencoder, "config")):
            raise TypeError(f"{name} is not a diffusers autoencoder (needs encode, decode and config)")
        config = autoencoder.config
        found = {
            "in_channels": config.get("in_channels"),
            "latent_channels": config.get("latent_channels"),
            "latent_downsample": autoencoder_downsample(autoencoder),
        }
        expected = {
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "latent_downsample": self.latent_downsample,
        }
        wrong = {k: (expected[k], v) for k, v in found.items() if v != expected[k]}
        if wrong:
            detail = ", ".join(f"{k}: tokenizer {a}, autoencoder {b}" for k, (a, b) in wrong.items())
            raise ValueError(
                f"the {name} does not match the tokenizer config ({detail}); set the tokenizer's keys to the autoencoder's"
            )
        autoencoder.requires_grad_(False).eval()
        self.__dict__["autoencoder"] = autoencoder
        self.scaling_factor = float(config.get("scaling_factor") or 1.0)
        self.shift_factor = float(config.get("shift_factor") or 0.0)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.autoencoder is not None:
            self.autoencoder._apply(fn, recurse)
        return self

    def __deepcopy__(self, memo: dict) -> AutoencoderFirstStage:
        # copies (EMA's averaged model, for one) share the frozen autoencoder instead of duplicating its weights
        if self.autoencoder is not None:
            memo[id(self.autoencoder)] = self.autoencoder
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def train(self, mode: bool = True) -> AutoencoderFirstStage:
        super().train(mode)
        return self  # the autoencoder stays in eval mode

    def _require(self, device: torch.device) -> nn.Module:
        if self.autoencoder is None:
            raise RuntimeError(
                "this tokenizer's first stage has no autoencoder installed; load a trained tokenizer with "
                "from_pretrained, or install one with tokenizer.set_autoencoder(load_autoencoder(path))"
            )
        weight = next(self.autoencoder.parameters())
        if weight.device != device:  # e.g. a strategy that moved parameters one by one; the autoencoder follows
            self.autoencoder.to(device)
        return self.autoencoder

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f)."""
        autoencoder = self._require(images.device)
        out = autoencoder.encode(images)
        latent_dist = getattr(out, "latent_dist", None)
        latents = latent_dist.mode() if latent_dist is not None else out.latent
        return ((latents - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> images (B, C, h*f, w*f), roughly in [-1, 1] (not clipped)."""
        autoencoder = self._require(latents.device)
        return autoencoder.decode(latents / self.scaling_factor + self.shift_factor).sample.float()


def build_first_stage(
    kind: str,
    *,
    in_channels: int,
    image_size: int,
    latent_channels: int | None = None,
    latent_downsample: int | None = None,
) -> nn.Module:
    if kind == "pixels":
        if latent_channels is not None or latent_downsample is not None:
            raise ValueError("latent_channels / latent_downsample apply to first_stage='autoencoder' only")
        return PixelFirstStage(in_channels=in_channels, image_size=image_size)
    if kind == "autoencoder":
        if latent_channels is None or latent_downsample is None:
            raise ValueError(
                "first_stage='autoencoder' needs latent_channels and latent_downsample "
                "(e.g. 4 and 8 for an SD-style AutoencoderKL)"
            )
        return AutoencoderFirstStage(
            in_channels=in_channels,
            image_size=image_size,
            latent_channels=latent_channels,
            latent_downsample=latent_downsample,
        )
    raise ValueError(f"unknown first_stage {kind!r}; choose one of {FIRST_STAGES}")


def load_autoencoder(
    source: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a diffusers autoencoder from a local directory or a hub id; the class is read from its config.

    Args:
        source: a directory holding ``config.json`` and the weights, or a hub id (e.g.
            ``stabilityai/sd-vae-ft-ema``; needs network access or the hub cache).
        subfolder: a sub-directory of `source` (``"vae"`` in a pipeline repository).
        torch_dtype: dtype of the loaded weights (default: as stored).
    """
    import diffusers

    path = Path(source) / (subfolder or "")
    local = Path(source).exists()
    if local:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no autoencoder config at {config_file}; give a diffusers autoencoder directory "
                "(config.json + diffusion_pytorch_model.safetensors), or its parent with subfolder="
            )
        class_name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
        cls = getattr(diffusers, class_name, None)
        if cls is None or not class_name.startswith("Autoencoder"):
            raise ValueError(f"{config_file} describes a {class_name!r}, not a diffusers autoencoder")
    else:
        cls = diffusers.AutoModel
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        model = cls.from_pretrained(str(source), torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load the autoencoder {source!r}{f' (subfolder {subfolder!r})' if subfolder else ''}: {err}"
        ) from err
    return model.requires_grad_(False).eval()
