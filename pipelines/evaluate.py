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

from clara.data.records import Example, read_records
from clara.eval.evaluate import MODES, SETTINGS, EvalReport, EvalSettings, aggregate, evaluate_examples, write_report


@dataclass
class EvaluateJobSettings:
    models: list[str]
    data: str
    out: str = "runs/eval"
    stage: str = "e2e"  # record format of --data: e2e (pos_index) or instruct
    limit: int | None = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    actors: int = 1
    num_cpus_per_actor: float = 0.5
    num_gpus_per_actor: float = 0.0
    device: str | None = None
    #: Evaluate in this process without Ray (small sets; debugging).
    local: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise SystemExit("give at least one --model")
        if self.stage not in ("e2e", "instruct"):
            raise SystemExit(f"--stage must be e2e or instruct, got {self.stage!r}")
        if self.actors <= 0:
            raise SystemExit("--actors must be positive")


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
    p.add_argument("--model", action="append", required=True,
                   help="CLaRa model directory (repeat for a sweep over compression rates)")
    p.add_argument("--data", required=True, help="JSONL of stage-3 (or, with --stage instruct, stage-2) records")
    p.add_argument("--stage", default="e2e", choices=("e2e", "instruct"), help="record format of --data")
    p.add_argument("--out", default="runs/eval", help="directory for results.json, results.md and the plots")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--settings", default=",".join(SETTINGS), help="normal (retrieved) and/or oracle (gold included)")
    p.add_argument("--top-k", type=int, default=5, help="chunks the generator reads")
    p.add_argument("--recall-ks", default="1,3,5", help="Recall@k cut-offs")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="questions per model call / Ray Data batch")
    p.add_argument("--actors", type=int, default=1, help="evaluation actors (model replicas)")
    p.add_argument("--num-cpus-per-actor", type=float, default=0.5)
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--device", help="override the model's device setting (cpu, cuda, mps)")
    p.add_argument("--local", action="store_true", help="run in this process without Ray")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        ev = EvalSettings(modes=tuple(x for x in a.modes.split(",") if x),
                          settings=tuple(x for x in a.settings.split(",") if x), top_k=a.top_k,
                          recall_ks=tuple(int(k) for k in a.recall_ks.split(",")), max_new_tokens=a.max_new_tokens,
                          batch_size=a.batch_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    run_evaluate(EvaluateJobSettings(models=a.model, data=a.data, out=a.out, stage=a.stage, limit=a.limit, eval=ev,
                                     actors=a.actors, num_cpus_per_actor=a.num_cpus_per_actor,
                                     num_gpus_per_actor=a.num_gpus_per_actor, device=a.device, local=a.local))
    return 0


if __name__ == "__main__":
    sys.exit(main())
