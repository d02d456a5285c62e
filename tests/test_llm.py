"""Visual tokens inside causal LMs: extension, sequences, parsing, constrained generation, save/load."""

import json

import pytest
import torch
from conftest import TINY
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from v2flow import LLMVocabulary, V2FlowTokenizer
from v2flow.llm import (
    IMAGE_START,
    ImageLM,
    ImageSpanLogitsProcessor,
    MalformedImageSpanError,
)

LM_VOCAB = 100
LM_DIM = 24


def text_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<eos>", "<pad>"] + [f"w{i}" for i in range(LM_VOCAB - 2)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")


def tiny_lm(kind: str, tied: bool = True, max_positions: int = 64):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=LM_VOCAB,
            hidden_size=LM_DIM,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=max_positions,
            tie_word_embeddings=tied,
            eos_token_id=0,
            pad_token_id=1,
            bos_token_id=0,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=LM_VOCAB,
            n_embd=LM_DIM,
            n_layer=2,
            n_head=2,
            n_positions=max_positions,
            tie_word_embeddings=tied,
            eos_token_id=0,
            pad_token_id=1,
            bos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    model.config.name_or_path = f"tiny-{kind}"
    return model.eval()


def image_tokenizer_for(model, num_entries: int = 32) -> V2FlowTokenizer:
    """A tiny image tokenizer whose vocabulary rows are `model`'s own embedding rows."""
    torch.manual_seed(0)
    tok = V2FlowTokenizer(**{**TINY, "num_entries": num_entries, "llm_dim": LM_DIM})
    ids = torch.arange(2, 2 + num_entries)
    rows = model.get_input_embeddings().weight.detach()[ids]
    tok.set_vocabulary(LLMVocabulary(rows, ids, model.config.name_or_path, LM_VOCAB))
    return tok.eval()


@pytest.fixture(params=["llama", "gpt2"])
def kind(request):
    return request.param


