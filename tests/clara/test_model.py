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


def test_content_weight_counts_names_and_numbers_more_in_the_generator_loss(make_model, chunks):
    """``content_weight`` w: the generator's loss is the mean cross-entropy with content tokens (a capital
    letter or a digit, and the pieces continuing such a word) counted w times; 1 is the plain mean."""
    model = make_model(seed=0)
    tok = model.tokenizer
    ids = tok(" the Zen of 1970 and more", add_special_tokens=False).input_ids
    mask = model.content_mask(torch.tensor([ids + [-100]]))[0].tolist()
    words = {}
    for i, m in zip(ids, mask):
        words.setdefault(tok.decode([i]).strip() or " ", []).append(m)
    assert mask[-1] is False  # a padding label is never content
    assert any(w.startswith("Z") and all(v) for w, v in words.items())
    assert not any(any(v) for w, v in words.items() if w in ("the", "of", "and", "more"))
    assert [m for i, m in zip(ids, mask) if any(ch.isdigit() for ch in tok.decode([i]))] and all(
        m for i, m in zip(ids, mask) if any(ch.isdigit() for ch in tok.decode([i])))

    memory = model.compress(chunks[:2]).unsqueeze(1)
    batch = model.build_generator_batch(["q one", "q two"], 1, ["Jake Phelps in 1993", "the editor of the magazine"])
    with torch.no_grad():
        logits, target, keep = model._answer_logits(batch, memory)
        ce = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
        content = model.content_mask(batch.labels[:, 1:])[keep]
        assert 0 < int(content.sum()) < len(target)
        plain, _ = model.generator_loss(batch, memory)
        assert torch.allclose(plain, ce.mean())
        model.config.content_weight = 4.0
        weighted, n = model.generator_loss(batch, memory)
    w = 1 + 3 * content.float()
    assert n == len(target) and torch.allclose(weighted, (ce * w).sum() / w.sum())
    assert not torch.allclose(weighted, plain)


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


def test_memory_normalisation_tracks_the_compressor_and_is_saved(make_model, chunks, tmp_path):
    """The running centre is set by the first training batch, followed after, saved, and versioned."""
    import json

    from clara.data.records import reconstruction_example
    from clara.losses import compression_loss
    from clara.model import ClaraModel

    model = make_model(dtype="float32")
    version_before = model.compressor_version()
    memory = model.compress(chunks[:3])
    norms = memory.norm(dim=-1)  # every vector rescaled to the token embeddings' mean norm
    assert torch.allclose(norms, model.memory_scale.expand_as(norms), rtol=1e-4)
    raw_mean = model.memory_center.clone()
    assert int(model.memory_center_steps) == 0 and torch.count_nonzero(raw_mean) == 0

    model.set_trainable(("compressor", "generator"))
    model.train()
    compression_loss(model, [reconstruction_example(c) for c in chunks[:4]])
    assert int(model.memory_center_steps) == 1
    model.eval()
    # after one batch the centre is that batch's per-slot mean of the raw states
    model.config.memory_norm = "none"
    raw = model.compress(chunks[:4])
    model.config.memory_norm = "center"
    assert torch.allclose(model.memory_center, raw.float().mean(0), atol=1e-5)
    assert model.compressor_version() != version_before  # the centre is part of what defines the memory
    centred = model.compress(chunks[:4])
    # the shared direction is gone: centred memories of different chunks are far less alike
    flat = torch.nn.functional.normalize(centred.flatten(1), dim=-1)
    raw_flat = torch.nn.functional.normalize(raw.flatten(1).float(), dim=-1)
    off = ~torch.eye(4, dtype=torch.bool)
    assert (flat @ flat.T)[off].mean() < (raw_flat @ raw_flat.T)[off].mean()

    loaded = ClaraModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert torch.equal(loaded.memory_center, model.memory_center)
    assert torch.allclose(loaded.compress(chunks[:4]), centred, atol=1e-6)

    # A directory written before memory normalisation existed reads raw states.
    manifest = json.loads((tmp_path / "m" / "clara.json").read_text())
    manifest["config"].pop("memory_norm")
    model.config.memory_norm = "none"
    manifest["compressor_version"] = model.compressor_version()
    (tmp_path / "m" / "clara.json").write_text(json.dumps(manifest))
    old = ClaraModel.from_pretrained(tmp_path / "m")
    assert old.config.memory_norm == "none" and torch.allclose(old.compress(chunks[:4]), raw, atol=1e-6)


def test_a_higher_rate_model_starts_from_the_first_memory_slots(make_model, chunks, tmp_path):
    """keep_memory_slots: rate 4 -> 16 keeps the first slots, whose memory (centre included) is unchanged,
    trains, saves and loads at the new rate; more slots than the model has is an error."""
    from clara.data.records import reconstruction_example
    from clara.losses import compression_loss
    from clara.model import ClaraModel

    model = make_model(dtype="float32")
    model.set_trainable(("compressor", "generator"), memory_embeddings=True)
    model.train()
    compression_loss(model, [reconstruction_example(c) for c in chunks[:4]])  # a non-zero running centre
    model.eval()
    before, version = model.compress(chunks[:3]), model.compressor_version()
    assert before.shape[1] == 16 and torch.count_nonzero(model.memory_center) > 0

    assert model.keep_memory_slots(16) is model
    after = model.compress(chunks[:3])
    assert model.config.compression_rate == 16 and model.config.n_mem == 4 and after.shape == (3, 4, 128)
    assert torch.allclose(after, before[:, :4], atol=1e-5)  # causal: later slots never reached the first four
    assert model.compressor_version() != version
    answers = model.generate(["Who?"], after[:1].unsqueeze(1), max_new_tokens=3)  # the prompt has 4 slots a chunk
    assert len(answers) == 1
    # one chunk takes 4 placeholder slots in the prompt now, 16 before
    assert make_model(dtype="float32").build_generator_batch(["Who?"], 1).input_ids.shape[1] - \
        model.build_generator_batch(["Who?"], 1).input_ids.shape[1] == 12

    model.set_trainable(("compressor",), memory_embeddings=True)  # the new slots train (and are the ones saved)
    model.train()
    loss = compression_loss(model, [reconstruction_example(c) for c in chunks[:2]])
    loss.loss.backward()
    assert model.memory_embeddings.grad.shape == (4, 128)
    model.eval()
    loaded = ClaraModel.from_pretrained(model.save_pretrained(tmp_path / "r16"))
    assert loaded.config.compression_rate == 16 and loaded.compressor_version() == model.compressor_version()
    assert torch.allclose(loaded.compress(chunks[:3]), model.compress(chunks[:3]), atol=1e-5)
    with pytest.raises(ValueError, match="slots can only be dropped"):
        loaded.keep_memory_slots(4)


