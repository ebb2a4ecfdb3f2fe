"""The method's two claims, measured at small scale on real data.

Claims (the paper, Mistral-7B): (1) a compressor at 16x answers about as well as the same model
reading the text (cover-EM 38.96 vs 37.67, normal setting); (2) end-to-end training makes
retrieval learn from the generator (Recall@5 96.21 vs 85.93 for a BGE reranker and 82.84 for a
contrastively supervised query reasoner).

Here: ../shared/data/scp_sample.jsonl split **by chunk** (held-out chunks never seen in
training). A tiny Llama (random init, tokenizer trained on the training side) is trained, per
compression rate, through stage 1 (reconstruction curriculum, then QA + reconstruction), stage 2
(question + 5 chunks -> answer) and stage 3 (query reasoner initialised from the compressor,
trained with the generator through the differentiable top-k over 20 candidates). A second model
with the same budget is trained as plain-text RAG (the generator reads chunk text). On the
held-out chunks it reports:

* cover-EM / EM / F1 of compressed (each rate) vs plain text vs closed-book, normal and oracle;
* Recall@1/3/5 of the gold chunk among 20 candidates for the stage-3 query reasoner, the stage-2
  model's query reasoner (a copy of the compressor: plain cosine in memory space), BM25, and
  all-MiniLM-L6-v2 (a strong off-the-shelf dense retriever, offline from its wheel).

    python benchmarks/claims.py --preset full --out runs/claims     # ~1 hour on 2 cores
    python benchmarks/claims.py --preset medium --out runs/claims-m # ~30 minutes
    python benchmarks/claims.py --preset quick --out runs/claims-q  # ~5 minutes: a smoke run

On the real base (issue 13, G1/G2): ``--preset smollm2`` starts stage 1 from the shipped compressor
``clara-smollm2-135m-r4`` (SmolLM2-135M-Instruct, rate 4, 64-token chunks; reconstruction-pretrained
on public data) and holds out exactly the 48 chunks that compressor never saw (memory_probe's split,
seed 0); the text-RAG baseline is SmolLM2 with a fresh LoRA generator trained for as many steps as
stages 1 and 2 together::

    python benchmarks/claims.py --preset smollm2 --out runs/claims-smollm2   # ~1 hour on 2 idle cores

``--preset smollm2-qa`` does the same from the shipped QA model ``clara-smollm2-135m-r4-qa`` (trained from
``clara-smollm2-135m-r4`` on the training side of the same split), with that model's recipe and stage 2
keeping the generator that reads memory.

Writes ``results.json``, ``results.md`` and plots under ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from memory_probe import probe_split

from clara.checkpoint import read_manifest
from clara.config import ClaraConfig, LoraSettings
from clara.data.derive import DeriveSettings, derive_records, split_by_chunk
from clara.data.records import (
    Example,
    answerable_in_window,
    chunks_of,
    parse_record,
    read_records,
    reconstruction_example,
)
from clara.eval.baselines import bm25_ranker, minilm_ranker
from clara.eval.evaluate import EvalSettings, aggregate, evaluate_examples, write_report
from clara.model import ClaraModel
from clara.tiny import TinyModelSpec, build_tiny_model
from clara.training.loop import TrainSettings, train

PRESETS = {
    "quick": dict(test_chunks=30, train_chunks=60, steps1=120, steps2=40, steps3=30, steps_text=120,
                  eval_questions=40, hidden=128, layers=2),
    "medium": dict(test_chunks=100, train_chunks=400, steps1=800, steps2=200, steps3=150, steps_text=800,
                   eval_questions=200, hidden=128, layers=2),
    "full": dict(test_chunks=100, train_chunks=800, steps1=1600, steps2=400, steps3=300, steps_text=1600,
                 eval_questions=300, hidden=128, layers=2),
    # SmolLM2 from the shipped compressor: few, dearer steps (a stage-1 step of 8 is ~7 s in bf16 here).
    "smollm2": dict(test_chunks=48, train_chunks=800, steps1=60, steps2=40, steps3=24, steps_text=100,
                    eval_questions=96, batch_size=8, lr=1e-3, lr3=2.5e-4, negatives=0.25,
                    reconstruction_warmup=0.0, init="clara-smollm2-135m-r4", base_model="smollm2-135m",
                    answerable_in_window=True),
    # The same budget from the shipped QA model (its own recipe: 10% negatives, lr 5e-4), stage 2 keeping
    # stage 1's generator (the one that learned to read memory); held out: the same 48 chunks.
    "smollm2-qa": dict(test_chunks=48, train_chunks=800, steps1=60, steps2=40, steps3=24, steps_text=100,
                       eval_questions=96, batch_size=8, lr=5e-4, lr3=2.5e-4, negatives=0.1,
                       reconstruction_warmup=0.0, init="clara-smollm2-135m-r4-qa", base_model="smollm2-135m",
                       answerable_in_window=True, stage2_fresh_generator=False),
}


@dataclass
class ClaimsSettings:
    data: Path
    out: Path
    rates: tuple[int, ...] = (4, 16)
    test_chunks: int = 100
    train_chunks: int = 800
    steps1: int = 1600
    steps2: int = 400
    steps3: int = 300
    steps_text: int = 1600
    eval_questions: int = 300
    hidden: int = 128
    layers: int = 2
    doc_max_tokens: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    lr3: float = 5e-4
    candidates: int = 20
    seed: int = 0
    #: Stage 1: fraction of steps that are reconstruction only (the tiny model's curriculum).
    reconstruction_warmup: float = 0.5
    #: Stages 1-2: fraction of QA examples made wrong-memory negatives.
    negatives: float = 0.0
    #: Start from this compressor (a model directory or packaged name) instead of fresh adapters; the
    #: held-out chunks are then the ones it never saw (memory_probe's split).
    init: str | None = None
    #: A real pretrained base (name or directory) instead of a tiny model from random weights.
    base_model: str | None = None
    #: Keep only questions whose answer's words are (at least 80%) in the first ``doc_max_tokens``
    #: tokens of their chunk: the window both the compressor and the text reader see. The sample's
    #: chunks run to ~160 tokens (median), so at 64 tokens most answers lie outside the window.
    answerable_in_window: bool = False
    #: Stage 2 starts a fresh generator, as the production job does (the paper's recipe); ``False``
    #: keeps stage 1's generator, which already reads memory (what a short CPU budget needs).
    stage2_fresh_generator: bool = True


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(stage: str, total: int):
    def show(step, out, sec):
        left = sec / (step + 1) * (total - step - 1)
        extra = "".join(f" {k} {v:.2f}" for k, v in out.metrics.items())
        log(f"  {stage} step {step + 1}/{total} loss {float(out.loss.detach()):.3f}{extra} eta {left / 60:.1f} min")
    return show


def in_window(examples: list[Example], s: ClaimsSettings) -> list[Example]:
    """The examples whose answer lies in their chunk's reading window (:func:`answerable_in_window`)."""
    from transformers import AutoTokenizer

    from clara.bases import resolve_base

    tok = AutoTokenizer.from_pretrained(resolve_base(s.base_model))
    return answerable_in_window(examples, tok, s.doc_max_tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/scp_sample.jsonl")
    p.add_argument("--out", type=Path, default=Path("runs/claims"))
    p.add_argument("--rates", help="compression rates, comma-separated (default 4,16; with an --init model, "
                                   "its rate)")
    p.add_argument("--base-model", help="a real pretrained causal LM (name or directory): frozen, LoRA adapters "
                                        "only (r=16, as in the paper), instead of a tiny model from random weights")
    p.add_argument("--init", help="start stage 1 from this compressor (model directory or packaged name)")
    p.add_argument("--stage2-keeps-generator", action="store_true",
                   help="stage 2 continues stage 1's generator instead of starting a fresh one (the job's default)")
    p.add_argument("--no-text-baseline", action="store_true",
                   help="skip the text-RAG baseline and the BM25 / MiniLM rows (~20 min with SmolLM2); it depends only "
                        "on --data, the split, the base and the budget, so a run with the same ones already has it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    preset = {**PRESETS[a.preset], **{k: v for k, v in (("init", a.init), ("base_model", a.base_model)) if v}}
    s = ClaimsSettings(data=a.data, out=a.out, **preset)
    if a.stage2_keeps_generator:
        s.stage2_fresh_generator = False
    init_cfg = read_manifest(s.init)["config"] if s.init else None
    if init_cfg:
        if s.base_model and s.base_model != init_cfg["base_model"]:
            p.error(f"--init {s.init} was trained on {init_cfg['base_model']!r}, not --base-model {s.base_model!r}")
        s.base_model, s.doc_max_tokens = init_cfg["base_model"], init_cfg["doc_max_tokens"]
        s.rates = (init_cfg["compression_rate"],)
    if a.rates:
        s.rates = tuple(int(r) for r in a.rates.split(","))
        if init_cfg and s.rates != (init_cfg["compression_rate"],):
            p.error(f"--init {s.init} is a rate-{init_cfg['compression_rate']} compressor; another rate needs its "
                    "own compressor (benchmarks/memory_probe.py --rate N --save DIR, then --init DIR)")
    s.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = read_records(s.data, "scp")
    if s.init:  # hold out the chunks the compressor never saw
        held, kept = probe_split(records, s.test_chunks, s.train_chunks, s.seed)
        held, kept = set(held), set(kept)
        train_qa = [ex for ex in records if ex.chunks[0] in kept]
        test_qa = [ex for ex in records if ex.chunks[0] in held]
    else:
        train_qa, test_qa = split_by_chunk(records, s.test_chunks, s.seed, max_train_chunks=s.train_chunks)
    if s.answerable_in_window:
        n_train, n_test = len(train_qa), len(test_qa)
        train_qa, test_qa = in_window(train_qa, s), in_window(test_qa, s)
        log(f"questions answerable in the {s.doc_max_tokens}-token window: {len(train_qa)}/{n_train} train, "
            f"{len(test_qa)}/{n_test} held out")
    train_chunks, test_chunks = chunks_of(train_qa), chunks_of(test_qa)
    log(f"split by chunk: {len(train_chunks)} train chunks ({len(train_qa)} QA), "
        f"{len(test_chunks)} held-out chunks ({len(test_qa)} QA)")
    rng = random.Random(s.seed)

    def derive(qa, stage, n, seed):
        records = derive_records(qa, DeriveSettings(stage=stage, candidates=n, seed=seed))
        return [parse_record(r, "e2e", f"derived {i}")[0] for i, r in enumerate(records)]

    instruct = derive(train_qa, "instruct", 5, s.seed)
    e2e_train = derive(train_qa, "e2e", s.candidates, s.seed)
    e2e_test = derive(test_qa, "e2e", s.candidates, s.seed + 1)
    e2e_test = rng.sample(e2e_test, min(s.eval_questions, len(e2e_test)))
    (s.out / "eval_e2e.jsonl").write_text("".join(json.dumps(
        {"question": ex.question, "docs": list(ex.chunks), "pos_index": list(ex.gold), "answer": ex.answer}) + "\n"
        for ex in e2e_test))

    tok_texts = train_chunks + [ex.question for ex in train_qa] + [ex.answer for ex in train_qa]
    base = s.base_model if s.base_model else build_tiny_model(s.out / "base", tok_texts,
                            TinyModelSpec(vocab_size=4096, hidden_size=s.hidden, num_layers=s.layers,
                                          num_heads=4, num_kv_heads=4))
    evs = EvalSettings(top_k=5, recall_ks=(1, 3, 5), max_new_tokens=24, batch_size=16)
    reports, retrieval = {}, {}

    def config(rate):
        if s.base_model:  # the paper's layout: a frozen pretrained base, LoRA adapters
            lora = (LoraSettings(**init_cfg["lora"]) if init_cfg
                    else LoraSettings(r=16, alpha=32, dropout=0.1))
            return ClaraConfig(base_model=s.base_model, compression_rate=rate, doc_max_tokens=s.doc_max_tokens,
                               lora=lora, train_base=False, top_k=5, device=a.device)
        return ClaraConfig(base_model=str(base.resolve()), compression_rate=rate, doc_max_tokens=s.doc_max_tokens,
                           lora=LoraSettings(r=8, alpha=16, dropout=0.0), train_base=True, top_k=5, device=a.device)

    recon = [reconstruction_example(c) for c in train_chunks]
    for rate in s.rates:
        log(f"rate {rate}: n_mem {s.doc_max_tokens // rate}")
        if s.init:
            model = ClaraModel.from_pretrained(s.init, device=None if a.device == "auto" else a.device)
            model.config.top_k = 5
        else:
            model = ClaraModel.from_base(config(rate), seed=s.seed)
        st = TrainSettings(steps=s.steps1, batch_size=s.batch_size, lr=s.lr, warmup_ratio=0.05,
                           reconstruction_warmup=s.reconstruction_warmup, wrong_memory_negatives=s.negatives,
                           log_every=max(1, s.steps1 // 10), seed=s.seed)
        train(model, "scp", train_qa + recon, st, progress=progress("stage1", s.steps1))
        st = TrainSettings(steps=s.steps2, batch_size=max(4, s.batch_size // 4), lr=s.lr / 2, warmup_ratio=0.05,
                           wrong_memory_negatives=s.negatives, log_every=max(1, s.steps2 // 5), seed=s.seed,
                           reinit_adapters=s.stage2_fresh_generator)
        train(model, "instruct", instruct, st, progress=progress("stage2", s.steps2))
        model.copy_adapter("compressor", "query_reasoner")
        stage2_rows = evaluate_examples(model, e2e_test, EvalSettings(modes=(), recall_ks=(1, 3, 5)))
        retrieval[f"stage-2 cosine (rate {rate})"] = aggregate(stage2_rows).retrieval
        st = TrainSettings(steps=s.steps3, batch_size=max(4, s.batch_size // 8), lr=s.lr3, warmup_ratio=0.05,
                           log_every=max(1, s.steps3 // 5), seed=s.seed)
        train(model, "e2e", e2e_train, st, progress=progress("stage3", s.steps3))
        model.save_pretrained(s.out / f"model-rate{rate}")
        rows = evaluate_examples(model, e2e_test, evs)
        reports[f"rate {rate}"] = aggregate(rows, meta={"compression_rate": rate})
        retrieval[f"stage-3 query reasoner (rate {rate})"] = reports[f"rate {rate}"].retrieval
        log(f"rate {rate}:\n{reports[f'rate {rate}'].markdown()}")

    if a.no_text_baseline:
        log("text-RAG baseline skipped (--no-text-baseline)")
    else:
        text_baseline(s, config, instruct, e2e_test, reports, retrieval)
    finish(s, reports, retrieval, t0)
    return 0


def text_baseline(s: ClaimsSettings, config, instruct, e2e_test, reports, retrieval) -> None:
    """Plain-text RAG on the same base and budget (a fresh LoRA generator), plus BM25 / MiniLM retrieval."""
    log("plain-text RAG baseline, same backbone and budget")
    text_model = ClaraModel.from_base(config(s.rates[0]), seed=s.seed)
    text_train = [Example(ex.chunks, ex.question, ex.answer, ex.gold, "instruct") for ex in instruct]
    st = TrainSettings(steps=s.steps_text, batch_size=max(4, s.batch_size // 4), lr=s.lr, warmup_ratio=0.05,
                       log_every=max(1, s.steps_text // 10), seed=s.seed)
    model_state = train(text_model, "text", text_train, st, progress=progress("text", s.steps_text))
    del model_state
    rows = evaluate_examples(text_model, e2e_test, EvalSettings(modes=("text", "closed_book"), top_k=5,
                                                                max_new_tokens=24), ranker=bm25_ranker())
    reports["text RAG (BM25 top-5)"] = aggregate(rows, meta={})
    for name, ranker in (("BM25", bm25_ranker()), ("all-MiniLM-L6-v2", minilm_ranker())):
        retrieval[name] = aggregate(evaluate_examples(text_model, e2e_test, EvalSettings(modes=()),
                                                      ranker=ranker)).retrieval


def finish(s: ClaimsSettings, reports, retrieval, t0: float) -> None:
    paths = write_report(reports, s.out)
    table = ["| retriever (20 candidates, held-out chunks) | R@1 | R@3 | R@5 |", "|---|---|---|---|"]
    table += [f"| {k} | {v['recall@1']:.1f} | {v['recall@3']:.1f} | {v['recall@5']:.1f} |"
              for k, v in retrieval.items()]
    answers = ["| model | mode | setting | cover-EM | EM | F1 |", "|---|---|---|---|---|---|"]
    for label, r in reports.items():
        for mode, by in r.answers.items():
            for setting, m in by.items():
                answers.append(f"| {label} | {mode} | {setting} | {m['cover_em']:.1f} | {m['em']:.1f} "
                               f"| {m['f1']:.1f} |")
    summary = "\n".join(answers) + "\n\n" + "\n".join(table) + "\n"
    (s.out / "claims.md").write_text(summary)
    (s.out / "claims.json").write_text(json.dumps({"settings": {k: str(v) for k, v in asdict(s).items()},
                                                   "answers": {k: r.to_dict() for k, r in reports.items()},
                                                   "retrieval": retrieval,
                                                   "minutes": (time.perf_counter() - t0) / 60}, indent=2))
    print(summary)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; {paths['markdown']}, {s.out / 'claims.md'}")


if __name__ == "__main__":
    sys.exit(main())
