"""Retrieval over a whole index: latent (the query reasoner) vs BM25 (LanceDB's full-text index) vs
hybrid (both fused by reciprocal rank, re-scored on the memories), Recall@k of each question's own chunk.

    python benchmarks/bench_retrieval.py                                   # the shipped SmolLM2 model
    python benchmarks/bench_retrieval.py --model runs/stage3/model --json out.json

Every distinct chunk of ``../shared/data/scp_sample.jsonl`` (900) is compressed by the model's compressor
and written to a LanceDB table in a temporary directory with the library (what the index job writes,
without Ray), with the full-text index the index job keeps. Questions: those of the held-out chunks
(the split of ``benchmarks/memory_probe.py``, chunks the shipped compressor never saw), each searched
against all chunks. Hybrid is run at several BM25 weights (``--text-weights``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def recall(results, gold: list[str], k: int) -> float:
    return 100.0 * float(np.mean([g in r.chunk_ids[:k] for g, r in zip(gold, results)]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clara-smollm2-135m-r4", help="a model directory or a shipped model's name")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/scp_sample.jsonl")
    p.add_argument("--held-out", type=int, default=48, help="held-out chunks whose questions are asked")
    p.add_argument("--candidates", type=int, default=50, help="candidates of each half before fusion")
    p.add_argument("--text-weights", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--dtype", default="float16", help="the index's memory storage dtype")
    p.add_argument("--json", type=Path, help="write the figures here too")
    p.add_argument("--cache", type=Path, help="an .npy file of the chunks' memories: read if it exists, else written")
    a = p.parse_args(argv)

    import torch
    from memory_probe import probe_split

    from clara.bases import resolve_model_dir
    from clara.data.records import read_records
    from clara.index.build import read_compressor_info, scp_doc_id, store_settings_for
    from clara.index.store import ChunkStore
    from clara.model import ClaraModel

    records = read_records(a.data, "scp")
    held_out, _ = probe_split(records, a.held_out, 0, seed=0)
    held = set(held_out)
    asked = [ex for ex in records if ex.chunks[0] in held]
    chunks = sorted({ex.chunks[0] for ex in records})
    model_dir = resolve_model_dir(a.model)
    model = ClaraModel.from_pretrained(model_dir)
    t0 = time.perf_counter()
    if a.cache and a.cache.exists():
        memory = np.load(a.cache)
    else:
        memory = torch.cat([model.compress(chunks[s:s + 16]) for s in range(0, len(chunks), 16)]).float().numpy()
        if a.cache:
            np.save(a.cache, memory)
    compress_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        store = ChunkStore.open(Path(tmp) / "db", store_settings_for(read_compressor_info(model_dir), dtype=a.dtype))
        ids = [f"{scp_doc_id(c)}::0" for c in chunks]
        store.upsert([{"chunk_id": i, "doc_id": i[:-3], "position": 0, "text": c, "memory": m}
                      for i, c, m in zip(ids, chunks, memory)])
        store.create_text_index()
        questions = [ex.question for ex in asked]
        gold = [f"{scp_doc_id(ex.chunks[0])}::0" for ex in asked]
        query = model.encode_query(questions).float().numpy()
        kmax = max(a.ks)
        runs = {"latent (exact)": store.exact_search(query, k=kmax),
                "BM25 (LanceDB FTS)": store.text_search(questions, k=kmax)}
        for w in a.text_weights:
            runs[f"hybrid, BM25 weight {w:g}"] = store.hybrid_search(query, questions, k=kmax,
                                                                     candidates=a.candidates, text_weight=w)
    figures = {name: {f"recall@{k}": recall(res, gold, k) for k in a.ks} for name, res in runs.items()}
    out = {"model": str(a.model), "chunks": len(chunks), "questions": len(questions), "held_out_chunks": len(held),
           "candidates": a.candidates, "compress_s": round(compress_s, 1), "recall": figures,
           "date": time.strftime("%Y-%m-%d")}
    print(f"{len(questions)} questions about {len(held)} held-out chunks, searched among {len(chunks)} chunks "
          f"({a.model}; compressed in {compress_s:.0f}s)")
    print(f"{'retrieval':28s}" + "".join(f"{f'R@{k}':>8s}" for k in a.ks))
    for name, f in figures.items():
        print(f"{name:28s}" + "".join(f"{f[f'recall@{k}']:8.1f}" for k in a.ks))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
