"""ANN keys on REAL memories: how much of the exact top-10 (CLaRa cosine of the flattened memories) lies
within the top-C of a key, for the seeded random projection and for the fitted PCA key (brute force on
the keys in numpy; the ANN index itself is benchmarks/bench_search.py's job).

Rows are real chunks compressed by a CLaRa model: the chunks (docs[0]) of ``--data`` and ``--wiki-docs``
offline Wikipedia summaries chunked as the index builder does (``doc_max_tokens`` tokens, titles, no
overlap). Queries are the query reasoner's memories of ``--queries`` questions (one per scp record,
seeded). PCA keys (``clara.index.codec.fit_key_basis``) are fitted on a seeded sample of all rows
(``all``, largely in-sample) and on Wikipedia rows only (``wiki``: out-of-sample for the scp rows and every
question). ``--cache DIR`` keeps mem.npy / rows.jsonl / qmem.npy / queries.jsonl (+ compress.json), so a
rerun skips the compression.

    python benchmarks/bench_keys.py --model runs/claims-smollm2-qa/model-rate4 --cache runs/keys
                                                               # compresses: ~20-30 min on 2 CPU cores
    python benchmarks/bench_keys.py --cache runs/keys          # again on the cached rows: ~1 min

Measured (2026-12-04, 2-core CPU beside another job; results/bench_keys_real_2026-12-04.txt): 3,648 rows =
900 scp + 2,748 Wikipedia chunks (first 1,212 summaries), 300 questions, the stage-3 model of the claims
run (``benchmarks/claims.py --preset smollm2-qa``: SmolLM2-135M, rate 4, memory 16 x 576); compression ran
at ~2 chunks/s while other jobs shared the 2 cores. Fraction of the exact top-10 in the key's top-C:

    key            fit rows    C=10    C=50   C=100   C=200   C=500  p99 C(all 10)
    random 128            -   0.143   0.376   0.520   0.669   0.834           3085
    random 1024           -   0.536   0.904   0.977   0.994   1.000            346
    mean-pool 576         -   0.319   0.702   0.854   0.949   0.993            810   (added later, same rows)
    pca 64 all         2000   0.369   0.814   0.947   0.990   1.000            390
    pca 128 all        2000   0.522   0.946   0.991   0.999   1.000            193
    pca 256 all        2000   0.658   0.994   0.999   1.000   1.000             89
    pca 64 wiki        2000   0.358   0.789   0.930   0.979   0.996            646
    pca 128 wiki       2000   0.500   0.936   0.987   0.997   1.000            317
    pca 256 wiki       2000   0.643   0.990   0.998   1.000   1.000            119

So on real memories a 128-d PCA key holds 0.99 of the exact top-10 at C = 100 (0.987 fitted on
Wikipedia only) and >= 0.997 at C = 200, better than the 1024-d random projection (0.977 / 0.994; p99
193 vs 346 candidates for all 10); 64-d reaches 0.98-0.99 only at C = 200; 256-d is safe at C = 100.
The memory tokens averaged (a 576-d key with nothing fitted; results/bench_keys_real_meanpool_*) hold 0.854
at C = 100: averaging discards what tells chunks apart, token by token.
A basis fitted on Wikipedia only loses <= 0.025 coverage (<= 0.004 at C >= 100 for 128-256 dims) on
scp rows and questions. The "all" fit sees 2,000 of the 3,648 rows; fitted on all of them
(``--fit-rows 5000``, results/bench_keys_real_fit5000_2026-12-04.txt) PCA-128 reads 0.960 / 0.994 / 0.999
at C = 50 / 100 / 200, within 0.01 of a first study's own randomized SVD on the same rows.
C is relative to a small table (C = 200 is 5.5% of the rows): expect the C needed to grow with the corpus.
Unlike bench_search's Synthetic rows (mean pairwise cosine 0.71, 90% of the energy in 60 components),
real memories share almost no component and spread their energy widely:

    data (unit flattened memories, uncentred)          rows  queries
    mean pairwise cosine                              0.060    0.442
    energy in the top 1 components                    0.076    0.447
    energy in the top 16 components                   0.232    0.578
    energy in the top 64 components                   0.383    0.759
    energy in the top 128 components                  0.498    0.882
    energy in the top 256 components                  0.639    0.986
    components for 90% of the energy                    886      143   (of 3648 / 300)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from clara.index.codec import fit_key_basis, project_keys


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def compress(a) -> None:
    """Compress rows and encode queries with ``a.model``; write them under ``a.cache``."""
    import torch

    from clara.data.corpus import DocumentError, chunk_documents, load_scp_chunks, load_wiki_summaries, scp_chunk_text
    from clara.data.jsonl import read_jsonl
    from clara.model import ClaraModel

    t = time.perf_counter()
    m = ClaraModel.from_pretrained(a.model)
    m.eval()
    print(f"model {a.model} loaded in {time.perf_counter() - t:.0f}s", flush=True)
    scp = load_scp_chunks(a.data)
    rows = [{"id": f"scp:{i}", "source": "scp", "text": c} for i, c in enumerate(scp)]
    wiki = chunk_documents(load_wiki_summaries(limit=a.wiki_docs), m.tokenizer, max_tokens=m.config.doc_max_tokens,
                           overlap=0, titles=True)
    rows += [{"id": c.chunk_id, "source": "wiki", "text": c.text} for c in wiki]
    recs = [r for _, r in read_jsonl(a.data, DocumentError)]
    row_of = {c: i for i, c in enumerate(scp)}
    rng = random.Random(a.seed)
    order = list(range(len(recs)))
    rng.shuffle(order)
    queries = []
    for ri in order:
        qs = recs[ri].get("question") or []
        qs = [q for q in ([qs] if isinstance(qs, str) else qs) if isinstance(q, str) and q.strip()]
        if qs:
            queries.append({"record": ri, "question": qs[rng.randrange(len(qs))],
                            "gold_row": row_of[scp_chunk_text(recs[ri], str(ri))]})
        if len(queries) >= a.queries:
            break
    with torch.inference_mode():
        t = time.perf_counter()
        mem = m.compress([r["text"] for r in rows], batch_size=a.batch).float().numpy().astype(np.float16)
        rate = len(rows) / (time.perf_counter() - t)
        qmem = m.encode_query([q["question"] for q in queries], batch_size=a.batch).float().numpy()
    print(f"compressed {len(rows)} chunks at {rate:.2f} chunks/s", flush=True)
    a.cache.mkdir(parents=True, exist_ok=True)
    np.save(a.cache / "mem.npy", mem)
    np.save(a.cache / "qmem.npy", qmem.astype(np.float16))
    for name, items in (("rows.jsonl", rows), ("queries.jsonl", queries)):
        (a.cache / name).write_text("".join(json.dumps(x) + "\n" for x in items))
    (a.cache / "compress.json").write_text(json.dumps({"model": str(a.model), "chunks_per_s": rate, "rows": len(rows)}))


def coverage(keys: np.ndarray, qkeys: np.ndarray, truth: np.ndarray, cands: list[int]) -> tuple[list[float], float]:
    """Fraction of ``truth`` [Q, 10] inside the key's top-C per C; p99 over queries of the C that holds all 10."""
    order = np.argsort(-(qkeys @ keys.T), axis=1, kind="stable")
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.arange(order.shape[1])[None].repeat(len(order), 0), axis=1)
    tpos = np.take_along_axis(pos, truth, axis=1)
    return [float((tpos < c).mean()) for c in cands], float(np.percentile(tpos.max(1) + 1, 99))


