import pytest
import torch

from v2flow import LLMVocabulary, V2FlowTokenizer

TINY = dict(
    image_size=8,
    in_channels=1,
    patch_size=4,
    num_tokens=4,
    encoder_dim=16,
    encoder_depth=1,
    encoder_heads=2,
    num_entries=32,
    llm_dim=24,
    code_dim=8,
    codebook_size=16,
    decoder_dim=16,
    decoder_encoder_depth=1,
    decoder_depth=1,
    decoder_heads=2,
    head_width=16,
    head_depth=1,
    sample_steps=2,
)
LLM_VOCAB_SIZE = 100


def tiny_vocabulary(num_entries: int = 32, dim: int = 24, seed: int = 0) -> LLMVocabulary:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(LLM_VOCAB_SIZE, dim, generator=g)
    ids = torch.randperm(LLM_VOCAB_SIZE, generator=g)[:num_entries].sort().values
    return LLMVocabulary(table[ids], ids, "tiny-llm", LLM_VOCAB_SIZE, [f"tok{i}" for i in ids.tolist()])


def make_tokenizer(**overrides) -> V2FlowTokenizer:
    torch.manual_seed(0)
    tok = V2FlowTokenizer(**{**TINY, **overrides})
    cfg = tok.config
    tok.set_vocabulary(tiny_vocabulary(cfg["num_entries"], cfg["llm_dim"]))
    return tok.eval()


@pytest.fixture
def tokenizer() -> V2FlowTokenizer:
    return make_tokenizer()


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