def test_shared_mode_adds_only_boundary_tokens(kind):
    model, tok = tiny_lm(kind), text_tokenizer()
    before = model.get_input_embeddings().weight.detach().clone()
    image_lm = ImageLM.extend(model, tok, image_tokenizer_for(model), mode="shared")
    assert len(tok) == LM_VOCAB + 2
    assert model.get_input_embeddings().weight.shape[0] >= LM_VOCAB + 2
    assert torch.equal(model.get_input_embeddings().weight[:LM_VOCAB], before)
    assert image_lm.image_token_ids.tolist() == list(range(2, 34))
    assert tok.convert_ids_to_tokens(image_lm.layout.image_start_id) == IMAGE_START
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("tied", [True, False])
def test_new_mode_rows_start_from_the_vocabulary(kind, tied):
    model, tok = tiny_lm(kind, tied=tied), text_tokenizer()
    old = model.get_input_embeddings().weight.detach().clone()
    image_tok = image_tokenizer_for(model)
    image_lm = ImageLM.extend(model, tok, image_tok, mode="new", init="vocab")
    ids = torch.tensor(image_lm.layout.lm_ids)
    assert ids.min() >= LM_VOCAB + 2 and len(tok) == LM_VOCAB + 2 + 32
    rows = model.get_input_embeddings().weight.detach()[ids]
    vectors = image_tok.vocabulary.embeddings
    # same direction as the vocabulary vector, mean norm equal to the LM's existing rows
    cos = torch.nn.functional.cosine_similarity(rows, vectors, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert rows.norm(dim=1).mean() == pytest.approx(float(old.norm(dim=1).mean()), rel=1e-4)
    out = model.get_output_embeddings().weight
    if tied:
        assert out.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    else:
        cos_out = torch.nn.functional.cosine_similarity(out.detach()[ids], vectors, dim=1)
        assert torch.allclose(cos_out, torch.ones_like(cos_out), atol=1e-5)


def test_new_mode_random_init_matches_norm_statistics_not_directions():
    model, tok = tiny_lm("llama"), text_tokenizer()
    old = model.get_input_embeddings().weight.detach().clone()
    image_tok = image_tokenizer_for(model)
    image_lm = ImageLM.extend(
        model, tok, image_tok, mode="new", init="random", generator=torch.Generator().manual_seed(0)
    )
    rows = model.get_input_embeddings().weight.detach()[torch.tensor(image_lm.layout.lm_ids)]
    assert rows.std() == pytest.approx(float(old.std()), rel=0.2)
    cos = torch.nn.functional.cosine_similarity(rows, image_tok.vocabulary.embeddings, dim=1)
    assert cos.abs().mean() < 0.5


def test_ids_round_trip_through_sequences(kind):
    for mode in ("shared", "new"):
        model, tok = tiny_lm(kind), text_tokenizer()
        image_tok = image_tokenizer_for(model)
        image_lm = ImageLM.extend(model, tok, image_tok, mode=mode)
        images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        ids = image_tok.encode(images).ids  # (3, 4)
        batch = image_lm.build_batch(["w5 w6", "w7", "w8 w9 w10"], ids)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        # loss only on the image tokens and <|image_end|>
        assert int((batch["labels"] != -100).sum()) == 3 * (image_tok.config["num_tokens"] + 1)
        assert torch.equal(image_lm.parse(batch["input_ids"]), ids)


@pytest.mark.parametrize("mode", ["shared", "new"])
def test_image_vocabulary_loss_is_the_softmax_over_image_tokens_and_the_end(kind, mode):
    model, tok = tiny_lm(kind), text_tokenizer()
    image_lm = ImageLM.extend(model, tok, image_tokenizer_for(model), mode=mode)
    ids = torch.randint(0, 32, (3, TINY["num_tokens"]), generator=torch.Generator().manual_seed(0))
    batch = image_lm.build_batch(["w3 w4", "w5", "w6 w7 w8"], image_lm.to_visual_ids(image_lm.image_token_ids[ids]))
    out = image_lm.loss(batch, vocabulary="image")
    # by hand: the full logits at the scored positions, restricted to the K image ids and <|image_end|>
    logits = model(**batch).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    allowed = image_lm.image_token_ids.tolist() + [image_lm.layout.image_end_id]
    column = {t: c for c, t in enumerate(allowed)}
    restricted = logits[scored][:, allowed]
    expected = torch.nn.functional.cross_entropy(
        restricted, torch.tensor([column[t] for t in targets[scored].tolist()])
    )
    assert scored.sum() == 3 * (TINY["num_tokens"] + 1)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    full = image_lm.loss(batch, vocabulary="full")
    torch.testing.assert_close(full.loss, model(**batch).loss)
    assert full.loss > out.loss  # the full softmax also spends mass on text tokens
    assert 0 <= float(out.token_accuracy) <= 1


def test_image_vocabulary_loss_refuses_transformed_logits_and_unknown_names():
    model, tok = tiny_lm("llama"), text_tokenizer()
    image_lm = ImageLM.extend(model, tok, image_tokenizer_for(model), mode="shared")
    batch = image_lm.build_batch(["w3"], image_lm.to_visual_ids(image_lm.image_token_ids[:4][None]))
    with pytest.raises(ValueError, match="unknown loss vocabulary 'text'"):
        image_lm.loss(batch, vocabulary="text")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"transforms them \(\['final_logit_softcapping'\]\).*vocabulary='full'"):
        image_lm.loss(batch)
    assert torch.isfinite(image_lm.loss(batch, vocabulary="full").loss)


def test_parse_names_malformed_generations():
    model, tok = tiny_lm("llama"), text_tokenizer()
    image_lm = ImageLM.extend(model, tok, image_tokenizer_for(model), mode="shared")
    s, e = image_lm.layout.image_start_id, image_lm.layout.image_end_id
    good = [5, s, 2, 3, 4, 5, e]
    assert image_lm.parse(torch.tensor([good])).tolist() == [[2, 3, 4, 5]]
    with pytest.raises(MalformedImageSpanError, match="no <\\|image_start\\|>"):
        image_lm.parse(torch.tensor([[5, 6, 7, 8, 9, 10, 11]]))
    with pytest.raises(MalformedImageSpanError, match="ends after 2 of 4"):
        image_lm.parse(torch.tensor([[5, s, 2, 3, 0, 1, 1]]))
    with pytest.raises(MalformedImageSpanError, match="ends early"):
        image_lm.parse(torch.tensor([[5, 5, 5, s, 2, 3]]))
    with pytest.raises(MalformedImageSpanError, match="breaks after 1 of 4"):
        image_lm.parse(torch.tensor([[5, s, 2, 70, 4, 5, e]]))
    with pytest.raises(MalformedImageSpanError, match="no <\\|image_end\\|>"):
        image_lm.parse(torch.tensor([[5, s, 2, 3, 4, 5, 6]]))


