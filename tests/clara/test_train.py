"""Training: the schedule, and the test that information flows through the memory tokens."""

import dataclasses

import pytest
import torch

from clara.config import ClaraConfig, LoraSettings
from clara.data.records import reconstruction_example
from clara.eval.metrics import cover_em, token_f1
from clara.model import ClaraModel
from clara.training.loop import TrainSettings, batches, lr_factor, train
from clara.training.stages import get_stage


def test_lr_schedule_warms_up_then_decays_to_the_minimum():
    f = [lr_factor(s, 100, 0.1, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=0.01)


def test_memory_spread_tells_a_collapsed_compressor_from_one_that_separates_chunks():
    from clara.losses import memory_spread

    same = torch.ones(3, 2, 4)
    assert memory_spread(same, ["a", "b", "c"]) == pytest.approx(0.0, abs=1e-6)  # one memory for every chunk
    eye = torch.eye(4).reshape(4, 1, 4)  # four mutually orthogonal memories
    assert memory_spread(eye, ["a", "b", "c", "d"]) == pytest.approx(1.0)
    # a chunk repeated in the batch (several of its questions) counts once
    assert memory_spread(torch.cat([eye[:2], eye[:1]]), ["a", "b", "a"]) == pytest.approx(1.0)
    assert memory_spread(eye[:1], ["a"]) is None


def test_curriculum_reconstructs_each_examples_chunk_first(scp_records):
    s = TrainSettings(steps=10, batch_size=4, reconstruction_warmup=0.5)
    drawn = list(batches(scp_records[:20], s, get_stage("scp")))
    plain = list(batches(scp_records[:20], TrainSettings(steps=10, batch_size=4), get_stage("scp")))
    assert [{ex.kind for ex in b} for b in drawn[:5]] == [{"reconstruction"}] * 5
    assert all("reconstruction" not in {ex.kind for ex in b} for b in drawn[5:])
    # the warm-up replaces each drawn example by its own chunk's reconstruction, as the Ray job does
    assert [[ex.chunks for ex in b] for b in drawn] == [[ex.chunks for ex in b] for b in plain]
    assert all(ex.answer == ex.chunks[0] for b in drawn[:5] for ex in b)


def test_wrong_memory_negatives_pair_questions_with_other_chunks(scp_records):
    import random

    from clara.data.records import reconstruction_example, with_wrong_memory_negatives
    from clara.prompts import NO_ANSWER

    batch = scp_records[:31] + [reconstruction_example(scp_records[0].chunks[0])]
    out = with_wrong_memory_negatives(batch, 0.5, random.Random(0))
    assert len(out) == len(batch) and out[-1] == batch[-1]  # reconstruction is never a negative
    neg = [(b, o) for b, o in zip(batch, out) if o.kind == "negative"]
    assert 8 <= len(neg) <= 24, len(neg)  # about half of the 31 QA examples
    for b, o in neg:
        assert o.question == b.question and o.answer == NO_ANSWER
        assert not set(o.chunks) & set(b.chunks) and o.chunks in {x.chunks for x in batch}
    assert all(o == b for b, o in zip(batch, out) if o.kind != "negative")
    assert with_wrong_memory_negatives(batch, 0.0, random.Random(0)) == batch
    one_chunk = [ex for ex in scp_records if ex.chunks == scp_records[0].chunks]
    assert with_wrong_memory_negatives(one_chunk, 1.0, random.Random(0)) == one_chunk  # nothing to swap in
    s = TrainSettings(steps=4, batch_size=16, wrong_memory_negatives=0.5, reconstruction_warmup=0.5)
    kinds = [{ex.kind for ex in b} for b in batches(scp_records[:40], s, get_stage("scp"))]
    assert kinds[:2] == [{"reconstruction"}] * 2 and all("negative" in k for k in kinds[2:])


def test_a_stage_with_the_compressor_frozen_trains_the_generator_alone(make_model, scp_records):
    """``train`` takes a Stage as well as a name: stage 1 with only the generator adapter trainable
    moves the generator's LoRA tensors and nothing else, so a chunk's memory (the running centre
    included) is exactly what it was, while the loss falls."""
    torch.manual_seed(0)
    model = make_model(seed=0)
    chunks = list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:4]
    train(model, "scp", [reconstruction_example(c) for c in chunks],
          TrainSettings(steps=2, batch_size=4, lr=1e-3))  # a compressor that has trained: a centre to keep
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    centre, memory = model.memory_center.clone(), model.compress(chunks)

    stage = dataclasses.replace(get_stage("scp"), adapters=("generator",), memory_embeddings=False, base=False)
    log = train(model, stage, [reconstruction_example(c) for c in chunks],
                TrainSettings(steps=12, batch_size=4, lr=3e-3, warmup_ratio=0.0))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n and ".generator." in n for n in changed), sorted(changed)[:5]
    assert torch.equal(model.memory_center, centre) and torch.equal(model.compress(chunks), memory)
    assert sum(log.losses[-3:]) / 3 < sum(log.losses[:3]) / 3, log.losses


@pytest.mark.slow
def test_information_flows_through_the_memory_tokens(tiny_base, scp_records):
    """A tiny model trained on 16 chunks reads its memory: own memory beats another chunk's.

    Reconstruction prompts are identical for every chunk, so only the memory can tell the
    generator which chunk to write; QA from a wrong chunk's memory shows how much is memorised.
    Slow (~4 min on 2 cores: 300 steps from random weights); the default run checks the same flow on
    the pretrained base (tests/clara/test_real_base.py: reconstruction from own vs wrong memory, and the
    packaged QA model answering from memory).
    """
    torch.manual_seed(0)
    chunks = list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:16]
    qa = [ex for ex in scp_records if ex.chunks[0] in set(chunks)]
    config = ClaraConfig(base_model=str(tiny_base), compression_rate=4, doc_max_tokens=128, device="cpu",
                         lora=LoraSettings(r=8, alpha=16, dropout=0.0), train_base=True)
    model = ClaraModel.from_base(config)
    recon = [reconstruction_example(c) for c in chunks]
    settings = TrainSettings(steps=300, batch_size=32, lr=2e-3, warmup_ratio=0.05, reconstruction_warmup=0.5)
    log = train(model, "scp", qa + recon * 3, settings)
    first, last = sum(log.losses[:10]) / 10, sum(log.losses[-10:]) / 10
    assert last <= first / 2, (first, last)

    memory = model.compress(chunks)  # (16, 32, 128)
    wrong = memory.roll(1, dims=0)  # every chunk gets its neighbour's memory
    own_text, wrong_text = model.decode_memory(memory), model.decode_memory(wrong)
    f1_own = sum(token_f1(p, c) for p, c in zip(own_text, chunks)) / len(chunks)
    f1_wrong = sum(token_f1(p, c) for p, c in zip(wrong_text, chunks)) / len(chunks)
    assert f1_own >= 0.8 and f1_wrong <= 0.3, (f1_own, f1_wrong)

    index = {c: i for i, c in enumerate(chunks)}
    rows = torch.tensor([index[ex.chunks[0]] for ex in qa])
    questions = [ex.question for ex in qa]
    own = model.generate(questions, memory[rows].unsqueeze(1), max_new_tokens=24)
    bad = model.generate(questions, wrong[rows].unsqueeze(1), max_new_tokens=24)
    em_own = sum(cover_em(p, ex.answer) for p, ex in zip(own, qa)) / len(qa)
    em_wrong = sum(cover_em(p, ex.answer) for p, ex in zip(bad, qa)) / len(qa)
    assert em_own >= 0.3 and em_own - em_wrong >= 0.15, (em_own, em_wrong)
