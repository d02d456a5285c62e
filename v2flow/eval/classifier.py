"""A small CNN trained by the project itself: the judge of generated digits and the feature extractor of
Frechet distances on MNIST (no Inception weights exist offline, and Inception features mean little on
32x32 grey digits anyway).

* :class:`DigitClassifier`: the network (``features`` gives the penultimate layer), saved as
  ``config.json`` + ``model.safetensors``.
* :class:`PretrainedClassifier`: a saved classifier as the judge that the LM fine-tune receives from its config.
* :class:`ClassifierModule`: its Lightning training (``v2flow classifier fit --config
  configs/classifier_mnist.yaml``), with random-translation augmentation and accuracy from torchmetrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..hub import CONFIG_NAME, WEIGHTS_NAME, save_weights, staged_directory
from ..training import DisplayCallbacks, adamw_warmup_cosine

# ---------------------------------------------------------------------------- the network


class DigitClassifier(nn.Module):
    """Conv(3x3) x 2 -> pool -> Conv(3x3) x 2 -> pool -> linear features -> linear logits.

    Args:
        image_size: side of the square input (a multiple of 4).
        in_channels: image channels.
        num_classes: output classes.
        width: channels of the first two convolutions (doubled after the first pooling).
        feature_dim: size of the penultimate features (the Frechet-distance space).
        dropout: dropout before the last layer.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 128,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        if min(in_channels, num_classes, width, feature_dim) < 1:
            raise ValueError("in_channels, num_classes, width and feature_dim must be >= 1")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = {
            "image_size": image_size,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "feature_dim": feature_dim,
            "dropout": dropout,
        }
        self.num_features = feature_dim  # read by torchmetrics' Frechet distance

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(in_channels, width), block(width, 2 * width))
        self.project = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def check_images(self, images: torch.Tensor) -> None:
        c, s = self.config["in_channels"], self.config["image_size"]
        if images.ndim != 4 or images.shape[1:] != (c, s, s):
            raise ValueError(f"images must be (B, {c}, {s}, {s}) in [-1, 1], got shape {tuple(images.shape)}")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate features."""
        self.check_images(images)
        return self.project(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """(B,) predicted classes, in eval mode, batch by batch."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(chunk).argmax(-1) for chunk in images.split(batch_size)])
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into `path`, atomically (:func:`v2flow.hub.staged_directory`;
        an existing classifier directory is replaced only with `overwrite`)."""
        with staged_directory(path, marker=CONFIG_NAME, overwrite=overwrite) as staged:
            (staged / CONFIG_NAME).write_text(json.dumps({"class": "DigitClassifier", **self.config}, indent=1) + "\n")
            save_weights(self.state_dict(), staged / WEIGHTS_NAME)
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DigitClassifier:
        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).exists():
                raise FileNotFoundError(f"{path / name} is missing; is {path} a DigitClassifier directory?")
        config = json.loads((path / CONFIG_NAME).read_text())
        if config.pop("class", None) != "DigitClassifier":
            raise ValueError(f"{path / CONFIG_NAME} does not describe a DigitClassifier")
        model = cls(**config)
        model.load_state_dict(load_file(path / WEIGHTS_NAME, device=str(map_location)))
        return model.eval()


class PretrainedClassifier:
    """A saved :class:`DigitClassifier` as the judge of generated digits, read at its first use.

    The LM fine-tune (:class:`~v2flow.lm_training.ImageLMModule`) receives its judge as an object built from the
    config, so the training code never reads a classifier itself::

        judge:
          class_path: v2flow.eval.classifier.PretrainedClassifier
          init_args:
            path: checkpoints/mnist-classifier

    The constructor only checks that `path` holds a classifier's two files, so a wrong path fails when the config
    is read rather than at the first validation; the weights are read by the first :meth:`predict`, onto the
    images' device, frozen and in eval mode.

    Args:
        path: a :class:`DigitClassifier` directory (``config.json`` + ``model.safetensors``).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / name} is missing; the judge must be a DigitClassifier directory")
        self._model: DigitClassifier | None = None

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B,) predicted classes, on the images' device."""
        if self._model is None:
            self._model = DigitClassifier.from_pretrained(self.path, map_location=images.device).requires_grad_(False)
        return self._model.to(images.device).predict(images)


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by a random integer offset in [-max_shift, max_shift]^2, filling with background (-1)."""
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator, device="cpu").tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


# ---------------------------------------------------------------------------- training


class ClassifierModule(DisplayCallbacks):
    """Cross-entropy training of a :class:`DigitClassifier` on ``(images, labels)`` batches.

    Args:
        classifier: the network.
        lr, weight_decay: AdamW settings.
        warmup_steps, min_lr_ratio: the warm-up + cosine schedule.
        max_shift: random-translation augmentation, in pixels.
        seed: seed of the augmentation stream.
    """

    def __init__(
        self,
        classifier: DigitClassifier,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
        max_shift: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["classifier"])
        self.classifier = classifier
        classes = classifier.config["num_classes"]
        self.accuracy = nn.ModuleDict({s: MulticlassAccuracy(classes, average="micro") for s in ("val", "test")})
        self._generator = torch.Generator().manual_seed(seed)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        images = random_translate(images, self.hparams.max_shift, self._generator)
        loss = F.cross_entropy(self.classifier(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self.classifier(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.accuracy[stage].update(logits, labels)
        self.log(f"{stage}/accuracy", self.accuracy[stage], prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.trainer, list(self.classifier.parameters()), [], self.hparams)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["v2flow_classifier_config"] = dict(self.classifier.config)


def classifier_from_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> DigitClassifier:
    """Rebuild the trained :class:`DigitClassifier` from a :class:`ClassifierModule` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or "v2flow_classifier_config" not in ckpt:
        raise ValueError(f"{path} is not a classifier checkpoint (no 'v2flow_classifier_config')")
    model = DigitClassifier(**ckpt["v2flow_classifier_config"])
    prefix = "classifier."
    model.load_state_dict({k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    return model.eval()