def energy(x: np.ndarray, ks=(1, 16, 64, 128, 256)) -> list[float | int]:
    """Fraction of the (uncentred) energy of unit rows ``x`` in the top-k components, and k for 90%."""
    g = x @ x.T if len(x) <= x.shape[1] else x.T @ x
    lam = np.linalg.eigvalsh(g.astype(np.float64) if len(g) <= 5000 else g)[::-1].clip(min=0)
    cum = np.cumsum(lam) / lam.sum()
    return [float(cum[min(k, len(cum)) - 1]) for k in ks] + [int(np.searchsorted(cum, 0.9) + 1)]


def mean_pairwise_cos(x: np.ndarray) -> float:
    s = x.sum(0, dtype=np.float64)
    return float((s @ s - len(x)) / (len(x) * (len(x) - 1)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clara-smollm2-135m-r4-qa", help="CLaRa model directory or packaged name")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/scp_sample.jsonl",
                   help="stage-1 (scp) JSONL: its docs[0] chunks are rows, its questions the queries")
    p.add_argument("--wiki-docs", type=int, default=1000, help="Wikipedia summaries to chunk into rows (title order)")
    p.add_argument("--queries", type=int, default=300, help="questions, one per scp record (seeded)")
    p.add_argument("--cache", type=Path, default=Path("runs/bench_keys"),
                   help="directory of mem.npy, rows.jsonl, qmem.npy, queries.jsonl: read if present (no compression; "
                        "--model/--data/--wiki-docs/--queries are then ignored), else written")
    p.add_argument("--random-dims", type=int, nargs="+", default=[128, 1024], help="random-projection key widths")
    p.add_argument("--pca-dims", type=int, nargs="+", default=[64, 128, 256], help="PCA key widths")
    p.add_argument("--fit-rows", type=int, default=2000, help="rows (seeded sample) each PCA basis is fitted on")
    p.add_argument("--candidates", type=int, nargs="+", default=[10, 50, 100, 200, 500], help="key top-C to check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads for compression (0: torch's default)")
    a = p.parse_args(argv)
    if not (a.cache / "mem.npy").exists():
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        compress(a)
    info = json.loads((a.cache / "compress.json").read_text()) if (a.cache / "compress.json").exists() else {}
    mem = np.load(a.cache / "mem.npy").astype(np.float32)
    qmem = np.load(a.cache / "qmem.npy").astype(np.float32)
    src = np.array([json.loads(line)["source"] for line in (a.cache / "rows.jsonl").read_text().splitlines()])
    wiki = np.flatnonzero(src == "wiki")
    n = len(mem)
    print(f"{n} rows ({n - len(wiki)} scp, {len(wiki)} wiki), {len(qmem)} queries, memory {list(mem.shape[1:])}; "
          f"model {info.get('model', '?')}, compressed at {info.get('chunks_per_s', float('nan')):.2f} chunks/s "
          f"({a.cache})", flush=True)
    flat, qflat = unit(mem.reshape(n, -1)), unit(qmem.reshape(len(qmem), -1))
    truth = np.argsort(-(qflat @ flat.T), axis=1, kind="stable")[:, :10]  # exact top-10, flattened cosine

    rng = np.random.default_rng(a.seed)
    samples = {"all": rng.choice(n, min(a.fit_rows, n), replace=False),
               "wiki": rng.choice(wiki, min(a.fit_rows, len(wiki)), replace=False)}
    head = f"{'key':<14}{'fit rows':>9}" + "".join(f"{'C=' + str(c):>8}" for c in a.candidates)
    head += f"{'p99 C(all 10)':>15}"
    print(f"\nfraction of the exact top-10 within the key's top-C ({len(qflat)} queries, {n} rows)\n{head}")

    def row(name, fit, keys, qkeys):
        cov, p99 = coverage(keys, qkeys, truth, a.candidates)
        print(f"{name:<14}{fit:>9}" + "".join(f"{c:>8.3f}" for c in cov) + f"{p99:>15.0f}", flush=True)

    for k in a.random_dims:
        row(f"random {k}", "-", project_keys(mem, k, a.seed), project_keys(qmem, k, a.seed))
    # the memory tokens averaged: a d-wide key with no projection to choose (the "mean-pooled" candidate)
    row(f"mean-pool {mem.shape[-1]}", "-", unit(mem.mean(axis=1)), unit(qmem.mean(axis=1)))
    for fit, idx in samples.items():
        for k in a.pca_dims:
            t = time.perf_counter()
            basis = fit_key_basis(mem[idx], k, seed=a.seed)
            row(f"pca {k} {fit}", len(idx), project_keys(mem, k, basis=basis), project_keys(qmem, k, basis=basis))
            print(f"{'':23}fit {time.perf_counter() - t:.1f}s, keeps {basis.energy:.3f} of the sample's energy")

    print(f"\ndata (unit flattened memories, uncentred){'':6}{'rows':>8}{'queries':>9}")
    print(f"{'mean pairwise cosine':<47}{mean_pairwise_cos(flat):>8.3f}{mean_pairwise_cos(qflat):>9.3f}")
    er, eq = energy(flat), energy(qflat)
    for i, k in enumerate((1, 16, 64, 128, 256)):
        print(f"{'energy in the top ' + str(k) + ' components':<47}{er[i]:>8.3f}{eq[i]:>9.3f}")
    print(f"{'components for 90% of the energy':<47}{er[-1]:>8}{eq[-1]:>9}   (of {min(n, flat.shape[1])} / "
          f"{min(len(qflat), flat.shape[1])})")


if __name__ == "__main__":
    main()
