import pytest
import torch

from clara.prompts import PARAPHRASE_INSTRUCTION


@pytest.fixture(scope="module")
def chunks(scp_records):
    return list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:6]


@pytest.mark.parametrize("rate", [1, 4, 16, 32, 128, 256])
def test_shapes_for_every_rate(make_model, chunks, rate):
    model = make_model(compression_rate=rate, doc_max_tokens=256)
    n_mem = 256 // rate
    assert model.config.n_mem == n_mem
    memory = model.compress(chunks[:3])
    assert memory.shape == (3, n_mem, 128)
    query = model.encode_query(["Who founded it?", "When?"])
    assert query.shape == (2, n_mem, 128)
    scores = model.score(query, memory)
    assert scores.shape == (2, 3)
    assert torch.all(scores.abs() <= 1 + 1e-5)
    assert model.score(query, memory.unsqueeze(0).expand(2, -1, -1, -1)).shape == (2, 3)
    expected = torch.nn.functional.cosine_similarity(query[0].flatten(), memory[1].flatten(), dim=0)
    assert torch.allclose(scores[0, 1], expected, atol=1e-5)


def test_placeholder_embeddings_are_the_memory_exactly(make_model, chunks):
    model = make_model()
    memory = model.compress(chunks[:4]).reshape(2, 2, model.config.n_mem, -1)  # 2 questions x 2 chunks
    for answers in (None, ["a b", "c"]):  # generation (left pad) and training (right pad) layouts
        batch = model.build_generator_batch(["q one", "a longer question two"], 2, answers)
        embeds = model.generator_embeddings(batch, memory)
        for b in range(2):
            slots = embeds[b][batch.memory_mask[b]]  # (2*M, D) in prompt order
            assert torch.equal(slots, memory[b].reshape(-1, memory.shape[-1]))
            # every other position keeps its token embedding
            others = embeds[b][~batch.memory_mask[b]]
            assert torch.equal(others, model.input_embeddings(batch.input_ids[b][~batch.memory_mask[b]]))
    with pytest.raises(ValueError, match="memory slots"):
        model.generator_embeddings(model.build_generator_batch(["q"], 3), memory[0].unsqueeze(0))


def test_batched_generation_equals_one_at_a_time(make_model, chunks):
    model = make_model()
    memory = model.compress(chunks[:3]).unsqueeze(1)  # (3, 1, M, D)
    questions = ["Who?", "What is the name of the company in the document?", "When did it happen?"]
    together = model.generate(questions, memory, max_new_tokens=6)
    alone = [model.generate([q], memory[i:i + 1], max_new_tokens=6)[0] for i, q in enumerate(questions)]
    assert together == alone
    assert all(isinstance(t, str) for t in together)
    text = model.generate_from_text(questions[:2], [[chunks[0]], [chunks[1], chunks[2]]], max_new_tokens=4)
    bare = model.generate_from_text(questions[:2], None, adapter=None, max_new_tokens=4)
    assert len(text) == len(bare) == 2
    assert len(model.decode_memory(memory[0, 0], max_new_tokens=4)) == 1


def test_compress_is_batch_independent(make_model, chunks):
    model = make_model()
    together = model.compress(chunks[:5], batch_size=5)
    alone = torch.cat([model.compress([c]) for c in chunks[:5]])
    assert torch.allclose(together, alone, atol=1e-5)


def test_overlong_chunk_is_truncated_to_doc_max_tokens(make_model, chunks):
    model = make_model(doc_max_tokens=32, compression_rate=4)
    long = chunks[0]
    assert len(model.tokenizer(long, add_special_tokens=False)["input_ids"]) > 32
    # Tokens beyond the first doc_max_tokens are dropped, so appending text changes nothing.
    assert torch.equal(model.compress([long]), model.compress([long + " and a great deal more text"]))
    assert not torch.equal(model.compress([long]), model.compress(["A different start. " + long]))


def test_empty_chunk_is_an_error(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="text 1 is empty"):
        model.compress(["fine", "  "])


def test_memory_shapes_are_checked(make_model, chunks):
    model = make_model()
    memory = model.compress(chunks[:2])
    with pytest.raises(ValueError, match="memory must be"):
        model.generate(["q"], memory)  # [N, M, D] instead of [B, k, M, D]


def test_reconstruction_prompt_is_the_same_for_every_chunk(make_model):
    model = make_model()
    a = model.build_generator_batch([PARAPHRASE_INSTRUCTION], 1, ["first chunk"])
    b = model.build_generator_batch([PARAPHRASE_INSTRUCTION], 1, ["second, different chunk"])
    prompt_len = int((a.labels[0] == -100).sum())
    assert torch.equal(a.input_ids[0, :prompt_len], b.input_ids[0, :prompt_len])


def test_trainable_selection_survives_adapter_switches(make_model, chunks):
    model = make_model()
    model.set_trainable(["generator"], base=False, memory_embeddings=True)
    model.compress(chunks[:1])  # switches to the compressor adapter
    with model.adapter("query_reasoner"):
        pass
    trainable = {n for n, p in model.peft.named_parameters() if p.requires_grad}
    assert trainable and all(".generator." in n for n in trainable)
    assert model.memory_embeddings.requires_grad


def test_copy_and_reset_adapters(make_model, chunks):
    model = make_model()
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    model.copy_adapter("compressor", "query_reasoner")
    assert torch.equal(model.encode_query(["Who founded Flip?"]), model.compress(["Who founded Flip?"]))
    model.reset_adapter("generator")
    b = [p for n, p in model.peft.named_parameters() if ".generator." in n and ".lora_B." in n]
    assert b and all(float(p.abs().sum()) == 0 for p in b)
    # a reset generator adapter is a no-op: same output as the bare base model on text prompts
    q = ["What is this about?"]
    assert model.generate_from_text(q, [[chunks[0]]], max_new_tokens=5) == model.generate_from_text(
        q, [[chunks[0]]], adapter=None, max_new_tokens=5)
