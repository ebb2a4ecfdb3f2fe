"""Derive stage-2 (instruct) and stage-3 (e2e) records from stage-1 (SCP) records.

    python -m pipelines.derive --input scp.jsonl --stage instruct --out instruct.jsonl
    python -m pipelines.derive --input scp.jsonl --stage e2e --out e2e.jsonl --candidates 20 \\
        --hard-fraction 0.5 --seed 0 --holdout 0.1 --holdout-out e2e_eval.jsonl
    ray job submit --working-dir . -- python -m pipelines.derive --input data/scp.jsonl --stage e2e --out ...

(``clara derive ...`` is the same command.) Each stage-1 QA pair becomes one record: its own
chunk is the gold (``pos_index``), the other candidates are distractors, a ``--hard-fraction`` of
them the chunks BM25 ranks highest for the question and the rest drawn at random.

``--holdout`` sets aside a fraction of the *chunks* (never of the questions: questions about one
chunk share its facts) and writes their questions to ``--holdout-out``. Training records draw
distractors from the training chunks only; held-out records from all chunks, as retrieval at
evaluation time searches the whole corpus.

Every input record is validated first (a bad one fails naming file and line). The work is one
in-memory pass in this process (BM25 needs the whole chunk pool): fine up to a few hundred
thousand chunks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from clara.data.derive import DeriveSettings, derive_records, split_by_chunk
from clara.data.records import RecordError, chunks_of, read_records


def _write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def run_derive(inputs: Sequence[str | Path], out: str | Path, settings: DeriveSettings, holdout: float = 0.0,
               holdout_out: str | Path | None = None, log=print) -> dict[str, int]:
    """Read stage-1 records, derive ``settings.stage`` records, write JSONL; returns counts."""
    if holdout and holdout_out is None:
        raise ValueError("--holdout needs --holdout-out (where the held-out records go)")
    t0 = time.perf_counter()
    examples = [ex for path in inputs for ex in read_records(path, "scp")]
    qa = [ex for ex in examples if ex.kind == "qa"]
    all_chunks = chunks_of(qa)
    train, held = split_by_chunk(qa, holdout, settings.seed) if holdout else (qa, [])
    records = derive_records(train, settings)
    _write_jsonl(records, Path(out))
    counts = {"questions": len(qa), "chunks": len(all_chunks), "records": len(records), "heldout_records": 0}
    if held:
        held_records = derive_records(held, settings, pool=all_chunks)
        _write_jsonl(held_records, Path(holdout_out))
        counts["heldout_records"] = len(held_records)
    log(f"derive: {len(qa)} QA pairs over {len(all_chunks)} chunks -> {counts['records']} {settings.stage} records "
        f"({settings.candidates} candidates, {settings.hard_fraction:.0%} of distractors BM25-hard) in {out}"
        + (f"; {counts['heldout_records']} held-out records in {holdout_out}" if held else "")
        + f" ({time.perf_counter() - t0:.1f}s)")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.derive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, help="stage-1 JSONL records (repeatable)")
    p.add_argument("--stage", required=True, choices=("instruct", "e2e"), help="record format to produce")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--candidates", type=int, help="chunks per record, gold included (default 5 instruct, 20 e2e)")
    p.add_argument("--hard-fraction", type=float, default=0.5, help="fraction of distractors from BM25's top hits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of chunks held out (split by chunk)")
    p.add_argument("--holdout-out", help="output JSONL of the held-out chunks' records")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        settings = DeriveSettings(stage=a.stage, candidates=a.candidates, hard_fraction=a.hard_fraction, seed=a.seed)
        run_derive(a.input, a.out, settings, holdout=a.holdout, holdout_out=a.holdout_out)
    except (RecordError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
