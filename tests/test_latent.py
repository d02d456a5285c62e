"""Latent-space tokenizers: a frozen diffusers autoencoder as first stage, latent caching, configs/imagenet256.yaml."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_vocabulary
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file

from v2flow import V2FlowTokenizer
from v2flow.cli import lightning_cli, main
from v2flow.data import LatentCacheDataModule
from v2flow.first_stage import load_autoencoder
from v2flow.latent_cache import cache_latents, read_index


def tiny_autoencoder(levels: int = 2, seed: int = 0) -> AutoencoderKL:
    """A random AutoencoderKL: 3 -> 4 latent channels, downsampling 2 ** (levels - 1)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.5,
        shift_factor=0.1,
    ).eval()


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / "tiny-vae"
    tiny_autoencoder().save_pretrained(path)
    return path


LATENT = {
    **TINY,
    "image_size": 16,
    "in_channels": 3,
    "patch_size": 4,
    "first_stage": "autoencoder",
    "latent_channels": 4,
    "latent_downsample": 2,
}


def latent_tokenizer(autoencoder_dir=None) -> V2FlowTokenizer:
    torch.manual_seed(0)
    tok = V2FlowTokenizer(**LATENT, autoencoder=None if autoencoder_dir is None else str(autoencoder_dir))
    tok.set_vocabulary(tiny_vocabulary(tok.config["num_entries"], tok.config["llm_dim"]))
    tok.set_autoencoder(tiny_autoencoder())
    return tok.eval()


