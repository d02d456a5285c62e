"""Bad-input fuzzing: image tensors, id tensors and image files either work or raise v2flow's own clear error.

Hypothesis draws inputs from the case spaces of :mod:`v2flow.eval.fuzz_cases` (the valid choice of each field, or
a few fields changed to faulty choices; failures shrink towards the fewest faults) and judges them by its rule:
``ok`` (the output meets the contract) or ``clear_error`` (a ValueError / TypeError / FileNotFoundError raised
inside ``v2flow`` with a real message); never a crash inside torch, Pillow or numpy, never a silent wrong answer.
Runs are derandomized (the same examples every run) so CI is reproducible.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from conftest import make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from v2flow.eval import fuzz_cases as fc
from v2flow.images import load_image

FUZZ = dict(deadline=None, derandomize=True, database=None)


@cache
def _tokenizer(name: str):
    overrides = {
        "unordered": {},
        "ordered": {"token_order": "ordered", "order_stages": [1, 3], "truncation_prob": 0.5},
        "vq": {"quantizer": "vq"},
    }[name]
    return make_tokenizer(**overrides)


def _choices(space: dict) -> st.SearchStrategy[dict]:
    """Hypothesis' version of ``fc.draw``: free fields from all their choices, up to ``fc.MAX_CHANGES`` of the
    others faulty; shrinking removes faults and moves choices towards the valid (first) one."""
    fields = [field for field, choices in space.items() if field not in fc.FREE_FIELDS and len(choices) > 1]

    @st.composite
    def build(draw) -> dict:
        changed = draw(st.sets(st.sampled_from(fields), max_size=fc.MAX_CHANGES))
        return {
            field: draw(
                st.sampled_from(
                    choices if field in fc.FREE_FIELDS else choices[1:] if field in changed else choices[:1]
                )
            )
            for field, choices in space.items()
        }

    return build()


def _assert_rule(case) -> None:
    outcome, detail = fc.run_case(case.call, case.expected)
    expected = {"ok": ("ok",), "error": ("clear_error",), None: ("ok", "clear_error")}[case.expected]
    assert outcome in expected, f"{case.description}\n-> {outcome}: {detail}"


# ---------------------------------------------------------------------------- the rule itself


def _v2flow_error():
    _tokenizer("unordered").encode(torch.zeros(1, 8, 8))


def test_outcome_rule():
    assert fc.classify(lambda: None) == "ok"
    assert fc.classify(_v2flow_error) == "clear_error"
    assert fc.classify(lambda: torch.zeros(2) @ torch.zeros(3)) == "crash", "an error from inside torch"
    assert fc.classify(lambda: int("x")) == "crash", "a ValueError raised outside v2flow"
    assert fc.classify(_v2flow_error, expected="ok") == "wrong", "valid input refused"
    assert fc.classify(lambda: None, expected="error") == "wrong", "bad input accepted"


# ---------------------------------------------------------------------------- image tensors


@settings(max_examples=120, **FUZZ)
@given(choices=_choices(fc.image_tensor_space(_tokenizer("unordered"))))
def test_image_tensors(choices):
    _assert_rule(fc.image_tensor_case(_tokenizer("unordered"), choices))


def test_image_tensor_choices_one_at_a_time():
    tokenizer = _tokenizer("unordered")
    for choices in fc.one_at_a_time(fc.image_tensor_space(tokenizer)):
        _assert_rule(fc.image_tensor_case(tokenizer, choices))


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(2, 1, 8, 8, dtype=torch.float64), r"torch.float64 but this tokenizer computes in torch.float32.*"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.bfloat16), r"images.float\(\)"),
        (torch.zeros(2, 1, 8, 8, device="meta"), r"on meta but this tokenizer is on cpu; move them"),
        (torch.zeros(0, 1, 8, 8), r"empty batch"),
    ],
)
def test_image_rules_name_the_fix(images, match):
    with pytest.raises(ValueError, match=match):
        _tokenizer("unordered").encode(images)


def test_autocast_with_float32_images_works():
    tokenizer = _tokenizer("unordered")
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tokenizer.reconstruct(images, **fc.FAST_DECODE)
    assert out.images.shape == images.shape and out.images.dtype == torch.float32
    assert torch.equal(out.ids, tokenizer.encode(images).ids)


# ---------------------------------------------------------------------------- id tensors


@settings(max_examples=150, **FUZZ)
@given(name=st.sampled_from(["unordered", "ordered", "vq"]), data=st.data())
def test_id_tensors(name, data):
    tokenizer = _tokenizer(name)
    _assert_rule(fc.id_tensor_case(tokenizer, data.draw(_choices(fc.id_tensor_space(tokenizer)))))


@pytest.mark.parametrize("name", ["unordered", "ordered", "vq"])
def test_id_tensor_choices_one_at_a_time(name):
    tokenizer = _tokenizer(name)
    for choices in fc.one_at_a_time(fc.id_tensor_space(tokenizer)):
        _assert_rule(fc.id_tensor_case(tokenizer, choices))


def test_id_rules_name_the_problem():
    tokenizer = _tokenizer("unordered")
    ids = tokenizer.vocabulary.token_ids[:4][None]
    with pytest.raises(TypeError, match="torch.Tensor"):
        tokenizer.decode(ids.tolist())
    with pytest.raises(ValueError, match="complex64"):
        tokenizer.decode(ids.to(torch.complex64))
    with pytest.raises(ValueError, match="empty batch"):
        tokenizer.decode(ids[:0])
    with pytest.raises(ValueError, match=r"ids\[None\]"):
        tokenizer.decode(ids[0])
    with pytest.raises(ValueError, match="18446744073709551615"):  # the uint64 value, not its int64 wrap (-1)
        tokenizer.decode(torch.full((1, 4), -1).to(torch.uint64))
    with pytest.raises(ValueError, match="allow_truncation=True"):
        tokenizer.decode(ids[:, :2])
    assert tokenizer.decode(ids[:, :2], allow_truncation=True, **fc.FAST_DECODE).images.shape == (1, 1, 8, 8)
    assert tokenizer.decode(ids.to(torch.uint8), **fc.FAST_DECODE).images.shape == (1, 1, 8, 8)


# ---------------------------------------------------------------------------- image files


@pytest.fixture(scope="module")
def file_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_files")


@settings(max_examples=120, **FUZZ)
@given(choices=_choices(fc.image_file_space()))
def test_image_files(file_dir, choices):
    _assert_rule(fc.image_file_case(file_dir, choices))


@pytest.mark.parametrize("kind", fc.FILE_KINDS)
def test_every_file_kind(file_dir, kind):
    for channels in (1, 3):
        for size in (None, 8):
            choices = {**{k: v[0] for k, v in fc.image_file_space().items()}, "kind": kind}
            _assert_rule(fc.image_file_case(file_dir, {**choices, "channels": channels, "size": size}))


def test_decompression_bomb_names_the_limit(file_dir):
    path = file_dir / "bomb.png"
    path.write_bytes(fc.huge_png())
    with pytest.raises(ValueError, match=r"too large.*PIL\.Image\.MAX_IMAGE_PIXELS"):
        load_image(path, 1)
