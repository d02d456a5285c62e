import numpy as np
import pytest
import torch
from PIL import Image

from v2flow.data import (
    ImageFolderDataModule,
    MNISTDataModule,
    PhotoCropsDataModule,
    list_images,
    load_image,
    load_mnist,
)


def test_mnist_splits_and_range():
    images, labels = load_mnist("test")
    assert images.shape == (10_000, 1, 32, 32) and labels.shape == (10_000,)
    assert images.min() == -1 and images.max() <= 1
    assert (images[:, :, :2] == -1).all(), "padding must be background"
    dm = MNISTDataModule(batch_size=8, train_limit=16, val_limit=8)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32) and len(dm.val_set) == 8
    with pytest.raises(ValueError, match="unknown MNIST split"):
        load_mnist("dev")


def _write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_load_image_modes(tmp_path):
    rgb = _write(tmp_path / "rgb.png", np.random.randint(0, 255, (20, 30, 3), dtype=np.uint8))
    rgba = _write(tmp_path / "rgba.png", np.random.randint(0, 255, (20, 30, 4), dtype=np.uint8))
    sixteen = _write(tmp_path / "16.png", (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))
    pal = tmp_path / "pal.png"
    Image.fromarray(np.random.randint(0, 255, (20, 30, 3), dtype=np.uint8)).convert("P").save(pal)
    for path in (rgb, rgba, sixteen, pal):
        for channels in (1, 3):
            img = load_image(path, channels)
            assert img.shape == (channels, 20, 30) and img.min() >= -1 and img.max() <= 1
    resized = load_image(rgb, 3, size=16)
    assert resized.shape == (3, 16, 16)
    top = load_image(sixteen, 1)
    assert top.max() > 0.5, "16-bit images must keep their dynamic range"


def test_corrupt_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(bad)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg"):
        load_image(empty)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="holds no image files"):
        ImageFolderDataModule(str(tmp_path / "empty")).setup("fit")
    for i in range(6):
        _write(tmp_path / "imgs" / f"sub{i % 2}" / f"{i}.png", np.random.randint(0, 255, (40, 50, 3), dtype=np.uint8))
    dm = ImageFolderDataModule(str(tmp_path / "imgs"), image_size=16, batch_size=2, val_fraction=0.2)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and len(dm.train_set) + len(dm.val_set) == 6


def test_photo_crops_hold_out_photos():
    dm = PhotoCropsDataModule(crop_size=32, batch_size=4, train_length=8, val_length=4, test_length=4)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    a = torch.stack([dm.val_set[i][0] for i in range(4)])
    b = torch.stack([dm.val_set[i][0] for i in range(4)])
    assert torch.equal(a, b), "evaluation crops must be fixed"
    with pytest.raises(ValueError, match="held-out"):
        PhotoCropsDataModule(held_out=("moon",))
