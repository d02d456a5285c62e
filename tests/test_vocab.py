import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from v2flow.vocab import LLMVocabulary, farthest_point_indices


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("V2FLOW_CACHE", str(tmp_path / "cache"))


def _tiny_llm(tmp_path, arch: str):
    """A tiny random causal LM and a real BPE tokenizer trained offline, saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    text = ["a handwritten digit seven", "the quick brown fox jumps over the lazy dog"] * 50
    raw.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    v = len(tok)
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=v,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        )
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=1, n_head=2))
    path = tmp_path / f"tiny-{arch}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("selection", ["fps", "first"])
def test_model_dir_ids_are_real_llm_tokens(tmp_path, arch, selection):
    path, model, tok = _tiny_llm(tmp_path, arch)
    vocab = LLMVocabulary.load(str(path), num_entries=40, selection=selection)
    table = model.get_input_embeddings().weight.detach()
    assert vocab.embeddings.shape == (40, 32) and vocab.llm_vocab_size == len(tok)
    torch.testing.assert_close(vocab.embeddings, table[vocab.token_ids])
    assert not set(vocab.token_ids.tolist()) & set(tok.all_special_ids)
    # the strings are what the LLM's own tokenizer makes of the ids, and encode back to them
    for i, s in zip(vocab.token_ids.tolist(), vocab.token_strings, strict=True):
        assert s == tok.decode([i])
        assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(i)) == i
    again = LLMVocabulary.load(str(path), num_entries=40, selection=selection)  # cached: identical
    assert torch.equal(again.token_ids, vocab.token_ids) and torch.equal(again.embeddings, vocab.embeddings)


def test_tensor_file_sources(tmp_path):
    table = torch.randn(50, 8)
    save_file({"embeddings": table}, tmp_path / "table.safetensors")
    torch.save(table, tmp_path / "table.pt")
    for name in ("table.safetensors", "table.pt"):
        vocab = LLMVocabulary.load(str(tmp_path / name), num_entries=10)
        torch.testing.assert_close(vocab.embeddings, table[vocab.token_ids])
        assert vocab.token_strings is None


def test_tensor_file_subset_keeps_llm_ids(tmp_path):
    rows, ids = torch.randn(30, 8), torch.arange(1000, 1030)
    strings = [f"t{i}" for i in range(1000, 1030)]
    torch.save({"embeddings": rows, "token_ids": ids, "token_strings": strings, "vocab_size": 5000}, tmp_path / "s.pt")
    vocab = LLMVocabulary.load(str(tmp_path / "s.pt"), num_entries=10)
    assert vocab.llm_vocab_size == 5000 and vocab.token_ids.min() >= 1000
    for i, s, row in zip(vocab.token_ids.tolist(), vocab.token_strings, vocab.embeddings, strict=True):
        assert s == f"t{i}" and torch.equal(row, rows[i - 1000])
    torch.save({"embeddings": rows, "token_ids": ids[:5]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="token_ids must be"):
        LLMVocabulary.load(str(tmp_path / "bad.pt"))


def test_trained_tokenizer_directory_shares_its_rows(tmp_path):
    from v2flow.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    source = tok.vocabulary
    # as many rows as the subset holds: the same rows at the same indices, whatever the selection
    for selection in ("fps", "first"):
        vocab = LLMVocabulary.load(str(tmp_path / "tok"), num_entries=source.num_entries, selection=selection)
        assert torch.equal(vocab.embeddings, source.embeddings) and torch.equal(vocab.token_ids, source.token_ids)
        assert (vocab.llm_name, vocab.llm_vocab_size, vocab.token_strings) == (
            source.llm_name,
            source.llm_vocab_size,
            source.token_strings,
        )
    fewer = LLMVocabulary.load(str(tmp_path / "tok"), num_entries=8)  # a subset of the subset, same LLM ids
    assert set(fewer.token_ids.tolist()) < set(source.token_ids.tolist())
    (tmp_path / "tok" / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="without vocab.json"):
        LLMVocabulary.load(str(tmp_path / "tok"))


# sha256 of the comma-separated LLM ids that `LLMVocabulary.load("smollm2", 4096, "fps")` selects, in order
BUNDLED_FPS_4096 = "dec9093d78d3881b6e4c368cb787d7b4fa8eca6ac3d85d302eb46b7e6f0cc97c"


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(",".join(map(str, ids.tolist())).encode()).hexdigest()


@pytest.mark.slow
def test_bundled_fps_selection_is_the_same_on_every_machine():
    """The selection is exact integer arithmetic, so the same rows come out in the same order on any CPU."""
    bundled = LLMVocabulary.load("smollm2", num_entries=4096, selection="fps")
    assert _ids_digest(bundled.token_ids) == BUNDLED_FPS_4096
    # the shipped tokenizer was trained on the same 4,096 rows; training on its directory reuses its own order
    shipped = LLMVocabulary.load("checkpoints/mnist-smollm2-32")
    assert set(shipped.token_ids.tolist()) == set(bundled.token_ids.tolist())
    assert (shipped.llm_name, shipped.llm_vocab_size) == (bundled.llm_name, bundled.llm_vocab_size)
    order = {i: r for r, i in enumerate(shipped.token_ids.tolist())}
    rows = torch.tensor([order[i] for i in bundled.token_ids.tolist()])
    assert torch.equal(shipped.embeddings[rows], bundled.embeddings)


def test_farthest_point_ties_go_to_the_lowest_index():
    # four unit directions: every pick after the first has two candidates at the same distance
    rows = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    assert farthest_point_indices(rows, 4).tolist() == [0, 2, 1, 3]
    swapped = rows[[0, 3, 2, 1]]  # the tied pair in the other order: still the lower index first
    assert farthest_point_indices(swapped, 4).tolist() == [0, 2, 1, 3]


def test_farthest_point_does_not_depend_on_threads_or_layout():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(3000, 96, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = farthest_point_indices(rows, 200)
        torch.set_num_threads(max(2, threads))
        multi = farthest_point_indices(rows.t().contiguous().t(), 200)  # column-major copy: other kernels
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


def test_selection_cache_is_keyed_by_the_rule(tmp_path, monkeypatch):
    from v2flow import vocab as vocab_module

    monkeypatch.setenv("V2FLOW_CACHE", str(tmp_path))
    save_file(
        {"embeddings": torch.randn(40, 8, generator=torch.Generator().manual_seed(0))}, tmp_path / "t.safetensors"
    )
    first = LLMVocabulary.load(str(tmp_path / "t.safetensors"), num_entries=5)
    (cached,) = (tmp_path / "selections").iterdir()
    assert vocab_module.FPS_RULE in cached.name
    torch.save(torch.arange(5), cached)  # a stale selection under the current rule's key is what gets reused ...
    assert torch.equal(LLMVocabulary.load(str(tmp_path / "t.safetensors"), num_entries=5).token_ids, torch.arange(5))
    monkeypatch.setattr(vocab_module, "FPS_RULE", "fps-another-rule")  # ... but a changed rule never reads it
    assert torch.equal(LLMVocabulary.load(str(tmp_path / "t.safetensors"), num_entries=5).token_ids, first.token_ids)


def test_farthest_point_is_deterministic_and_spread():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 16, generator=g)
    a, b = farthest_point_indices(rows, 50), farthest_point_indices(rows, 50)
    assert torch.equal(a, b) and a.unique().numel() == 50
    unit = torch.nn.functional.normalize(rows - rows.mean(0), dim=-1)
    nearest = lambda idx: (unit[idx] @ unit[idx].T).fill_diagonal_(-2).max(1).values.mean()  # noqa: E731
    assert nearest(a) < nearest(torch.arange(50))  # more spread than an arbitrary subset


def test_missing_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLMVocabulary.load(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="without config.json"):
        LLMVocabulary.load(str(tmp_path))
    with pytest.raises(ValueError, match="unknown selection"):
        LLMVocabulary.load("smollm2", 10, selection="random")


def test_num_entries_out_of_range(tmp_path):
    save_file({"embeddings": torch.randn(20, 4)}, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="num_entries=30"):
        LLMVocabulary.load(str(tmp_path / "t.safetensors"), num_entries=30)


def test_gguf_without_embedding_table(tmp_path):
    import gguf

    path = tmp_path / "no_embd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="no token-embedding table"):
        LLMVocabulary.load(str(path))


def test_bad_vocabulary_tensors():
    with pytest.raises(ValueError, match="duplicates"):
        LLMVocabulary(torch.zeros(2, 3), torch.tensor([1, 1]), "x", 5)
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        LLMVocabulary(torch.zeros(2, 3), torch.tensor([1, 7]), "x", 5)


@pytest.mark.slow
def test_bundled_smollm2_matches_transformers_gguf_loader():
    """The bundled rows are SmolLM2's own: compare with transformers' GGUF loader and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from v2flow.vocab import bundled_smollm2_path

    vocab = LLMVocabulary.load("smollm2", num_entries=64, selection="first")
    gguf = bundled_smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    table = model.get_input_embeddings().weight.detach().float()
    assert vocab.llm_vocab_size == table.shape[0] == 49152 and vocab.dim == 576
    torch.testing.assert_close(vocab.embeddings, table[vocab.token_ids])
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert vocab.token_strings == [tok.decode([i]) for i in vocab.token_ids.tolist()]