@pytest.mark.parametrize(
    "settings",
    [
        {"do_sample": False},
        {"do_sample": True, "temperature": 1.5},
        {"do_sample": True, "top_k": 5},
        {"do_sample": True, "top_p": 0.9, "temperature": 0.7},
    ],
)
def test_constrained_generation_always_writes_well_formed_spans(kind, settings):
    model, tok = tiny_lm(kind), text_tokenizer()
    image_tok = image_tokenizer_for(model)
    image_lm = ImageLM.extend(model, tok, image_tok, mode="new")
    out = image_lm.generate(["w3 w4 w5", "w6", "w7 w8", "w9"], seed=0, **settings)
    assert out.ids.shape == (4, 4)
    assert torch.isin(out.ids, image_tok.vocabulary.token_ids).all()
    image_tok.decode(out.ids, num_steps=1)  # the tokenizer accepts what the LM wrote
    if settings["do_sample"]:
        again = image_lm.generate(["w3 w4 w5", "w6", "w7 w8", "w9"], seed=0, **settings)
        assert torch.equal(out.sequences, again.sequences)


def test_logits_processor_masks_everything_but_image_tokens_inside_a_span():
    proc = ImageSpanLogitsProcessor(torch.tensor([2, 3, 4]), image_start_id=10, image_end_id=11, num_tokens=2)
    scores = torch.zeros(4, 12)
    input_ids = torch.tensor(
        [
            [5, 6, 7, 8],  # no span: free
            [5, 6, 7, 10],  # just opened: image tokens only
            [5, 10, 2, 3],  # N written: <|image_end|> only
            [10, 2, 3, 11],  # closed: free
        ]
    )
    out = proc(input_ids, scores)
    finite = torch.isfinite(out)
    assert finite[0].all() and finite[3].all()
    assert finite[1].nonzero().flatten().tolist() == [2, 3, 4]
    assert finite[2].nonzero().flatten().tolist() == [11]


def test_shared_mode_refuses_another_llms_vocabulary():
    model, tok = tiny_lm("llama"), text_tokenizer()
    other = tiny_lm("gpt2")  # same sizes, different rows
    other.config.name_or_path = "some-other-llm"
    with pytest.raises(ValueError, match="'some-other-llm' but the LM is 'tiny-llama'"):
        ImageLM.extend(model, tok, image_tokenizer_for(other), mode="shared")
    # a different width is refused too, naming both
    wide = V2FlowTokenizer(**{**TINY, "num_entries": 8, "llm_dim": 12})
    wide.set_vocabulary(LLMVocabulary(torch.randn(8, 12), torch.arange(8), "wide-llm", 50))
    with pytest.raises(ValueError, match="'wide-llm' but the LM is 'tiny-llama'"):
        ImageLM.extend(model, text_tokenizer(), wide, mode="shared")
    with pytest.raises(ValueError, match="init='random'"):
        ImageLM.extend(model, text_tokenizer(), wide, mode="new", init="vocab")


@pytest.mark.parametrize("mode", ["shared", "new"])
def test_added_tokens_that_land_in_padding_rows_start_from_the_trained_rows(mode):
    # an LM whose table is padded past its tokenizer (LM_VOCAB + 8 rows) with junk in the padding
    model, tok = tiny_lm("llama", tied=False), text_tokenizer()
    model.resize_token_embeddings(LM_VOCAB + 8, mean_resizing=False)
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            table[LM_VOCAB:] = 1e3
    image_lm = ImageLM.extend(model, tok, image_tokenizer_for(model), mode=mode, init="vocab")
    start, end = image_lm.layout.image_start_id, image_lm.layout.image_end_id
    assert (start, end) == (LM_VOCAB, LM_VOCAB + 1)  # the padding rows
    for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        real = table[:LM_VOCAB].detach()
        assert torch.allclose(table[start], real.mean(0)) and torch.allclose(table[end], real.mean(0))
        if mode == "new":  # rescaled to the trained rows' norm, not the junk's
            rows = table[torch.tensor(image_lm.layout.lm_ids)].detach()
            assert rows.norm(dim=1).mean() == pytest.approx(float(real.norm(dim=1).mean()), rel=1e-4)