def rgb(n=3, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_autoencoder_first_stage_shapes_and_scaling():
    tok = latent_tokenizer()
    assert tok.num_patches == (8 // 4) ** 2 and tok.patch_dim == 4 * 16
    images = rgb()
    latents = tok.first_stage.encode(images)
    vae = tok.first_stage.autoencoder
    expected = (vae.encode(images).latent_dist.mode() - 0.1) * 0.5
    torch.testing.assert_close(latents, expected)
    out = tok.reconstruct(images)
    assert out.images.shape == images.shape and out.ids.shape == (3, TINY["num_tokens"])
    # the same tokens from the images and from their cached latents
    assert torch.equal(tok.encode(latents=latents).ids, out.ids)
    decoded = tok.decode(out.ids, generator=torch.Generator().manual_seed(0))
    assert decoded.latents.shape == latents.shape
    torch.testing.assert_close(decoded.images, vae.decode(decoded.latents / 0.5 + 0.1).sample.clamp(-1, 1))


def test_loss_from_images_equals_loss_from_latents():
    tok = latent_tokenizer().train()
    images = rgb(4)
    a = tok.loss(images, generator=torch.Generator().manual_seed(3))
    b = tok.loss(latents=tok.first_stage.encode(images), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss)
    a.loss.backward()
    assert all(p.grad is None for p in tok.first_stage.autoencoder.parameters())  # frozen


def test_autoencoder_stays_out_of_state_dict_and_copies():
    tok = latent_tokenizer()
    assert not any("autoencoder" in k for k in tok.state_dict())
    assert not any(p is q for p in tok.parameters() for q in tok.first_stage.autoencoder.parameters())
    clone = copy.deepcopy(tok)
    assert clone.first_stage.autoencoder is tok.first_stage.autoencoder  # shared, not duplicated
    tok.to(torch.float64)
    assert next(tok.first_stage.autoencoder.parameters()).dtype == torch.float64  # moves follow the tokenizer


def test_save_load_round_trip_with_autoencoder(tmp_path):
    tok = latent_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "autoencoder" / "config.json").is_file()
    assert not any("autoencoder" in k for k in load_file(tmp_path / "tok" / "model.safetensors"))
    loaded = V2FlowTokenizer.from_pretrained(tmp_path / "tok")
    images = rgb()
    a = tok.reconstruct(images, generator=torch.Generator().manual_seed(0)).images
    b = loaded.reconstruct(images, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)


def test_autoencoder_errors(tmp_path, autoencoder_dir):
    with pytest.raises(ValueError, match="latent_channels and latent_downsample"):
        V2FlowTokenizer(**{**LATENT, "latent_downsample": None})
    with pytest.raises(ValueError, match="first_stage='autoencoder' only"):
        V2FlowTokenizer(**{**TINY, "autoencoder": "x"})
    tok = V2FlowTokenizer(**{**LATENT, "latent_downsample": 4})
    with pytest.raises(ValueError, match="latent_downsample: tokenizer 4, autoencoder 2"):
        tok.set_autoencoder(tiny_autoencoder())
    tok = V2FlowTokenizer(**LATENT)
    tok.set_vocabulary(tiny_vocabulary(TINY["num_entries"], TINY["llm_dim"]))
    with pytest.raises(RuntimeError, match="no autoencoder installed"):
        tok.encode(rgb())
    with pytest.raises(RuntimeError, match="no autoencoder installed"):
        tok.save_pretrained(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(FileNotFoundError, match="no autoencoder config"):
        load_autoencoder(tmp_path)
    latent = latent_tokenizer()
    with pytest.raises(ValueError, match="latents are"):
        latent.encode(latents=torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="exactly one"):
        latent.encode(rgb(), latents=torch.zeros(3, 4, 8, 8))
    latent.save_pretrained(tmp_path / "tok")
    import shutil

    shutil.rmtree(tmp_path / "tok" / "autoencoder")
    with pytest.raises(FileNotFoundError, match="no autoencoder/ directory"):
        V2FlowTokenizer.from_pretrained(tmp_path / "tok")


def _image_folder(path, n, size=20, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(path / f"im{i:03d}.png")
    return path


def test_cache_latents_resumes_and_matches(tmp_path, autoencoder_dir):
    data = _image_folder(tmp_path / "images", 10)
    kwargs = dict(image_size=16, shard_size=4, batch_size=3)
    full = cache_latents(autoencoder_dir, data, tmp_path / "full", **kwargs)
    assert full["complete"] and [s["count"] for s in full["shards"]] == [4, 4, 2]
    # interrupted after one shard (and a stray half-written temporary file), then resumed
    part = cache_latents(autoencoder_dir, data, tmp_path / "part", max_shards=1, **kwargs)
    assert not part["complete"] and len(part["shards"]) == 1
    (tmp_path / "part" / ".shard-00001.safetensors.tmp999").write_bytes(b"partial")
    with pytest.raises(ValueError, match="unfinished"):
        read_index(tmp_path / "part")
    resumed = cache_latents(autoencoder_dir, data, tmp_path / "part", **kwargs)
    assert resumed["complete"] and resumed["shards"] == full["shards"]
    for shard in full["shards"]:
        a, b = load_file(tmp_path / "full" / shard["file"]), load_file(tmp_path / "part" / shard["file"])
        assert a.keys() == b.keys() == {"latents", "latents_flipped"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the stored latents are the first stage's
    tok = latent_tokenizer()
    from v2flow.images import load_image

    first = load_image(data / "im000.png", 3, 16)[None]
    stored = load_file(tmp_path / "full" / "shard-00000.safetensors")
    torch.testing.assert_close(stored["latents"][:1], tok.first_stage.encode(first))
    torch.testing.assert_close(stored["latents_flipped"][:1], tok.first_stage.encode(first.flip(-1)))
    with pytest.raises(ValueError, match="other settings"):
        cache_latents(autoencoder_dir, data, tmp_path / "full", image_size=8, shard_size=4)
    # the data module
    dm = LatentCacheDataModule(str(tmp_path / "full"), batch_size=4, val_fraction=0.2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (4, 4, 8, 8) and batch["latents"].dtype == torch.float32
    assert len(dm.val_set) == 2 and len(dm.train_set) == 8


def test_cache_latents_command(tmp_path, autoencoder_dir, capsys):
    data = _image_folder(tmp_path / "images", 3)
    argv = ["cache-latents", "--autoencoder", str(autoencoder_dir), "--data", str(data), "--image-size", "16"]
    assert main([*argv, "-o", str(tmp_path / "cache"), "--no-hflip", "--dtype", "float16"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 3 and out["latent_shape"] == [4, 8, 8]
    shard = load_file(tmp_path / "cache" / "shard-00000.safetensors")
    assert set(shard) == {"latents"} and shard["latents"].dtype == torch.float16
    assert (
        main(["cache-latents", "--autoencoder", str(tmp_path), "--data", str(data), "--image-size", "16", "-o", "x"])
        == 2
    )


def _imagenet_overrides(tmp_path, autoencoder_dir):
    """configs/imagenet256.yaml with a tiny random autoencoder (downsampling 8) and tiny model widths."""
    table = tmp_path / "table.safetensors"
    save_file({"embeddings": torch.randn(300, 576, generator=torch.Generator().manual_seed(0))}, table)
    tiny = {
        "autoencoder": str(autoencoder_dir),
        "vocab_source": str(table),
        "num_entries": 64,
        "num_tokens": 16,
        "patch_size": 8,
        "encoder_dim": 32,
        "encoder_depth": 1,
        "encoder_heads": 2,
        "decoder_dim": 32,
        "decoder_encoder_depth": 1,
        "decoder_depth": 1,
        "decoder_heads": 2,
        "head_width": 32,
        "head_depth": 1,
        "decode": {"num_steps": 1, "num_iters": 1},
    }
    return [
        "--config",
        "configs/imagenet256.yaml",
        *(f"--model.tokenizer.init_args.{k}={v}" for k, v in tiny.items()),
        "--model.val_decode={num_steps: 1, num_iters: 1}",
        "--trainer.strategy=auto",
        "--trainer.devices=1",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32",
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path}",
    ]


@pytest.fixture(scope="module")
def vae8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ae8") / "tiny-vae-f8"
    tiny_autoencoder(levels=4).save_pretrained(path)
    return path


def test_imagenet256_config_fast_dev_run(tmp_path, vae8_dir):
    data = _image_folder(tmp_path / "imagenet", 6, size=256)
    args = _imagenet_overrides(tmp_path, vae8_dir)
    cli = lightning_cli(
        [
            "fit",
            *args,
            f"--data.init_args.root={data}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--data.init_args.val_fraction=0.3",
        ]
    )
    assert cli.trainer.global_step == 1
    tok = cli.model.tokenizer
    assert tok.first_stage.latent_size == 32 and tok.num_patches == 16
    # the same config trains from a latent cache
    cache_latents(vae8_dir, data, tmp_path / "cache", image_size=256, shard_size=4)
    cli = lightning_cli(
        [
            "fit",
            *args,
            "--data=v2flow.data.LatentCacheDataModule",
            f"--data.init_args.root={tmp_path / 'cache'}",
            "--data.init_args.batch_size=2",
            "--data.init_args.val_fraction=0.3",
        ]
    )
    assert cli.trainer.global_step == 1
