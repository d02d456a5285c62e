"""The whole-image velocity network (velocity_decoder: transformer) and the fidelity decode (mode="mean")."""

import pytest
import torch

from v2flow import V2FlowTokenizer
from v2flow.sampling import masked_flow_sample
from v2flow.testing import tiny_tokenizer
from v2flow.velocity_transformer import ImageVelocityTransformer

WHOLE = dict(velocity_decoder="transformer", mask_ratio_min=1.0, head_width=16, head_depth=1)


def images(n=4, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_a_zero_velocity_at_initialisation():
    net = ImageVelocityTransformer(patch_dim=16, cond_dim=8, num_patches=4, width=16, depth=2, num_heads=2)
    x, c = torch.randn(12, 16), torch.randn(12, 8)
    assert torch.equal(net(x, torch.rand(12), c), torch.zeros(12, 16))  # adaLN-Zero: v starts at 0
    with pytest.raises(ValueError, match="takes all 4 patches of each image"):
        net(torch.randn(6, 16), torch.rand(6), torch.randn(6, 8))
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        ImageVelocityTransformer(patch_dim=16, cond_dim=8, num_patches=4, width=16, depth=1, num_heads=3)


def test_patches_attend_to_each_other():
    torch.manual_seed(0)
    net = ImageVelocityTransformer(patch_dim=4, cond_dim=4, num_patches=4, width=16, depth=1, num_heads=2)
    for p in net.parameters():  # leave the identity start so that the blocks act
        torch.nn.init.normal_(p, std=0.2)
    x, c, t = torch.randn(4, 4), torch.randn(4, 4), torch.full((4,), 0.5)
    moved = x.clone()
    moved[3] += 1.0  # change the last patch only
    assert not torch.allclose(net(x, t, c)[0], net(moved, t, c)[0])  # ... and the first patch's velocity changes


def test_the_true_velocity_brings_back_the_data_in_grid_order():
    b, length, p = 3, 4, 5
    data = torch.randn(b, length, p)

    def conditions(patches, mask, t):  # the condition of each patch is its clean value
        return data.clone(), None

    def velocity(x, t, cond):  # (M, P) rows, the images' patches in grid order: v = (x_t - x0) / t
        return (x - cond) / t[:, None]

    out = masked_flow_sample(
        conditions, velocity, batch_size=b, num_patches=length, patch_dim=p, num_steps=3, grid_order=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    torch.testing.assert_close(out, data, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="use num_iters=1"):
        masked_flow_sample(conditions, velocity, batch_size=b, num_patches=length, patch_dim=p, num_iters=2,
                           grid_order=True)  # fmt: skip


def test_tokenizer_with_the_whole_image_decoder_trains_decodes_and_round_trips(tmp_path):
    tok = tiny_tokenizer(**WHOLE).train()
    out = tok.loss(images(), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and tok.head.input_proj.weight.grad is not None
    tok.eval()
    ids = tok.encode(images()).ids
    a = tok.decode(ids, generator=torch.Generator().manual_seed(1)).images
    b = tok.decode(ids, generator=torch.Generator().manual_seed(1)).images
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b)
    loaded = V2FlowTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "tok"))
    assert torch.equal(loaded.decode(ids, generator=torch.Generator().manual_seed(1)).images, a)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"velocity_decoder": "transformer"}, "set mask_ratio_min: 1.0"),
        ({**WHOLE, "decode": {"num_iters": 2}}, "set decode num_iters: 1"),
        ({**WHOLE, "token_order": "ordered", "interval_times": True}, "takes one per image"),
        ({"velocity_decoder": "unet"}, "unknown velocity_decoder 'unet'"),
        ({"decode": {"mode": "median"}}, "unknown decode mode 'median'"),
    ],
)
def test_inconsistent_options_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_tokenizer(**overrides)


def test_the_mean_decode_is_the_one_step_estimate_and_deterministic():
    tok = tiny_tokenizer()
    ids = tok.encode(images()).ids
    mean = tok.decode(ids, mode="mean", temperature=0.0, generator=torch.Generator().manual_seed(0)).images
    again = tok.decode(ids, mode="mean", temperature=0.0, generator=torch.Generator().manual_seed(5)).images
    assert torch.equal(mean, again)  # no noise: the generator does not matter
    one_step = tok.decode(ids, num_steps=1, temperature=0.0, solver="euler").images  # one Euler step from t = 1
    torch.testing.assert_close(mean, one_step)
    whole = tiny_tokenizer(**WHOLE)
    assert whole.decode(whole.encode(images()).ids, mode="mean", temperature=0.0).images.shape == (4, 1, 8, 8)