def test_shared_mode_refuses_special_tokens_in_the_vocabulary():
    model, tok = tiny_lm("llama"), text_tokenizer()
    image_tok = V2FlowTokenizer(**{**TINY, "num_entries": 8, "llm_dim": LM_DIM})
    ids = torch.arange(0, 8)  # 0 is "<eos>", 1 is "<pad>"
    rows = model.get_input_embeddings().weight.detach()[ids]
    image_tok.set_vocabulary(LLMVocabulary(rows, ids, model.config.name_or_path, LM_VOCAB))
    with pytest.raises(ValueError, match=r"holds 2 of the LM tokenizer's special.*'<eos>', '<pad>'.*mode='new'"):
        ImageLM.extend(model, tok, image_tok, mode="shared")
    assert len(tok) == LM_VOCAB  # nothing was added before the refusal
    ImageLM.extend(model, tok, image_tok, mode="new", init="vocab")  # own rows: no clash


def test_refuses_bad_modes_and_double_extension():
    model, tok = tiny_lm("llama"), text_tokenizer()
    image_tok = image_tokenizer_for(model)
    with pytest.raises(ValueError, match="unknown vocabulary mode"):
        ImageLM.extend(model, tok, image_tok, mode="both")
    with pytest.raises(ValueError, match="applies to mode='new' only"):
        ImageLM.extend(model, tok, image_tok, mode="shared", init="random")
    ImageLM.extend(model, tok, image_tok, mode="shared")
    with pytest.raises(ValueError, match="extended already"):
        ImageLM.extend(model, tok, image_tok, mode="shared")


def test_prompt_too_long_for_the_context_is_refused():
    model, tok = tiny_lm("llama", max_positions=12), text_tokenizer()
    image_lm = ImageLM.extend(model, tok, image_tokenizer_for(model), mode="shared")
    with pytest.raises(ValueError, match="context of 12"):
        image_lm.build_prompts([" ".join(f"w{i}" for i in range(3, 13))])
    with pytest.raises(ValueError, match="context of 12"):
        image_lm.build_batch([" ".join(f"w{i}" for i in range(3, 13))], torch.full((1, 4), 2))


def test_ids_outside_the_visual_vocabulary_are_refused():
    model, tok = tiny_lm("llama"), text_tokenizer()
    image_lm = ImageLM.extend(model, tok, image_tokenizer_for(model), mode="new")
    with pytest.raises(ValueError, match="not in the image tokenizer's vocabulary"):
        image_lm.build_batch(["w3"], torch.tensor([[2, 3, 4, 99]]))
    with pytest.raises(ValueError, match="shape \\(B, 4\\)"):
        image_lm.build_batch(["w3"], torch.tensor([[2, 3, 4]]))


def test_save_and_load_round_trip(tmp_path, kind):
    model, tok = tiny_lm(kind), text_tokenizer()
    image_lm = ImageLM.extend(model, tok, image_tokenizer_for(model), mode="new")
    target = image_lm.save_pretrained(tmp_path / "lm")
    assert json.loads((target / "v2flow_lm.json").read_text())["mode"] == "new"
    loaded = ImageLM.from_pretrained(target)
    assert loaded.layout == image_lm.layout
    batch = image_lm.build_batch(["w3 w4"], torch.tensor([[2, 3, 4, 5]]))
    assert torch.equal(loaded.build_batch(["w3 w4"], torch.tensor([[2, 3, 4, 5]]))["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.model(**batch).logits)
    with pytest.raises(FileExistsError):
        image_lm.save_pretrained(target)
