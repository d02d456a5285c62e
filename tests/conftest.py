import pytest
import torch

from v2flow import V2FlowTokenizer
from v2flow.testing import TINY_CONFIG, tiny_tokenizer, tiny_vocabulary  # noqa: F401 (re-exported to the tests)

TINY = TINY_CONFIG


def make_tokenizer(**overrides) -> V2FlowTokenizer:
    return tiny_tokenizer(**overrides)


@pytest.fixture
def tokenizer() -> V2FlowTokenizer:
    return make_tokenizer()


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
