"""Tiny seeded tokenizers for tests, benchmarks and bug reports (in the spirit of ``torch.testing``).

One definition shared by ``tests/``, the benchmarks and the evaluation package's reliability checks and fuzz
cases, so the tokenizer a benchmark sweeps is the one the tests pin down:

    from v2flow.testing import tiny_tokenizer
    tok = tiny_tokenizer()                         # 8x8 gray images, 4 tokens, 32 entries of a 100-token "LLM"
    tok = tiny_tokenizer(quantizer="vq")           # any V2FlowTokenizer keyword overrides TINY_CONFIG
"""

from __future__ import annotations

import torch

from .tokenizer import V2FlowTokenizer
from .vocab import LLMVocabulary

TINY_CONFIG: dict = dict(
    image_size=8,
    in_channels=1,
    patch_size=4,
    num_tokens=4,
    encoder_dim=16,
    encoder_depth=1,
    encoder_heads=2,
    num_entries=32,
    llm_dim=24,
    decoder_dim=16,
    decoder_encoder_depth=1,
    decoder_depth=1,
    decoder_heads=2,
    head_width=16,
    head_depth=1,
    decode={"num_steps": 2},
)
"""The smallest tokenizer that exercises every part: 2x2 patches of 4x4 pixels, 4 tokens, depth-1 stacks.
:func:`tiny_tokenizer` adds the tiny sizes of mode-specific keys (``TINY_MODE_SIZES``) where they apply."""

TINY_MODE_SIZES: dict = dict(code_dim=8, codebook_size=16)

TINY_LLM_VOCAB_SIZE = 100
"""Rows of the random embedding table :func:`tiny_vocabulary` draws its entries from."""


def tiny_vocabulary(num_entries: int = 32, dim: int = 24, seed: int = 0) -> LLMVocabulary:
    """`num_entries` rows, sorted by id, of a seeded random (100, dim) "LLM" embedding table."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(TINY_LLM_VOCAB_SIZE, dim, generator=g)
    ids = torch.randperm(TINY_LLM_VOCAB_SIZE, generator=g)[:num_entries].sort().values
    return LLMVocabulary(table[ids], ids, "tiny-llm", TINY_LLM_VOCAB_SIZE, [f"tok{i}" for i in ids.tolist()])


def tiny_tokenizer(seed: int = 0, **overrides) -> V2FlowTokenizer:
    """:data:`TINY_CONFIG` updated by `overrides`, weights drawn after ``torch.manual_seed(seed)``, with its
    :func:`tiny_vocabulary` installed; in eval mode. Identical on every call with the same arguments.

    The velocity head's zero-initialised parameters (its biases, adaLN modulations and output layer, which make
    a fresh head predict v = 0 whatever its condition) get small random values instead, so that a decode depends on the
    tokens, as a trained tokenizer's does, and a test that changes tokens can see a change."""
    torch.manual_seed(seed)
    config = {**TINY_CONFIG, **overrides}
    if config.get("quantizer", "vocab") == "vq":
        config.setdefault("codebook_size", TINY_MODE_SIZES["codebook_size"])
    elif config.get("estimator", "projected") == "projected":
        config.setdefault("code_dim", TINY_MODE_SIZES["code_dim"])
    tok = V2FlowTokenizer(**config)
    with torch.no_grad():
        for p in tok.head.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    tok.set_vocabulary(tiny_vocabulary(tok.config["num_entries"], tok.config["llm_dim"], seed))
    return tok.eval()
