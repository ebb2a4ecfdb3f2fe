"""Training record formats of the three stages, validated with errors that name record and field.

The formats are those of the reference implementation (see ``../shared/data/README.md``)::

    scp       {"data_type": "qa", "question": ["q1", ...], "answers": ["a1", ...], "docs": ["chunk"]}
              {"data_type": "paraphrase", "answers": ["paraphrase"], "docs": ["chunk"]}
    instruct  {"question": "q", "docs": ["chunk", ...], "answer": "a"}
    e2e       {"question": "q", "docs": ["candidate", ...], "pos_index": [3], "answer": "a"}

Every record becomes one or more :class:`Example` (chunks, question, answer, gold chunk
indices); the losses only ever see examples.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clara.data.jsonl import read_jsonl, unicode_problem
from clara.prompts import NO_ANSWER, PARAPHRASE_INSTRUCTION
from clara.training.stages import CLARA_STAGES

#: The record formats: one per CLaRa stage (:data:`clara.training.stages.CLARA_STAGES`).
STAGES: tuple[str, ...] = CLARA_STAGES


class RecordError(ValueError):
    """A training record is malformed. ``where`` is ``file:line`` or a record index."""

    def __init__(self, where: str, field_name: str, msg: str):
        self.where, self.field, self.msg = where, field_name, msg
        super().__init__(f"{where}: field {field_name!r}: {msg}")


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    ``chunks`` are the chunk texts the generator may read (one for stage 1, the top-k for stage 2,
    the candidates for stage 3); ``gold`` indexes the chunks that hold the answer.
    """

    chunks: tuple[str, ...]
    question: str
    answer: str
    gold: tuple[int, ...] = (0,)
    kind: str = "qa"  # qa | paraphrase | reconstruction | instruct | e2e | negative


