import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clara.tiny import TinyModelSpec, build_tiny_model, train_tokenizer

SUBJECTS = ["The river", "A small bird", "Paris", "The old library", "Marie Curie", "The committee", "Ten ships"]
VERBS = ["crossed", "described", "visited", "measured", "founded", "rebuilt", "named"]
OBJECTS = ["the northern valley", "a bright comet", "the museum in 1889", "an ancient wall", "forty islands"]


def corpus(n=300):
    out = []
    for i in range(n):
        s = SUBJECTS[i % len(SUBJECTS)]
        v = VERBS[(i // 3) % len(VERBS)]
        o = OBJECTS[(i // 7) % len(OBJECTS)]
        out.append(f"{s} {v} {o} in year {1700 + i}; it was recorded as item #{i}.")
    return out


SMALL = TinyModelSpec(vocab_size=400, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=128, seed=7)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus(), SMALL)


def test_tokenizer_special_ids_and_round_trip():
    tok = train_tokenizer(corpus(), vocab_size=400)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert len(tok) == 400
    assert tok.padding_side == "left"
    text = "The river crossed Zürich  in 2024 —\n\ttabs, ünïcödé ☃ and emoji 😀 too! "
    ids = tok(text)["input_ids"]
    assert 1 not in ids and 2 not in ids and 3 not in ids  # no bos/eos added, no unknown bytes
    assert tok.decode(ids) == text
    # merges were learned from the corpus: a frequent word is one token, shorter than its bytes
    assert len(tok("The river crossed")["input_ids"]) < len("The river crossed")


def test_tokenizer_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus(10), vocab_size=100)


def test_build_saves_and_loads(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "llama" and not cfg.tie_word_embeddings
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (0, 1, 2)
    assert cfg.vocab_size == len(tok) == 400
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (32, 1, 2)
    assert tok.decode(tok("Paris visited forty islands.")["input_ids"]) == "Paris visited forty islands."

    batch = tok(["Paris founded", "A small bird named the northern valley"], return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[0] == 2
    assert (batch["input_ids"][0, 0] == 0).item()  # left padding
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 400)
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_and_seed_matters(tmp_path, tiny_dir):
    def load(d):
        return AutoModelForCausalLM.from_pretrained(d).state_dict()

    again = build_tiny_model(tmp_path / "again", corpus(), SMALL)
    other = build_tiny_model(tmp_path / "other", corpus(), TinyModelSpec(**{**SMALL.__dict__, "seed": 8}))
    a, b, c = load(tiny_dir), load(again), load(other)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    tj = [json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] for d in (tiny_dir, again)]
    assert tj[0] == tj[1]


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", corpus(50), SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_spec_validation():
    with pytest.raises(ValueError, match="architecture"):
        TinyModelSpec(architecture="gpt2")
    with pytest.raises(ValueError, match="num_kv_heads"):
        TinyModelSpec(num_heads=4, num_kv_heads=3)
