"""What the ids carry (v2flow.eval.token_information): the regression decoder and its measure, at tiny sizes."""

import math

import pytest
import torch

from v2flow import V2FlowTokenizer
from v2flow.eval.token_information import IdDecoder, flow_decoder_psnr, measure_token_information
from v2flow.testing import TINY_CONFIG, tiny_tokenizer, tiny_vocabulary

SMALL = dict(batch_size=8, lr=1e-3, hidden_dim=32, depth=1, progress=False)
KEYS = {
    "regression_psnr",
    "train_psnr",
    "mean_image_psnr",
    "distinct_ids",
    "distinct_test_ids_unseen",
    "bits_per_image",
    "num_tokens",
    "num_codes",
    "steps",
    "seconds",
    "loss_curve",
}


def digits(n: int, seed: int, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("embedding", ["frozen", "learned"])
@pytest.mark.parametrize("quantizer", ["vocab", "vq"])
def test_id_decoder_maps_indices_to_the_first_stage_latents(quantizer, embedding):
    tok = tiny_tokenizer(quantizer=quantizer)
    decoder = IdDecoder.from_tokenizer(tok, embedding=embedding, hidden_dim=32, depth=1)
    indices = tok.encode(digits(3, 0)).indices  # (3, 4)
    assert decoder(indices).shape == (3, 1, 8, 8)
    assert decoder.embedding.weight.requires_grad == (embedding == "learned")
    if embedding == "frozen":  # the vectors the flow decoder reads
        table = tok.resampler.embed(torch.arange(tok.resampler.num_codes))
        torch.testing.assert_close(decoder.embedding.weight, table)


def test_measure_runs_and_reports_finite_numbers():
    tok = tiny_tokenizer()
    result = measure_token_information(tok, digits(24, 0), digits(6, 1), steps=4, seed=0, **SMALL)
    assert KEYS <= set(result)
    for key in ("regression_psnr", "train_psnr", "mean_image_psnr", "seconds"):
        assert math.isfinite(result[key]), key
    assert result["bits_per_image"] == 4 * math.log2(32) and result["steps"] == 4
    assert 1 <= result["distinct_ids"] <= 32 and len(result["loss_curve"]) == 4
    assert result["loss_curve"][-1][0] == 4
    assert not tok.training  # left in the mode it came in


def test_training_reads_the_image_out_of_ids_that_determine_it():
    tok = tiny_tokenizer()
    distinct = digits(4, 3)
    ids = tok.encode(distinct).indices
    assert len({tuple(row) for row in ids.tolist()}) == 4  # the premise: four images, four id sequences
    train = distinct.repeat(16, 1, 1, 1)
    result = measure_token_information(tok, train, distinct, steps=150, seed=0, **{**SMALL, "lr": 3e-3})
    curve = [loss for _, loss in result["loss_curve"]]
    assert curve[-1] < 0.1 * curve[0]
    assert result["regression_psnr"] > result["mean_image_psnr"] + 5


def test_measure_is_deterministic_with_a_seed_and_leaves_the_global_rng_alone():
    tok = tiny_tokenizer()
    train, test = digits(24, 0), digits(6, 1)
    state = torch.get_rng_state()
    first = measure_token_information(tok, train, test, steps=5, seed=3, **SMALL)
    assert torch.equal(torch.get_rng_state(), state)
    again = measure_token_information(tok, train, test, steps=5, seed=3, **SMALL)
    other = measure_token_information(tok, train, test, steps=5, seed=4, **SMALL)
    assert first["loss_curve"] == again["loss_curve"] and first["regression_psnr"] == again["regression_psnr"]
    assert first["loss_curve"] != other["loss_curve"]


def test_flow_decoder_psnr_is_reproducible_and_reports_its_settings():
    tok = tiny_tokenizer()
    first = flow_decoder_psnr(tok, digits(5, 1), batch_size=2, seed=0, progress=False)
    again = flow_decoder_psnr(tok, digits(5, 1), batch_size=2, seed=0, progress=False)
    assert first["flow_psnr"] == again["flow_psnr"] and math.isfinite(first["flow_psnr"])
    assert first["decode"]["num_steps"] == tok.decode_defaults.num_steps
    cold = flow_decoder_psnr(tok, digits(5, 1), batch_size=2, progress=False, temperature=0.0)
    assert cold["decode"]["temperature"] == 0.0


def test_an_autoencoder_first_stage_regresses_its_latents():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    config = {**TINY_CONFIG, "image_size": 16, "in_channels": 3, "first_stage": "autoencoder"}
    tok = V2FlowTokenizer(**config, latent_channels=4, latent_downsample=2, code_dim=8)
    tok.set_vocabulary(tiny_vocabulary(tok.config["num_entries"], tok.config["llm_dim"]))
    with pytest.raises(RuntimeError, match="no autoencoder installed"):
        measure_token_information(tok, digits(4, 0, 3, 16), digits(2, 1, 3, 16), steps=1, **SMALL)
    tok.set_autoencoder(autoencoder)
    decoder = IdDecoder.from_tokenizer(tok, hidden_dim=16, depth=0)
    assert decoder(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 4, 8, 8)  # latents, not 16x16 pixels
    result = measure_token_information(tok.eval(), digits(8, 0, 3, 16), digits(2, 1, 3, 16), steps=2, **SMALL)
    assert math.isfinite(result["regression_psnr"]) and math.isfinite(result["mean_image_psnr"])


def test_bad_inputs_get_clear_errors():
    tok = tiny_tokenizer()
    train, test = digits(8, 0), digits(2, 1)
    empty = torch.empty(0, 1, 8, 8)
    with pytest.raises(ValueError, match="train_images must be a non-empty"):
        measure_token_information(tok, empty, test, steps=1, **SMALL)
    with pytest.raises(ValueError, match="test_images must be a non-empty"):
        measure_token_information(tok, train, test[0], steps=1, **SMALL)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        measure_token_information(tok, train.tolist(), test, steps=1, **SMALL)
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        measure_token_information(tok, train, test, steps=0, **SMALL)
    with pytest.raises(ValueError, match="unknown embedding"):
        measure_token_information(tok, train, test, steps=1, embedding="random", **SMALL)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):  # the tokenizer's own image check
        measure_token_information(tok, train * 3, test, steps=1, **SMALL)
    with pytest.raises(ValueError, match="images must be a non-empty"):
        flow_decoder_psnr(tok, empty, progress=False)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        IdDecoder(num_tokens=4, num_codes=0, token_dim=8, out_channels=1, out_size=8)
    with pytest.raises(ValueError, match="dropout"):
        IdDecoder(num_tokens=4, num_codes=32, token_dim=8, out_channels=1, out_size=8, dropout=1.0)
