"""Two-step search (ANN on the low-dimensional key, then exact CLaRa cosine on the candidates' memory)
against exact brute force, on synthetic rows in a real LanceDB table.

Rows are memories ``[n_mem, d]`` with the structure measured on real ones: a component shared by
every chunk (on the 900 sample chunks the mean memory is 0.84 of a memory's norm), a "meaning" part
that lies in a low-dimensional subspace (a random linear image of a ``--latent-dim`` Gaussian vector,
so similarities are graded, as between real chunks) and a chunk-specific noise part. A query is a
row's latent moved by ``--query-shift`` (a question about that chunk) with fresh noise; ground truth
is the exact top-10 by the CLaRa score over all rows. Both searches go through
``clara.index.store.ChunkStore`` (``exact_search``: batched brute-force scan of every memory; ``search``:
ANN on ``key`` for ``candidates`` rows, then exact re-scoring). Latency is per single query, as a retriever serves them.

    python benchmarks/bench_search.py --ram-gib 9         # 1,000,000 rows: ~30 minutes on 2 cores, 8 GiB on disk
    python benchmarks/bench_search.py --rows 100000       # ~2 minutes on 2 cores

Target: recall@10 >= 0.98 at >= 10x lower latency than brute force.

Measured on the 2-core, 24 GiB CPU machine (2026-12-01, otherwise idle), ``--rows 100000`` (16 x 128
memory in float16, 1024-d key, 0.77 GiB on disk, written in 24 s):

    python benchmarks/bench_search.py --rows 100000 --kind IVF_HNSW_SQ --ef 600 --candidates 100 200 500

    search                                   recall@10    p50 ms    p95 ms  speed-up
    exact brute force, LanceDB scan              1.000    1360.5    1540.0       1.0
    exact brute force, float32 in RAM            1.000      29.6      35.6      46.0
    IVF_HNSW_SQ (built in 76 s) + re-score 100   0.910      12.4      19.5     109.8   2.4x vs in-RAM
    IVF_HNSW_SQ + re-score 200 candidates        0.952      15.5      23.4      88.0   1.9x vs in-RAM
    IVF_HNSW_SQ + re-score 500 candidates        0.961      25.2      35.7      54.0   1.2x vs in-RAM

An earlier run on a loaded machine (2026-11-23, LanceDB's default ef) read 0.982 at 500 candidates.
Recall is a matter of search effort: ``--ef 2000 --refine-factor 2`` (re-rank on the float keys) on
the same rows reads 0.936 / 0.983 / 0.998 at 25 / 30 / 46 ms (100 / 200 / 500 candidates).
IVF_FLAT does worse on these rows: 0.57 (316 partitions, 30 probed) and 0.72 (64 partitions, 16
probed) whatever the candidates, in 18-30 ms: the memories' meaning lies in a 64-d Gaussian
subspace, too high an intrinsic dimension for k-means cells to hold a query's neighbours, while
the graph index follows them. The key itself is not the limit: ranking all rows by key (no ANN),
the exact top-10 is within the key's top 200 for 0.998 of queries at 30k rows (1024-d).

And at 10^6 rows (same machine and day; 7.65 GiB on disk, written in 223 s):

    python benchmarks/bench_search.py --rows 1000000 --kind IVF_HNSW_SQ --ef 600 --ram-gib 9

    search                                   recall@10    p50 ms    p95 ms  speed-up
    exact brute force, LanceDB scan              1.000   13033.5   15379.2       1.0
    exact brute force, float32 in RAM            1.000     298.4     408.6      43.7
    IVF_HNSW_SQ (built in 1262 s) + re-score 100 0.757      27.5      43.1     473.5  10.8x vs in-RAM
    IVF_HNSW_SQ + re-score 200 candidates        0.782      29.7      41.3     438.1  10.0x vs in-RAM
    IVF_HNSW_SQ + re-score 500 candidates        0.793      57.0      71.7     228.7   5.2x vs in-RAM

So the latency half of the target holds at 10^6 rows (10x below the in-RAM brute force, 440x below
the LanceDB scan at 200 candidates) and the recall half does not: 0.78, against 0.95 at 10^5. Recall
flattens as candidates grow, so what misses is the graph search (one 10^6-node HNSW graph over 8-bit
scalar-quantised keys, ef 600), not the re-scoring; the knobs left are a larger ``ef``, more
partitions (``--num-partitions``, several smaller graphs), ``m`` / ``ef_construction`` at build time
and ``--refine-factor`` (re-rank on the float keys), which at 10^5 rows lift recall to 0.98-1.0 for
~30-46 ms (above); a 21-minute build per run on 2 cores kept them untried at 10^6 rows.

Tried at 10^6 rows on 2026-12-03 (``--ef 2000 --refine-factor 2 --candidates 200 500``; the build ran
beside other jobs, 2209 s; the queries on an idle machine; results/bench_search_1e6_ef2000_refine2_*.txt):

    exact brute force, float32 in RAM            1.000     232.8     256.9
    IVF_HNSW_SQ + re-score 200 candidates        0.921      81.6     118.8   2.9x faster than in RAM
    IVF_HNSW_SQ + re-score 500 candidates        0.945     102.1     123.1   2.3x faster than in RAM

so the larger beam and the float-key refine lift recall from 0.78 to 0.92-0.95 but cost the latency half
(3x instead of 10x): on one 10^6-node graph neither setting meets both. These
synthetic rows are a hard case for any ANN index (their meaning is a 64-d Gaussian: no cluster
structure); how much of the gap real memories leave is to be measured on a real corpus.

A fitted key (2026-12-04, ``--key-basis pca``: the top right singular vectors of 4,096 memories drawn like
the rows, ``clara.index.codec.fit_key_basis``, as the index job's ``--key-basis pca``; the machine shared
with other jobs, so latencies are high; results/bench_search_*pca*_2026-12-04.txt):

    python benchmarks/bench_search.py --rows 100000 --key-basis pca --key-dim 128 --kind IVF_HNSW_FLAT IVF_HNSW_SQ \
        --ef 1000 --candidates 50 100 200
    exact brute force, float32 in RAM            1.000      56.0      63.8
    IVF_HNSW_SQ ef 1000 + re-score 50            0.999      15.2      24.5      (ef 300: 0.973; 64-d key: 0.970)
    IVF_HNSW_FLAT ef 1000 + re-score 50          0.999      17.2      24.8

    python benchmarks/bench_search.py --rows 1000000 --key-basis pca --key-dim 128 --ef 300 1000 \
        --candidates 50 100 200 --ram-gib 9 --exact-queries 3     # index built in 1,137 s
    exact brute force, float32 in RAM            1.000     545.9     643.9      (233-298 ms on an idle machine)
    IVF_HNSW_SQ ef 300 + re-score 100            0.801      49.4     400.9
    IVF_HNSW_SQ ef 1000 + re-score 50            0.955      34.5     230.2
    IVF_HNSW_SQ ef 1000 + re-score 200           0.955      44.6     113.0

A 128-d fitted key spans the rows' meaning (92% of their energy), so at 10^5 rows the exact top-10 is among
50 candidates for 0.999 of it, against 0.95 at 200 for the 1024-d random key; at 10^6 rows recall rises from
0.78 (random, ef 600) and 0.92-0.95 (random, ef 2000, 82-102 ms) to 0.955 at 34.5 ms (ef 1000), about 7x
below the idle in-RAM brute force. Recall is again flat in the candidates, so what still misses at 10^6 is
the one HNSW graph, not the key: ranked exactly (a numpy scan of the same 10^6 keys held in RAM, outside the
store, idle machine), the key's top 50 holds the whole exact top-10 for every query, and scanning it then
re-scoring 50-200 candidates reads recall@10 1.000 at 51-55 ms p50, 4.5x below the in-RAM brute force:
exact but linear in the rows. On real memories (benchmarks/bench_keys.py) a fitted key needs 128-256
dimensions where these rows need 64.

**The design that meets the target at 10^6 rows (2026-12-04, afternoon, idle machine): a quantised scan of the fitted
key.** LanceDB's ``IVF_SQ`` index in few partitions, all probed (``clara.index.store.default_partitions``:
one per 250,000 rows, at most 20, LanceDB's default probes), scans every row's int8 key (128 B a row at
128-d): exact on the key up to the 8-bit rounding, then 20-50 candidates are re-scored on the memory.
``--kind none`` measures the float keys scanned without an index, ``--reuse`` keeps a table written by an
earlier run of the same arguments (results/bench_search_*pca128_{sq,ivf64}*):

    python benchmarks/bench_search.py --rows 1000000 --key-basis pca --key-dim 128 --kind IVF_SQ IVF_RQ \
        --num-partitions 1 --nprobes 1 --refine-factor 1 5 --candidates 50 100 200 --ram-gib 9 --workdir W
    exact brute force, float32 in RAM            1.000     290.9     336.0
    IVF_SQ (1 partition, built in 11 s) + 50     1.000      27.8      38.1   10.5x faster than in RAM
    IVF_SQ + re-score 200                        1.000      41.2      91.7    7.1x
    IVF_RQ (1-bit RaBitQ codes, built in 2 s)    0.517 / 0.820 / 0.963 at 50 (rf 1) / 50 (rf 5) / 200 (rf 5):
                                                 24-49 ms; the 1-bit codes lose the ranking the scan needs
    ... --kind IVF_SQ --num-partitions 1 --candidates 10 20 30 50 --reuse    (a second run, same table)
    exact brute force, float32 in RAM            1.000     268.4     364.6
    IVF_SQ + re-score 10 / 20 / 30 / 50          0.807 / 0.982 / 0.997 / 1.000 at 22.6 / 25.5 / 27.2 / 31.0 ms
                                                 (11.9x / 10.5x / 9.9x / 8.7x faster than in RAM)
    ... --kind IVF_SQ --num-partitions 64 --nprobes 4 8 16 32 --candidates 50 --reuse   (probing a fraction)
    IVF_SQ 64 partitions, 4 / 8 / 16 / 32 probed 0.438 / 0.588 / 0.784 / 0.947 at 20.4 / 18.2 / 19.1 / 25.2 ms

and with what the index job ships (its default 256-d fitted key, ``create_ann_index("IVF_SQ")``'s default 4
partitions, a search's default probes; a new table, results/bench_search_1e6_pca256_sq_default_*):

    python benchmarks/bench_search.py --rows 1000000 --key-basis pca --key-dim 256 --kind IVF_SQ \
        --candidates 20 30 50 --ram-gib 9 --exact-queries 3
    exact brute force, float32 in RAM            1.000     240.4     303.1
    IVF_SQ (4 partitions, built in 6 s) + 20     0.984      20.1      29.9   12.0x faster than in RAM
    IVF_SQ + re-score 30                         0.999      20.6      29.8   11.6x
    IVF_SQ + re-score 50 (the Retriever's default) 1.000    22.2      27.9   10.8x

and at 10^5 rows: IVF_SQ (1 partition) 1.000 at 11.1 ms (50 candidates) vs 29.8 ms in RAM; IVF_RQ 0.889 /
0.989 at 11.7 / 23.4 ms (rf 5; 50 / 200 candidates). So at 10^6 rows recall@10 is 0.98-1.00 at 8.7-10.5x
below the in-RAM brute force with one partition and a 128-d key (the two runs straddle 10x at 30-50 candidates;
20 candidates: 0.982 at 10.5x), and 0.999-1.000 at 10.8-11.6x with the shipped defaults (the partitions are
scanned in parallel, which more than pays for the 256 B keys)
and ~500x below the LanceDB scan, with an index built in ~10 s instead of the HNSW graph's 1,137 s. Where the
time goes (queries timed on the same table, results/bench_search_1e6_pca128_profile_*): ~6-8 ms fixed (the
query, LanceDB's planning), ~2 ms a 10^5 keys scanned, ~0.15 ms a candidate's memory read and re-scored; the
same query with no index on the key (LanceDB scanning the float keys) takes 242 ms; the default 4 partitions
(``default_partitions``), all probed, 23-25 ms. Probing a fraction of IVF partitions
loses recall on these rows (0.95 with half probed): their meaning is a 64-d Gaussian, the worst case for
k-means cells. The scan is linear in the rows: ~20 ms of one core a 10^6 rows, which sets the rows a
searcher's shard should hold (cluster/SCALE.md); beyond that, partitions probed in part or graphs, whose
recall must be measured on real memories (they cluster; these rows do not). PQ codes (``IVF_PQ``, 16-32
sub-vectors, refine 10; latency only, recall not measured) were no faster than the int8 scan (20-33 ms).

A denser graph does reach the target, at ~180x the build (results/bench_search_1e{5,6}_pca128_hnsw_m40_*):

    python benchmarks/bench_search.py --rows 1000000 --key-basis pca --key-dim 128 --kind IVF_HNSW_SQ \
        --m 40 --ef-construction 600 --ef 300 1000 --candidates 50 --ram-gib 9 --exact-queries 3 --reuse
    exact brute force, float32 in RAM            1.000     226.3     265.8
    IVF_HNSW_SQ m 40 (built in 1,956 s) ef 300   0.959      18.5      27.0   12.2x faster than in RAM
    IVF_HNSW_SQ m 40 ef 1000 + re-score 50       0.998      21.5      24.7   10.5x
    (10^5 rows: built in 102 s; ef 300 0.999 at 8.5 ms, ef 1000 1.000 at 10.9 ms vs 27.9 ms in RAM)

Both meet it at 10^6 rows; the scan builds in seconds (the graph in ~33 minutes on 2 cores, 1,956 us a row
against 1,016 at 10^5: the build grows faster than the rows) and needs no tuning, so it is what the index
job builds; the graph is the choice once a shard is too large to scan.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


class Synthetic:
    """Memories ``w_common * c + w_meaning * unit(W z) + w_noise * unit(e)``, flattened to ``[n_mem, d]``."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], latent_dim: int,
                 weights: tuple[float, float, float], like: Synthetic | None = None) -> None:
        flat = shape[0] * shape[1]
        self.rng, self.shape, self.weights = rng, shape, weights
        if like is not None:  # the same corpus (shared part and meaning map), drawn from another stream
            self.common, self.W = like.common, like.W
        else:
            self.common = _unit(rng.standard_normal(flat)).astype(np.float32)
            self.W = rng.standard_normal((latent_dim, flat)).astype(np.float32)

    def latents(self, n: int) -> np.ndarray:
        return self.rng.standard_normal((n, self.W.shape[0])).astype(np.float32)

    def memory(self, z: np.ndarray) -> np.ndarray:
        w_common, w_meaning, w_noise = self.weights
        noise = _unit(self.rng.standard_normal((len(z), self.W.shape[1])).astype(np.float32))
        x = w_common * self.common + w_meaning * _unit(z @ self.W) + w_noise * noise
        return x.reshape(len(z), *self.shape).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--n-mem", type=int, default=16)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--key-dim", type=int, default=1024)
    p.add_argument("--key-basis", choices=("random", "pca"), default="random",
                   help="the key: a seeded random projection, or a basis fitted on --key-fit-rows memories "
                        "(clara.index.codec.fit_key_basis, as the index job's --key-basis pca)")
    p.add_argument("--key-fit-rows", type=int, default=4096, help="memories (the first rows) to fit the pca key on")
    p.add_argument("--dtype", default="float16", choices=("float32", "float16", "int8"))
    p.add_argument("--kind", nargs="+", default=["IVF_HNSW_SQ"],
                   help="ANN index kind(s) on the key (clara.index.store.ANN_KINDS, or none: a flat scan of the "
                        "float keys); each is built and timed in turn")
    p.add_argument("--num-partitions", type=int, help="IVF partitions (default: clara.index.store's choice)")
    p.add_argument("--nprobes", type=int, nargs="+", default=[None],
                   help="IVF partitions searched per query (default: LanceDB's); each is measured on the same index")
    p.add_argument("--ef", type=int, nargs="+", default=[None],
                   help="HNSW search beam(s) (default: LanceDB's); each is measured on the same index")
    p.add_argument("--refine-factor", type=int, nargs="+", default=[None],
                   help="re-rank refine_factor x candidates on the raw key (each measured on the same index)")
    p.add_argument("--num-bits", type=int, help="IVF_RQ build: bits a key dimension (LanceDB's default: 1)")
    p.add_argument("--m", type=int, help="HNSW kinds' build: neighbours a node (LanceDB's default: 20)")
    p.add_argument("--ef-construction", type=int,
                   help="HNSW kinds' build: beam while inserting (LanceDB's default: 300)")
    p.add_argument("--candidates", type=int, nargs="+", default=[100, 200, 500], help="ANN candidates to re-score")
    p.add_argument("--ram-gib", type=float, default=4.0,
                   help="also time a brute force over all memories held in RAM (float32) if they fit in this")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--exact-queries", type=int, default=10, help="single queries timed for brute force")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--weights", type=float, nargs=3, default=[0.84, 0.45, 0.30],
                   help="norms of the shared, meaning and chunk-specific noise parts of a memory")
    p.add_argument("--latent-dim", type=int, default=64, help="dimension of the meaning subspace")
    p.add_argument("--query-shift", type=float, default=0.5, help="latent shift of a query from its chunk")
    p.add_argument("--write-batch", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    p.add_argument("--reuse", action="store_true",
                   help="with --workdir: the table written there by an earlier run of the same arguments is kept "
                        "(rows are regenerated, for the queries and the in-RAM copy, but not written again)")
    a = p.parse_args()

    from clara.index.codec import dequantize_int8, encode_batch, fit_key_basis, quantize_int8
    from clara.index.schema import StoreSettings
    from clara.index.store import ChunkStore

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        rng = np.random.default_rng(a.seed)
        shape = (a.n_mem, a.d)
        gen = Synthetic(rng, shape, a.latent_dim, tuple(a.weights))
        settings = StoreSettings(n_mem=a.n_mem, d=a.d, compressor_version="synthetic", dtype=a.dtype,
                                 key_dim=a.key_dim)
        basis, fit_s = None, 0.0
        if a.key_basis == "pca":  # fitted on rows drawn as the first ones are (a sample of the corpus)
            t = time.perf_counter()
            sampler = Synthetic(np.random.default_rng(a.seed + 1), shape, a.latent_dim, tuple(a.weights), like=gen)
            basis = fit_key_basis(sampler.memory(sampler.latents(a.key_fit_rows)), a.key_dim)
            fit_s = time.perf_counter() - t
            settings = StoreSettings(**{**settings.to_dict(), "key_basis": basis.digest})
            print(f"  fitted {basis} in {fit_s:.1f}s ({100 * basis.energy:.1f}% of the energy)", flush=True)
        store = ChunkStore.open(work / "db", settings, key_basis=basis)
        # what the rows (and the queries' probes) are drawn from: a reused table must come from the same
        made_by = {name: getattr(a, name) for name in ("rows", "n_mem", "d", "key_dim", "key_basis", "key_fit_rows",
                                                       "dtype", "queries", "weights", "latent_dim", "write_batch",
                                                       "seed")}
        reuse = a.reuse and store.count() == a.rows
        if a.reuse and not reuse:
            if store.count():
                raise SystemExit(f"--reuse: {work / 'db'} holds {store.count()} rows, not --rows {a.rows}")
            print("  --reuse: no table yet, writing it", flush=True)
        if reuse:
            written = json.loads((work / "rows.json").read_text()) if (work / "rows.json").exists() else None
            if written != made_by:
                raise SystemExit(f"--reuse: the table in {work} was written with {written}, not {made_by}")
        t = time.perf_counter()
        probe_ids = np.sort(rng.choice(a.rows, a.queries, replace=False))
        probes = np.zeros((a.queries, a.latent_dim), np.float32)
        flat = a.n_mem * a.d
        in_ram = a.rows * flat * 4 <= a.ram_gib * 2**30
        ram = np.empty((a.rows, flat), np.float32) if in_ram else None  # unit rows, as stored
        for lo in range(0, a.rows, a.write_batch):
            hi = min(a.rows, lo + a.write_batch)
            z = gen.latents(hi - lo)
            mem = gen.memory(z)
            sel = (probe_ids >= lo) & (probe_ids < hi)
            probes[sel] = z[probe_ids[sel] - lo]
            ids = [f"s{i}::0" for i in range(lo, hi)]
            meta = {"chunk_id": ids, "doc_id": [i[:-3] for i in ids], "position": [0] * (hi - lo),
                    "text": [""] * (hi - lo), "content_hash": ids}
            if not reuse:  # bulk load: a fresh table, no upsert needed
                store.table.add(encode_batch(meta, mem, settings, key_basis=basis))
            if ram is not None:
                stored = {"float32": mem, "float16": mem.astype(np.float16).astype(np.float32)}.get(a.dtype)
                if stored is None:
                    stored = dequantize_int8(*quantize_int8(mem))
                stored = stored.reshape(hi - lo, flat)
                ram[lo:hi] = stored / np.linalg.norm(stored, axis=1, keepdims=True)
            done = "generated" if reuse else "wrote"
            print(f"  {done} {hi}/{a.rows} rows ({time.perf_counter() - t:.0f}s)", flush=True)
        write_s = time.perf_counter() - t
        if not reuse:
            (work / "rows.json").write_text(json.dumps(made_by))
        disk = sum(f.stat().st_size for f in (work / "db").rglob("*") if f.is_file())

        # queries: a row's latent, shifted, with fresh noise (a question about that chunk)
        queries = gen.memory(probes + a.query_shift * gen.latents(a.queries))

        t = time.perf_counter()
        truth = store.exact_search(queries, k=a.k)  # one batched scan for every query: the ground truth
        truth_s = time.perf_counter() - t
        exact_lat = []
        for q in queries[: a.exact_queries]:
            t = time.perf_counter()
            store.exact_search(q, k=a.k)
            exact_lat.append(time.perf_counter() - t)
        exact_ms = 1000 * float(np.median(exact_lat))

        key = f"{a.key_dim}-d {'pca key (fitted on ' + str(a.key_fit_rows) + ' rows)' if basis else 'random key'}"
        print(f"\n{a.rows} rows of memory {a.n_mem}x{a.d} ({a.dtype}), {key}, {disk / 2**30:.2f} GiB on "
              f"disk; {'reused, generated' if reuse else 'written'} in {write_s:.0f}s; {a.queries} queries, k={a.k}")
        print(f"{'search':40}{'recall@' + str(a.k):>10}{'p50 ms':>10}{'p95 ms':>10}{'speed-up':>10}")
        p95 = 1000 * np.percentile(exact_lat, 95)
        print(f"{'exact brute force, LanceDB scan':40}{1.0:>10.3f}{exact_ms:>10.1f}{p95:>10.1f}{1.0:>10.1f}"
              f"   (batched over all {a.queries}: {truth_s:.1f}s)")
        if ram is not None:
            lat, hits = [], []
            for q, gt in zip(queries, truth):
                t = time.perf_counter()
                qf = q.reshape(-1) / np.linalg.norm(q)
                top = np.argpartition(-(ram @ qf), a.k)[: a.k]
                lat.append(time.perf_counter() - t)
                hits.append(len({f"s{i}::0" for i in top} & set(gt.chunk_ids)) / a.k)
            ram_ms = 1000 * float(np.median(lat))
            print(f"{'exact brute force, float32 in RAM':40}{np.mean(hits):>10.3f}{ram_ms:>10.1f}"
                  f"{1000 * np.percentile(lat, 95):>10.1f}{exact_ms / ram_ms:>10.1f}")
        for kind in a.kind:
            if kind.lower() == "none":  # no ANN index: LanceDB scans the float keys (exact on the key)
                for index in store.list_indices():
                    if list(index.columns) == ["key"]:
                        store.table.drop_index(index.name)
                print("  no index on the key: a flat scan of the float keys", flush=True)
            else:
                t = time.perf_counter()
                build = {"m": a.m, "ef_construction": a.ef_construction} if "HNSW" in kind.upper() else {}
                if kind.upper() == "IVF_RQ":
                    build["num_bits"] = a.num_bits
                build = {name: v for name, v in build.items() if v is not None}
                report = store.create_ann_index(kind, num_partitions=a.num_partitions, scalar=False, **build)
                index_s = time.perf_counter() - t
                print(f"  {report.message} in {index_s:.0f}s ({1e6 * index_s / a.rows:.0f} us a row)", flush=True)
            for ef, refine, nprobes in ((e, r, n) for e in a.ef for r in a.refine_factor for n in a.nprobes):
                knobs = {"nprobes": nprobes, "ef": ef, "refine_factor": refine}
                for c in a.candidates:
                    if ef is not None and ef < c:
                        continue  # LanceDB: the beam must hold the candidates
                    lat, hits = [], []
                    store.search(queries[0], k=a.k, candidates=c, **knobs)  # warm the index cache
                    for q, gt in zip(queries, truth):
                        t = time.perf_counter()
                        res = store.search(q, k=a.k, candidates=c, **knobs)[0]
                        lat.append(time.perf_counter() - t)
                        hits.append(len(set(res.chunk_ids) & set(gt.chunk_ids)) / a.k)
                    p50 = 1000 * float(np.median(lat))
                    vs_ram = f"   {ram_ms / p50:.1f}x faster than the in-RAM brute force" if ram is not None else ""
                    label = (f"{kind}{f' ef {ef}' if ef else ''}{f' rf {refine}' if refine else ''}"
                             f"{f' np {nprobes}' if nprobes else ''} + re-score {c}")
                    print(f"{label:40}{np.mean(hits):>10.3f}{p50:>10.1f}"
                          f"{1000 * np.percentile(lat, 95):>10.1f}{exact_ms / p50:>10.1f}{vs_ram}", flush=True)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