def test_memory_from_an_earlier_layer_runs_only_the_first_layers(make_model, chunks, tmp_path):
    """memory_layer=k: the memory is the (normalised) output of the first k layers and the final norm,
    the full decoder is untouched (the generator still runs every layer), the model saves and loads
    with it, and a layer the base does not have is an error naming the field."""
    from clara.config import ClaraConfig
    from clara.model import ClaraModel
    from clara.settings import ConfigError

    first = make_model(memory_layer=1)
    assert "memory_layer" not in make_model().config.model_dict()  # older models keep their version
    assert first.config.model_dict()["memory_layer"] == 1

    # the raw states the compressor sees: the first layer's output under the final norm
    calls = []
    layers = first._decoder().layers
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, layer in enumerate(layers)]
    captured = {}
    norm_hook = first._decoder().norm.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    memory = first.compress(chunks[:2])
    for h in [*hooks, norm_hook]:
        h.remove()
    assert calls == [0]  # one layer of two ran
    assert len(first._decoder().layers) == 2  # the full decoder still has both
    raw = captured["out"][:, -first.config.n_mem:]
    assert torch.allclose(memory, first.normalise_memory(raw), atol=1e-5)
    version = first.compressor_version()
    first.config.memory_layer = None  # the same weights, memory from the last layer: other vectors, another version
    assert not torch.allclose(first.compress(chunks[:2]), memory, atol=1e-3)
    assert first.compressor_version() != version
    first.config.memory_layer = 1
    assert first.compressor_version() == version

    first.set_trainable(("compressor",), memory_embeddings=True)  # gradients reach the adapter's first layer
    first.train()
    first.encode(chunks[:2], "compressor").memory.square().sum().backward()
    grads = {n: p.grad for n, p in first.peft.named_parameters() if ".compressor." in n and "lora_B" in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".layers.0." in n)
    assert all(g is None for n, g in grads.items() if ".layers.1." in n)
    first.eval()

    loaded = ClaraModel.from_pretrained(first.save_pretrained(tmp_path / "layer1"))
    assert loaded.config.memory_layer == 1 and loaded.compressor_version() == first.compressor_version()
    assert torch.allclose(loaded.compress(chunks[:2]), first.compress(chunks[:2]), atol=1e-5)

    with pytest.raises(ConfigError, match="memory_layer: 3 is not a layer .* 2 layers"):
        make_model(memory_layer=3)
    with pytest.raises(ConfigError, match="memory_layer"):
        ClaraConfig(base_model="x", memory_layer=0)


def test_generation_is_capped_by_the_context(make_model, chunks):
    """A caller asking for more tokens than the context holds (a served /v1/decode with 4096) gets what
    fits, never positions the base model was not trained for."""
    model = make_model()
    limit = model.context_length
    assert limit is not None and model._room_for(10, 10**6) == limit - 10 and model._room_for(10, 5) == 5
    with pytest.raises(ValueError, match="whole context"):
        model._room_for(limit, 1)
    memory = model.compress(chunks[:1])
    assert isinstance(model.decode_memory(memory, max_new_tokens=limit * 4)[0], str)


_CENTRE_RANK = r"""
import os, sys, torch, torch.distributed as dist
from clara.config import ClaraConfig, LoraSettings
from clara.model import ClaraModel
dist.init_process_group("gloo")
rank = dist.get_rank()
model = ClaraModel.from_base(ClaraConfig(base_model=sys.argv[1], compression_rate=4, doc_max_tokens=64,
                                         device="cpu", dtype="float32", lora=LoraSettings(r=4, alpha=8)), seed=0)
n_mem, d = model.memory_center.shape
for step in range(3):  # each rank sees its own batches: rank r's states are all r + step
    model._track_memory_center(torch.full((2, n_mem, d), float(rank + step)))
torch.save(model.memory_center.clone(), os.path.join(sys.argv[2], f"centre{rank}.pt"))
dist.destroy_process_group()
"""


def test_memory_centre_is_the_same_on_every_data_parallel_rank(tiny_base, tmp_path):
    """Two gloo ranks with different batches end with one centre: the EMA of the ranks' mean batch."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CENTRE_RANK, str(tiny_base), str(tmp_path)],
                              env={**env, "RANK": str(r)}) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    c0, c1 = (torch.load(tmp_path / f"centre{r}.pt", weights_only=True) for r in range(2))
    want = torch.tensor(0.5)  # step 0 sets the mean of ranks (0 + 1) / 2; then EMA towards 1.5, 2.5
    for step_mean in (1.5, 2.5):
        want = want + 0.05 * (step_mean - want)
    assert torch.equal(c0, c1)
    assert torch.allclose(c0, want.expand_as(c0), atol=1e-6)
