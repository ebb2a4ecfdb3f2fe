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

from clara.config import ClaraConfig, LoraSettings
from clara.data.derive import DeriveSettings, derive_records, split_by_chunk
from clara.data.records import Example, chunks_of, parse_record, read_records, reconstruction_example
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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(stage: str, total: int):
    def show(step, out, sec):
        left = sec / (step + 1) * (total - step - 1)
        extra = "".join(f" {k} {v:.2f}" for k, v in out.metrics.items())
        log(f"  {stage} step {step + 1}/{total} loss {float(out.loss.detach()):.3f}{extra} eta {left / 60:.1f} min")
    return show


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/scp_sample.jsonl")
    p.add_argument("--out", type=Path, default=Path("runs/claims"))
    p.add_argument("--rates", default="4,16")
    p.add_argument("--base-model", help="a real pretrained causal LM (name or directory): frozen, LoRA adapters "
                                        "only (r=16, as in the paper), instead of a tiny model from random weights")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = ClaimsSettings(data=a.data, out=a.out, rates=tuple(int(r) for r in a.rates.split(",")), **PRESETS[a.preset])
    s.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = read_records(s.data, "scp")
    train_qa, test_qa = split_by_chunk(records, s.test_chunks, s.seed, max_train_chunks=s.train_chunks)
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
    base = Path(a.base_model) if a.base_model else build_tiny_model(s.out / "base", tok_texts,
                            TinyModelSpec(vocab_size=4096, hidden_size=s.hidden, num_layers=s.layers,
                                          num_heads=4, num_kv_heads=4))
    evs = EvalSettings(top_k=5, recall_ks=(1, 3, 5), max_new_tokens=24, batch_size=16)
    reports, retrieval = {}, {}

    def config(rate):
        if a.base_model:  # the paper's layout: a frozen pretrained base, LoRA adapters
            return ClaraConfig(base_model=a.base_model, compression_rate=rate, doc_max_tokens=s.doc_max_tokens,
                               lora=LoraSettings(r=16, alpha=32, dropout=0.1), train_base=False, top_k=5,
                               device=a.device)
        return ClaraConfig(base_model=str(base.resolve()), compression_rate=rate, doc_max_tokens=s.doc_max_tokens,
                           lora=LoraSettings(r=8, alpha=16, dropout=0.0), train_base=True, top_k=5, device=a.device)

    recon = [reconstruction_example(c) for c in train_chunks]
    for rate in s.rates:
        log(f"rate {rate}: n_mem {s.doc_max_tokens // rate}")
        model = ClaraModel.from_base(config(rate), seed=s.seed)
        st = TrainSettings(steps=s.steps1, batch_size=s.batch_size, lr=s.lr, warmup_ratio=0.05,
                           reconstruction_warmup=0.5, log_every=max(1, s.steps1 // 10), seed=s.seed)
        train(model, "scp", train_qa + recon, st, progress=progress("stage1", s.steps1))
        st = TrainSettings(steps=s.steps2, batch_size=max(4, s.batch_size // 4), lr=s.lr / 2, warmup_ratio=0.05,
                           log_every=max(1, s.steps2 // 5), seed=s.seed)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
