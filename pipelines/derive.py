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
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from clara import settings
from clara.data.derive import DeriveSettings, run_derive
from clara.data.records import RecordError


@dataclass
class DeriveJobSettings:
    """The flags of ``python -m pipelines.derive`` and the fields of its ``--config``."""

    #: Stage-1 JSONL record files.
    input: list[str]
    #: Output JSONL.
    out: str
    #: How records are drawn (``--stage``, ``--candidates``, ``--hard-fraction``, ``--seed``).
    derive: DeriveSettings = field(metadata={"flatten": True})
    #: Fraction of chunks held out (split by chunk).
    holdout: float = 0.0
    #: Output JSONL of the held-out chunks' records.
    holdout_out: str | None = None


REQUIRED = ("input", "out", "derive.stage")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.derive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_config_flags(p)
    settings.add_flags(p, DeriveJobSettings, required=REQUIRED)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        s = settings.from_args(DeriveJobSettings, a, required=REQUIRED)
        if a.print_config:
            settings.print_config(s)
            return 0
        run_derive(s.input, s.out, s.derive, holdout=s.holdout, holdout_out=s.holdout_out)
    except (RecordError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
