"""Stage-2 and stage-3 records derived from stage-1 records.

A stage-1 (SCP) QA pair is a question about one chunk. Its own chunk is the gold; the other
chunks of the corpus are distractors, some drawn at random and some *lexically hard*: the
chunks that BM25 ranks highest for the question. The result is in the reference formats
(see :mod:`clara.data.records`)::

    instruct  {"question": "q", "docs": [5 chunks], "pos_index": [i], "answer": "a"}
    e2e       {"question": "q", "docs": [20 candidates], "pos_index": [i], "answer": "a"}

Questions about one chunk share its facts, so a held-out set is split **by chunk**
(:func:`split_by_chunk`), never by question.

Pure Python, in memory: fine for corpora of up to a few hundred thousand chunks.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clara.data.jsonl import write_jsonl
from clara.data.records import Example, chunks_of
from clara.training.stages import CLARA_STAGES, STAGES, get_stage

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore; any script)."""
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed list of documents, with an inverted index.

    ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))`` (always positive);
    ``score = sum_t idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len))``.
    """

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75):
        if not docs:
            raise ValueError("BM25 needs at least one document")
        self.k1, self.b = k1, b
        self.n = len(docs)
        self._len: list[int] = []
        self._postings: dict[str, list[tuple[int, int]]] = defaultdict(list)  # term -> [(doc, tf)]
        for i, d in enumerate(docs):
            counts = Counter(tokenize(d))
            self._len.append(sum(counts.values()))
            for term, tf in counts.items():
                self._postings[term].append((i, tf))
        self._avg = sum(self._len) / self.n or 1.0
        self._idf = {t: math.log(1 + (self.n - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self._postings.items()}

    def scores(self, query: str) -> dict[int, float]:
        """Scores of the documents that share at least one term with ``query`` (others score 0)."""
        out: dict[int, float] = defaultdict(float)
        for term in set(tokenize(query)):
            idf = self._idf.get(term)
            if idf is None:
                continue
            for doc, tf in self._postings[term]:
                norm = self.k1 * (1 - self.b + self.b * self._len[doc] / self._avg)
                out[doc] += idf * tf * (self.k1 + 1) / (tf + norm)
        return dict(out)

    def top(self, query: str, n: int, exclude: Iterable[int] = ()) -> list[int]:
        """Indices of the ``n`` best documents with a positive score, best first (ties: lower index)."""
        skip = set(exclude)
        ranked = sorted(((-s, d) for d, s in self.scores(query).items() if d not in skip and s > 0))
        return [d for _, d in ranked[:n]]


@dataclass
class DeriveSettings:
    """How stage-2 / stage-3 records are drawn from stage-1 QA pairs."""

    #: Record format to produce: ``instruct`` (stage 2) or ``e2e`` (stage 3).
    stage: str = field(metadata={"choices": ("instruct", "e2e")})
    #: Chunks per record, the gold included; ``None``: 5 for instruct, 20 for e2e.
    candidates: int | None = None
    #: Fraction of the distractors taken from BM25's top hits for the question; the rest are random.
    hard_fraction: float = 0.5
    #: Seed of the distractor draw and of the held-out split.
    seed: int = 0

    def __post_init__(self) -> None:
        derived = [name for name in CLARA_STAGES if STAGES[name].candidates]
        if self.stage not in derived:
            raise ValueError(f"stage must be one of {derived}, got {self.stage!r}")
        if self.candidates is None:
            self.candidates = get_stage(self.stage).candidates
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"candidates must be a positive int, got {self.candidates!r}")
        if not 0 <= self.hard_fraction <= 1:
            raise ValueError(f"hard_fraction must be in [0, 1], got {self.hard_fraction}")


def split_by_chunk(examples: Sequence[Example], holdout: float | int, seed: int = 0,
                   max_train_chunks: int | None = None) -> tuple[list[Example], list[Example]]:
    """Split examples into (train, held out) so that no chunk's questions are on both sides.

    ``holdout`` is the fraction of *chunks* held out (a float, at least one chunk when it is > 0) or
    their number (an int). ``max_train_chunks`` keeps the training side to that many chunks.
    """
    chunks = chunks_of(examples)
    if isinstance(holdout, int) and not isinstance(holdout, bool):
        if not 0 <= holdout < len(chunks):
            raise ValueError(f"holding out {holdout} of {len(chunks)} chunks leaves none to train on")
        n_out = holdout
    else:
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        n_out = math.ceil(len(chunks) * holdout) if holdout > 0 else 0
        if n_out >= len(chunks) and holdout > 0:
            raise ValueError(f"holding out {holdout:.0%} of {len(chunks)} chunks leaves none to train on")
    order = random.Random(seed).sample(chunks, len(chunks))
    out = set(order[:n_out])
    keep = set(order[n_out:n_out + max_train_chunks] if max_train_chunks is not None else order[n_out:])
    train = [ex for ex in examples if ex.chunks[0] in keep]
    held = [ex for ex in examples if ex.chunks[0] in out]
    return train, held


def derive_records(examples: Sequence[Example], settings: DeriveSettings,
                   pool: Sequence[str] | None = None) -> list[dict]:
    """One record per stage-1 QA example: its chunk as gold plus random and BM25-hard distractors.

    ``examples`` are stage-1 examples (one chunk each); paraphrase and reconstruction examples
    are skipped. ``pool`` is the chunks distractors are drawn from (default: the examples' own
    chunks); each example's gold chunk is added to it if missing. Deterministic for a seed.
    """
    qa = [ex for ex in examples if ex.kind == "qa"]
    if not qa:
        raise ValueError("no stage-1 QA examples to derive records from")
    for ex in qa:
        if len(ex.chunks) != 1:
            raise ValueError(f"expected stage-1 examples with one chunk each, got {len(ex.chunks)} for {ex.question!r}")
    docs = list(dict.fromkeys([*(pool or []), *chunks_of(qa)]))
    k = settings.candidates
    if len(docs) < k:
        raise ValueError(f"{k} candidates per record need at least {k} distinct chunks, the pool has {len(docs)}")
    index = {d: i for i, d in enumerate(docs)}
    n_hard = round((k - 1) * settings.hard_fraction)
    bm25 = BM25(docs) if n_hard else None
    rng = random.Random(settings.seed)
    records = []
    for ex in qa:
        gold = index[ex.chunks[0]]
        picked = bm25.top(ex.question, n_hard, exclude=[gold]) if bm25 else []
        taken = {gold, *picked}
        while len(picked) < k - 1:  # random distractors (and filler where BM25 found too few)
            d = rng.randrange(len(docs))
            if d not in taken:
                taken.add(d)
                picked.append(d)
        order = [gold, *picked]
        rng.shuffle(order)
        records.append({"question": ex.question, "docs": [docs[i] for i in order],
                        "pos_index": [order.index(gold)], "answer": ex.answer})
    return records


def run_derive(inputs: Sequence[str | Path], out: str | Path, settings: DeriveSettings, holdout: float = 0.0,
               holdout_out: str | Path | None = None, log=print) -> dict[str, int]:
    """Read stage-1 records, derive ``settings.stage`` records, write JSONL; returns counts.

    ``holdout`` sets aside that fraction of the chunks (split by chunk) and writes their questions'
    records to ``holdout_out``, with distractors from all chunks.
    """
    import time

    from clara.data.records import read_records

    if holdout and holdout_out is None:
        raise ValueError("holdout needs holdout_out (where the held-out records go)")
    t0 = time.perf_counter()
    examples = [ex for path in inputs for ex in read_records(path, "scp")]
    qa = [ex for ex in examples if ex.kind == "qa"]
    all_chunks = chunks_of(qa)
    train, held = split_by_chunk(qa, holdout, settings.seed) if holdout else (qa, [])
    records = derive_records(train, settings)
    write_jsonl(out, records)
    counts = {"questions": len(qa), "chunks": len(all_chunks), "records": len(records), "heldout_records": 0}
    if held:
        held_records = derive_records(held, settings, pool=all_chunks)
        write_jsonl(holdout_out, held_records)
        counts["heldout_records"] = len(held_records)
    log(f"derive: {len(qa)} QA pairs over {len(all_chunks)} chunks -> {counts['records']} {settings.stage} records "
        f"({settings.candidates} candidates, {settings.hard_fraction:.0%} of distractors BM25-hard) in {out}"
        + (f"; {counts['heldout_records']} held-out records in {holdout_out}" if held else "")
        + f" ({time.perf_counter() - t0:.1f}s)")
    return counts
