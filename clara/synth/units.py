"""Records from accepted items, chunk pairs for multi-hop questions, content-keyed work units."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clara.data.jsonl import write_jsonl
from clara.data.records import RecordError, parse_record
from clara.synth.text import chunk_entities, content_tokens

# =============================================================================================
# records


def chunk_records(chunk_id: str, chunk: str, qa_items: Sequence[Mapping[str, str]],
                  paraphrases: Sequence[Mapping[str, str]], generator: str) -> list[dict[str, Any]]:
    """Stage-1 records of one chunk in the reference format: one ``qa`` record holding all its pairs,
    one ``paraphrase`` record per paraphrase. ``chunk_id`` and ``generator`` are provenance, ignored
    by readers of the reference format."""
    out: list[dict[str, Any]] = []
    if qa_items:
        out.append({"data_type": "qa", "question": [q["question"] for q in qa_items],
                    "answers": [q["answer"] for q in qa_items], "docs": [chunk], "chunk_id": chunk_id,
                    "generator": generator})
    for p in paraphrases:
        out.append({"data_type": "paraphrase", "answers": [p["text"]], "docs": [chunk], "chunk_id": chunk_id,
                    "generator": generator})
    return out


def multihop_records(chunk_ids: Sequence[str], chunks: Sequence[str], items: Sequence[Mapping[str, str]],
                     generator: str) -> list[dict[str, Any]]:
    """Multi-hop QA as stage-2 (instruct) records: both chunks are gold (``pos_index [0, 1]``).

    A stage-1 record holds exactly one chunk, so a question that needs two cannot be one.
    """
    return [{"question": it["question"], "docs": list(chunks), "answer": it["answer"], "pos_index": [0, 1],
             "chunk_ids": list(chunk_ids), "bridge": it.get("bridge"), "generator": generator} for it in items]


def validate_record(rec: Mapping[str, Any], stage: str, where: str) -> str | None:
    """``None`` if ``rec`` is a valid ``stage`` record, else the :class:`~clara.data.records.RecordError` text."""
    try:
        parse_record(dict(rec), stage, where)
    except RecordError as e:
        return str(e)
    return None


# =============================================================================================
# pairing chunks for multi-hop questions


def pair_chunks(chunks: Sequence[tuple[str, str]], per_chunk: int = 1, max_df: int = 64) -> list[tuple[str, str]]:
    """Pairs ``(anchor_id, partner_id)`` of related chunks, at most ``per_chunk`` anchored on each chunk.

    ``chunks`` are ``(chunk_id, text)``. The partner shares the rarest entities with the anchor
    (idf-weighted; entities in more than ``max_df`` chunks are ignored), else the rarest content words
    (weighted half). A pair is never repeated in the other direction. Deterministic.
    """
    n = len(chunks)
    if n < 2 or per_chunk <= 0:
        return []
    ents = [chunk_entities(t) for _, t in chunks]
    words = [set(content_tokens(t)) - {w for e in es for w in e.split()} for (_, t), es in zip(chunks, ents)]
    df_e: Counter[str] = Counter(e for es in ents for e in es)
    df_w: Counter[str] = Counter(w for ws in words for w in ws)
    inv_e: dict[str, list[int]] = {}
    inv_w: dict[str, list[int]] = {}
    for i, es in enumerate(ents):
        for e in es:
            if 2 <= df_e[e] <= max_df:
                inv_e.setdefault(e, []).append(i)
    for i, ws in enumerate(words):
        for w in ws:
            if 2 <= df_w[w] <= max_df and len(w) > 3 and not w.isdigit():
                inv_w.setdefault(w, []).append(i)
    taken: set[frozenset[int]] = set()
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        score: Counter[int] = Counter()
        for e in ents[i]:
            for j in inv_e.get(e, ()):
                if j != i:
                    score[j] += math.log(n / df_e[e]) + 1.0
        for w in words[i]:
            for j in inv_w.get(w, ()):
                if j != i:
                    score[j] += 0.5 * math.log(n / df_w[w])
        ranked = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))
        k = 0
        for j, sc in ranked:
            if k >= per_chunk:
                break
            if sc <= 0 or frozenset((i, j)) in taken or chunks[j][1] == chunks[i][1]:
                continue
            taken.add(frozenset((i, j)))
            pairs.append((chunks[i][0], chunks[j][0]))
            k += 1
    return pairs


# =============================================================================================
# work units: content-keyed groups of chunks, each written once, atomically


@dataclass(frozen=True)
class UnitChunk:
    chunk_id: str
    text: str
    content_hash: str


@dataclass(frozen=True)
class WorkUnit:
    """A group of chunks whose records are written together, in one file named by ``key``.

    ``pairs`` are the multi-hop pairs anchored on the unit's chunks, as ``(anchor, partner)`` chunks.
    """

    key: str
    chunks: tuple[UnitChunk, ...]
    pairs: tuple[tuple[UnitChunk, UnitChunk], ...] = ()


def plan_units(chunks: Sequence[UnitChunk], pairs: Sequence[tuple[str, str]], fingerprint: str,
               target_chunks: int = 64) -> list[WorkUnit]:
    """Group ``chunks`` (in order) into units of about ``target_chunks``, keyed by content and settings.

    Boundaries are content-defined (after a chunk whose id hashes to 0 mod ``target_chunks``, or at
    4x the target), so adding or removing a document only changes the units around it and a rerun
    redoes only those. The key hashes ``fingerprint`` (the settings that shape the output) and each
    chunk's id and content hash, and each pair's partner.
    """
    if target_chunks < 1:
        raise ValueError(f"target_chunks must be >= 1, got {target_chunks}")
    by_id = {c.chunk_id: c for c in chunks}
    if len(by_id) != len(chunks):
        dup = next(cid for cid, k in Counter(c.chunk_id for c in chunks).items() if k > 1)
        raise ValueError(f"duplicate chunk id {dup!r}")
    anchored: dict[str, list[UnitChunk]] = {}
    for a, b in pairs:
        anchored.setdefault(a, []).append(by_id[b])
    groups: list[list[UnitChunk]] = [[]]
    for c in chunks:
        groups[-1].append(c)
        h = int(hashlib.sha256(c.chunk_id.encode("utf-8")).hexdigest()[:12], 16)
        if h % target_chunks == 0 or len(groups[-1]) >= 4 * target_chunks:
            groups.append([])
    units = []
    for g in groups:
        if not g:
            continue
        unit_pairs = tuple((c, p) for c in g for p in anchored.get(c.chunk_id, ()))
        desc = json.dumps([fingerprint, [(c.chunk_id, c.content_hash) for c in g],
                           [(a.chunk_id, b.chunk_id, b.content_hash) for a, b in unit_pairs]])
        units.append(WorkUnit(hashlib.sha256(desc.encode("utf-8")).hexdigest()[:24], tuple(g), unit_pairs))
    return units


def unit_path(out_dir: str | Path, key: str) -> Path:
    return Path(out_dir) / "units" / f"{key}.jsonl"


def write_unit_file(out_dir: str | Path, key: str, lines: Iterable[Mapping[str, Any]]) -> Path:
    """Write one unit's output (JSON lines, each with a ``type``) atomically: a temporary file, fsync'd,
    then renamed, so a unit file is either whole or absent."""
    return write_jsonl(unit_path(out_dir, key), lines)


def read_unit_file(out_dir: str | Path, key: str) -> Iterator[dict[str, Any]]:
    with unit_path(out_dir, key).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


