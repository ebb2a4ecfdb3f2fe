"""Evaluation job: compressed vs plain-text RAG vs closed-book, on Ray Data.

    python -m pipelines.evaluate --model runs/stage3/model --data eval.jsonl --out runs/eval
    python -m pipelines.evaluate --model rate4/model --model rate16/model --data eval.jsonl --out runs/eval
    ray job submit --working-dir . -- python -m pipelines.evaluate --model s3://bucket/model ...

Records are stage-3 (``{"question", "docs": [candidates], "pos_index": [...], "answer"}``) or
stage-2 records (every doc counts as gold), validated before anything runs. Examples are sharded
over a Ray Data actor pool (each actor loads the model once); per-example rows come back to the
driver, which writes ``results.json``, ``results.md`` and the plots. Several ``--model`` give a
sweep over compression rates (one plot line per mode).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clara import settings
from clara.data.records import Example, read_records
from clara.eval.evaluate import EvalReport, EvalSettings, aggregate, evaluate_examples, write_report
from clara.settings import ConfigError


@dataclass
class EvaluateJobSettings:
    """Settings of one evaluation run: the flags of ``python -m pipelines.evaluate`` and its ``--config`` fields."""

    #: CLaRa model directories (several: a sweep over compression rates, one plot line per mode).
    models: list[str] = field(metadata={"flags": ("--model",)})
    #: JSONL of stage-3 records (or, with ``--stage instruct``, stage-2 records).
    data: str
    #: Directory for results.json, results.md and the plots.
    out: str = "runs/eval"
    #: Record format of ``--data``.
    stage: Literal["e2e", "instruct"] = "e2e"
    #: Evaluate only the first N records.
    limit: int | None = None
    eval: EvalSettings = field(default_factory=EvalSettings, metadata={"flatten": True})
    #: Evaluation actors (model replicas).
    actors: int = 1
    #: CPUs of each actor.
    num_cpus_per_actor: float = 0.5
    #: GPUs of each actor.
    num_gpus_per_actor: float = 0.0
    #: Override the model's device setting (cpu, cuda, mps).
    device: str | None = None
    #: Evaluate in this process without Ray (small sets; debugging).
    local: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.models, str):
            self.models = [self.models]
        if not self.models:
            raise ConfigError("models: give at least one --model")
        if self.stage not in ("e2e", "instruct"):
            raise ConfigError(f"stage: must be e2e or instruct, got {self.stage!r}")
        if self.actors <= 0:
            raise ConfigError(f"actors: must be positive, got {self.actors}")


#: Fields the command line (or ``--config``) must give.
REQUIRED = ("models", "data")


class _EvalActor:
    """Ray Data callable class: loads one model, evaluates a batch of examples into rows."""

    def __init__(self, model_path: str, eval_settings: EvalSettings, device: str | None):
        from clara.model import ClaraModel

        self.model = ClaraModel.from_pretrained(model_path, device=device)
        self.settings = eval_settings

    def __call__(self, batch: dict) -> dict:
        import json

        examples = [Example(tuple(d), q, a, tuple(g), "e2e") for d, q, a, g in
                    zip(batch["docs"], batch["question"], batch["answer"], batch["gold"])]
        rows = evaluate_examples(self.model, examples, self.settings)
        return {"row": [json.dumps(r) for r in rows]}


def _evaluate_model(path: str, examples: Sequence[Example], s: EvaluateJobSettings) -> list[dict]:
    if s.local:
        from clara.model import ClaraModel

        return evaluate_examples(ClaraModel.from_pretrained(path, device=s.device), examples, s.eval)
    import json

    import ray

    from pipelines.compat import actor_pool, ensure_ray

    ensure_ray()
    items = [{"docs": list(ex.chunks), "question": ex.question, "answer": ex.answer, "gold": list(ex.gold)}
             for ex in examples]
    ds = ray.data.from_items(items).map_batches(
        _EvalActor, fn_constructor_args=(path, s.eval, s.device), batch_size=s.eval.batch_size,
        batch_format="numpy", **actor_pool(s.actors, num_cpus=s.num_cpus_per_actor,
                                           num_gpus=s.num_gpus_per_actor or None))
    return [json.loads(r["row"]) for r in ds.take_all()]


def run_evaluate(s: EvaluateJobSettings, out=print) -> dict[str, EvalReport]:
    """Evaluate every model on the same examples; write results.json/.md and the plots."""
    from clara.checkpoint import read_manifest

    t0 = time.perf_counter()
    examples = read_records(s.data, s.stage, limit=s.limit)
    out(f"evaluate: {len(examples)} questions from {s.data}; modes {', '.join(s.eval.modes)}; "
        f"settings {', '.join(s.eval.settings)}; top-{s.eval.top_k}")
    reports: dict[str, EvalReport] = {}
    for i, path in enumerate(s.models, 1):
        config = read_manifest(path)["config"]
        label = f"rate {config['compression_rate']}" if len(s.models) > 1 else Path(path).name
        if label in reports:
            label = f"{label} ({path})"
        t = time.perf_counter()
        out(f"[{i}/{len(s.models)}] {path}: compression rate {config['compression_rate']}, "
            f"n_mem {config['doc_max_tokens'] // config['compression_rate']}")
        rows = _evaluate_model(path, examples, s)
        reports[label] = aggregate(rows, meta={"model": str(path), "compression_rate": config["compression_rate"],
                                               "seconds": time.perf_counter() - t})
        out(reports[label].markdown())
    paths = write_report(reports, s.out)
    out(f"done in {time.perf_counter() - t0:.0f}s: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    return reports


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_config_flags(p)
    settings.add_flags(p, EvaluateJobSettings, required=REQUIRED)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    s = settings.settings_for_main(EvaluateJobSettings, a, required=REQUIRED)
    if s is not None:
        run_evaluate(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