def _str(obj: dict, key: str, where: str, *, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            raise RecordError(where, key, "missing")
        return None
    v = obj[key]
    if not isinstance(v, str):
        raise RecordError(where, key, f"must be a string, got {type(v).__name__}")
    if not v.strip():
        raise RecordError(where, key, "is empty")
    _check_unicode(v, where, key)
    return v


def _check_unicode(value: str, where: str, field_name: str) -> None:
    problem = unicode_problem(value)
    if problem:
        raise RecordError(where, field_name, problem)


def _str_list(obj: dict, key: str, where: str, *, min_len: int = 1) -> list[str]:
    if key not in obj:
        raise RecordError(where, key, "missing")
    v = obj[key]
    if not isinstance(v, list):
        raise RecordError(where, key, f"must be a list of strings, got {type(v).__name__}")
    if len(v) < min_len:
        raise RecordError(where, key, f"must hold at least {min_len} item(s), got {len(v)}")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise RecordError(where, f"{key}[{i}]", f"must be a string, got {type(s).__name__}")
        if not s.strip():
            raise RecordError(where, f"{key}[{i}]", "is empty")
        _check_unicode(s, where, f"{key}[{i}]")
    return v


def parse_record(obj: Any, stage: str, where: str = "record") -> list[Example]:
    """Validate one record of ``stage`` and turn it into examples. Raises :class:`RecordError`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if not isinstance(obj, dict):
        raise RecordError(where, "<record>", f"must be a JSON object, got {type(obj).__name__}")
    if stage == "scp":
        kind = obj.get("data_type", "qa")
        if kind not in ("qa", "paraphrase"):
            raise RecordError(where, "data_type", f"must be 'qa' or 'paraphrase', got {kind!r}")
        docs = _str_list(obj, "docs", where)
        if len(docs) != 1:
            raise RecordError(where, "docs", f"a stage-1 record holds exactly one chunk, got {len(docs)}")
        answers = _str_list(obj, "answers", where)
        if kind == "paraphrase":
            return [Example((docs[0],), PARAPHRASE_INSTRUCTION, answers[0], (0,), "paraphrase")]
        single = isinstance(obj.get("question"), str)
        questions = [_str(obj, "question", where)] if single else _str_list(obj, "question", where)
        if len(questions) != len(answers):
            raise RecordError(where, "answers", f"{len(answers)} answers for {len(questions)} questions")
        return [Example((docs[0],), qq, aa, (0,), "qa") for qq, aa in zip(questions, answers)]
    question = _str(obj, "question", where)
    answer = _str(obj, "answer", where)
    docs = _str_list(obj, "docs", where)
    if stage == "instruct":
        gold = tuple(_indices(obj, where, len(docs))) if "pos_index" in obj else tuple(range(len(docs)))
        return [Example(tuple(docs), question, answer, gold, "instruct")]
    if "pos_index" not in obj:
        raise RecordError(where, "pos_index", "missing")
    return [Example(tuple(docs), question, answer, tuple(_indices(obj, where, len(docs))), "e2e")]


def _indices(obj: dict, where: str, n: int) -> list[int]:
    v = obj["pos_index"]
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not v:
        raise RecordError(where, "pos_index", "must be a non-empty list of ints")
    for i, x in enumerate(v):
        if not isinstance(x, int) or isinstance(x, bool):
            raise RecordError(where, f"pos_index[{i}]", f"must be an int, got {type(x).__name__}")
        if not 0 <= x < n:
            raise RecordError(where, f"pos_index[{i}]", f"{x} is out of range for {n} docs")
    return v


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", object)`` for each non-blank line; a byte that is not UTF-8, bad JSON or a
    file without records raises :class:`RecordError` (see :func:`clara.data.jsonl.read_jsonl`)."""
    return read_jsonl(path, RecordError)


def read_records(path: str | Path, stage: str, limit: int | None = None) -> list[Example]:
    """Read and validate a whole JSONL file of ``stage`` records; all or nothing.

    ``limit`` caps the number of *records* read (not examples).
    """
    out: list[Example] = []
    for i, (where, obj) in enumerate(iter_jsonl(path)):
        if limit is not None and i >= limit:
            break
        out.extend(parse_record(obj, stage, where))
    if not out:
        raise RecordError(str(path), "<file>", "holds no records")
    return out


def reconstruction_example(chunk: str) -> Example:
    """A stage-1 example whose target is the chunk itself (the chunk as its own paraphrase).

    The prompt is the same for every chunk, so only the memory can tell the generator what to
    write: it is what forces the memory tokens to carry the chunk.
    """
    if not isinstance(chunk, str) or not chunk.strip():
        raise RecordError("reconstruction", "docs[0]", "is empty")
    return Example((chunk,), PARAPHRASE_INSTRUCTION, chunk, (0,), "reconstruction")


def chunks_of(examples: Iterable[Example]) -> list[str]:
    """Unique chunk texts in first-seen order."""
    seen: dict[str, None] = {}
    for ex in examples:
        for c in ex.chunks:
            seen.setdefault(c, None)
    return list(seen)


def answerable_in_window(examples: Iterable[Example], tokenizer, max_tokens: int,
                         min_recall: float = 0.8) -> list[Example]:
    """The examples whose answer's normalised words are mostly (``min_recall``) inside the first
    ``max_tokens`` tokens of their first chunk: the window the compressor (and a text reader cut at
    the same length) sees. Synthetic questions are written from whole chunks, so with short
    windows most answers lie outside them; training or judging QA from memory on those measures
    guessing, not reading."""
    from clara.eval.metrics import normalize_answer

    window: dict[str, set[str]] = {}
    keep = []
    for ex in examples:
        c = ex.chunks[0]
        if c not in window:
            ids = tokenizer(c, add_special_tokens=False)["input_ids"][:max_tokens]
            window[c] = set(normalize_answer(tokenizer.decode(ids)).split())
        words = normalize_answer(ex.answer).split()
        if words and sum(w in window[c] for w in words) >= min_recall * len(words):
            keep.append(ex)
    return keep


def with_wrong_memory_negatives(examples: list[Example], fraction: float, rng: random.Random) -> list[Example]:
    """Replace about ``fraction`` of a batch's QA (stage 1) and instruction (stage 2) examples by
    wrong-memory negatives, in-batch.

    A negative keeps the question but reads the chunks of another example of the same batch (none
    shared with its own) and its target is :data:`~clara.prompts.NO_ANSWER`. Without them a
    generator can learn to answer from the question alone; with them the answer has to depend on
    what the memory carries (on the tiny model, 25% negatives took QA cover-EM from the chunk's
    own memory to 0.83 against 0.01 from another chunk's). In-batch, so it works on a stream of
    records (Ray Data shards) without a global pool; reconstruction and paraphrase examples are
    left as they are.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if fraction == 0:
        return list(examples)
    out = list(examples)
    for i, ex in enumerate(examples):
        if ex.kind not in ("qa", "instruct") or rng.random() >= fraction:
            continue
        own = set(ex.chunks)
        others = [o for o in examples if o is not ex and not own.intersection(o.chunks)]
        if others:
            other = others[rng.randrange(len(others))]
            out[i] = Example(other.chunks, ex.question, NO_ANSWER, (), "negative")
    return out
