"""Storage per chunk for float32, float16, int8 and int4 memory, what each costs in retrieval and generation,
and the same figures extrapolated to a 7B compressor (d=4096, rate 16, 256-token chunks) and 10^9 chunks.

The 900 chunks of ``../shared/data/scp_sample.jsonl`` are compressed once (float32 reference) and
written once per storage dtype with the index job's row encoding (``ChunkStore.encode``, i.e.
``encode_batch``) into LanceDB, then compacted; bytes per chunk are measured on disk. Costs, per dtype,
against the float32 reference:

* retrieval: recall@10 of the exact search over the stored memory against the float32 top-10, top-1
  agreement, the largest score change, and Recall@5 of each question's own chunk;
* generation: the share of answers (greedy, from the question's own chunk's memory) identical to the
  answers from float32 memory, and cover-EM against the gold answers (meaningful with a trained model:
  ``--model DIR``; the default is an untrained tiny model, for which only the identical-answer rate and
  the retrieval figures say anything).

    python benchmarks/bench_storage.py                       # tiny untrained model, ~2 minutes on 2 cores
    python benchmarks/bench_storage.py --model runs/model    # a trained CLaRa model directory

Measured on the 2-core, 24 GiB CPU machine (2026-11-23), default untrained tiny model (memory
16 x 128 at rate 4, 256-d key), 900 chunks, 300 questions, 100 answered (16 new tokens):

    dtype    disk B/chunk  memory B  recall@10  top-1 =  max dscore  gold R@5  same answer  cover-EM
    float32          9680      8192      1.000    1.000    0.00e+00     0.130         1.00      0.00
    float16          5586      4096      1.000    1.000    1.98e-05     0.130         1.00      0.00
    int8             3602      2112      0.997    0.993    5.88e-04     0.130         0.96      0.00
    ratios to float32 (disk): float16 0.58, int8 0.37

    extrapolated: d=4096, rate 16, 256-token chunks -> memory 16 x 4096, 1024-d key, 10^9 chunks
    dtype    memory KiB   row KiB  TiB total  x float32
    float32       256.0     260.8      242.9       1.00
    float16       128.0     132.8      123.7       0.51
    int8           64.1      68.9       64.1       0.26

With the claims run's stage-3 SmolLM2 model (memory 16 x 576, rate 4), asking only about the 48 held-out chunks
(2026-12-03: ``--model ... --held-out 48``; results/bench_storage_smollm2_stage3_2026-12-03.txt):

    dtype    disk B/chunk  memory B  recall@10  top-1 =  max dscore  gold R@5  same answer  cover-EM     F1
    float32         41427     36864      1.000    1.000    0.00e+00     0.270         1.00      0.04  0.201
    float16         22994     18432      1.000    1.000    2.98e-08     0.270         1.00      0.04  0.201
    int8            13845      9280      0.997    1.000    6.65e-04     0.270         0.84      0.04  0.213
    int4             9206      4640      0.972    0.930    8.67e-03     0.273         0.83      0.04  0.202

int4 stores 0.252 of float16's memory bytes (1/4 + a float16 scale a token) and loses no measurable accuracy here
(gold Recall@5, cover-EM, F1), though 3% of the float32 top-10 changes; at int4 the 4 KiB float32 key is most of a
row. The answers from memory of this model are near closed-book, so they can hardly show a loss.

float16 costs nothing measurable (scores move by 2e-5, every top-10 and every greedy answer is the
same); int8 (per-token scale) moves scores by 6e-4, keeps 99.7% of the top-10 and changes 4% of the
greedy answers of an untrained generator (cover-EM needs a trained model: ``--model``). Besides memory
and key a row takes 465 B on disk here (LanceDB compresses the 585 B of text); the extrapolation adds
the text of a 256-token chunk (838 B at the measured 3.27 B/token) to memory and key.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scp_sample.jsonl"
BYTES = {"float32": 4, "float16": 2, "int8": 1, "int4": 0.5}
SCALE_BYTES = {"int8": 4, "int4": 2}  # per memory token


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SAMPLE, help="stage-1 JSONL (its docs[0] are the chunks)")
    p.add_argument("--model", type=Path, help="a CLaRa model directory (default: build an untrained tiny one)")
    p.add_argument("--questions", type=int, default=300, help="questions for the retrieval figures")
    p.add_argument("--qa", type=int, default=100, help="questions answered for the generation figures (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--held-out", type=int, default=0,
                   help="ask only about the N held-out chunks of benchmarks/memory_probe.py's split (48: the "
                        "chunks the shipped compressor never saw); default: any chunk")
    p.add_argument("--chunks", type=float, default=1e9, help="corpus size for the extrapolation")
    p.add_argument("--target-d", type=int, default=4096)
    p.add_argument("--target-rate", type=int, default=16)
    p.add_argument("--target-chunk-tokens", type=int, default=256)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    a = p.parse_args()

    import datetime as dt

    import torch

    from clara.config import ClaraConfig, LoraSettings
    from clara.data.records import read_records
    from clara.eval.metrics import cover_em, token_f1
    from clara.index.build import (
        ChunkingSettings,
        chunking_salt,
        default_key_dim,
        read_compressor_info,
        source_chunks,
        store_settings_for,
    )
    from clara.index.codec import flat_cosine
    from clara.index.store import ChunkStore
    from clara.model import ClaraModel
    from clara.tiny import TinyModelSpec, build_tiny_model

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        records = read_records(a.data, "scp")
        if a.model is None:
            texts = [ex.chunks[0] for ex in records] + [ex.question for ex in records] + [ex.answer for ex in records]
            base = build_tiny_model(work / "base", texts, TinyModelSpec(vocab_size=4096, num_kv_heads=4))
            config = ClaraConfig(base_model=str(base), compression_rate=4, doc_max_tokens=64, device="cpu",
                                 lora=LoraSettings(r=4, alpha=8, dropout=0.0))
            model_dir = ClaraModel.from_base(config).save_pretrained(work / "model")
        else:
            model_dir = a.model
        info = read_compressor_info(model_dir)
        model = ClaraModel.from_pretrained(model_dir, device="cpu")
        chunking = ChunkingSettings(chunk_tokens=info.doc_max_tokens, format="scp")
        chunks = list(source_chunks(a.data, None, chunking, chunking_salt(chunking, info.compressor_version)))
        ids = [c.chunk_id for c in chunks]
        index_of = {c.text: i for i, c in enumerate(chunks)}
        ref = model.compress([c.text for c in chunks]).float().numpy()  # (N, M, D) the float32 reference

        rng = np.random.default_rng(0)
        asked = records
        if a.held_out:
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from memory_probe import probe_split

            held = set(probe_split(records, a.held_out, 0, seed=0)[0])
            asked = [ex for ex in records if ex.chunks[0] in held]
        picked = [asked[i] for i in sorted(rng.choice(len(asked), min(a.questions, len(asked)), replace=False))]
        query = model.encode_query([ex.question for ex in picked]).float().numpy()
        gold = [index_of[ex.chunks[0]] for ex in picked]
        ref_scores = flat_cosine(query, ref)  # (Q, N)
        ref_top = np.argsort(-ref_scores, axis=1, kind="stable")[:, :10]
        qa = [asked[i] for i in sorted(rng.choice(len(asked), min(a.qa, len(asked)), replace=False))]
        qa_idx = [index_of[ex.chunks[0]] for ex in qa]

        def answers(memory: np.ndarray) -> list[str]:
            if not qa:
                return []
            mem = torch.from_numpy(memory[qa_idx]).unsqueeze(1)  # (B, 1, M, D)
            return model.generate([ex.question for ex in qa], mem, max_new_tokens=a.max_new_tokens)

        ref_answers = answers(ref)
        rows = {}
        metadata = [{"chunk_id": c.chunk_id, "doc_id": c.doc_id, "position": c.position, "text": c.text,
                     "content_hash": c.content_hash} for c in chunks]
        for dtype in ("float32", "float16", "int8", "int4"):
            settings = store_settings_for(info, dtype=dtype)
            store = ChunkStore.open(work / f"db-{dtype}", settings)
            for start in range(0, len(chunks), 256):  # the rows the index job writes (its encode_batch)
                store.upsert(store.encode(metadata[start:start + 256], ref[start:start + 256]))
            with warnings.catch_warnings():  # no other reader: dropping old versions is what is measured
                warnings.simplefilter("ignore")
                store.optimize(cleanup=True, older_than=dt.timedelta(0))
            disk = _dir_bytes(work / f"db-{dtype}")
            stored = store.get_memory(ids)
            res = store.exact_search(query, k=10)
            pos = {c: i for i, c in enumerate(ids)}
            top = np.array([[pos[c] for c in r.chunk_ids] for r in res])
            recall = np.mean([len(set(t) & set(r)) / 10 for t, r in zip(top, ref_top)])
            scores = flat_cosine(query, stored)
            gold_r5 = np.mean([g in t[:5] for g, t in zip(gold, top)])
            outs = answers(stored)
            scale_b = SCALE_BYTES.get(dtype, 0) * settings.n_mem
            rows[dtype] = dict(
                disk=disk / len(chunks), memory=int(settings.flat_dim * BYTES[dtype] + scale_b),
                key=4 * settings.key_dim,
                recall=recall, top1=float(np.mean(top[:, 0] == ref_top[:, 0])),
                dscore=float(np.abs(scores - ref_scores).max()), gold_r5=gold_r5,
                same=float(np.mean([x == y for x, y in zip(outs, ref_answers)])) if qa else float("nan"),
                cover=float(np.mean([cover_em(x, ex.answer) for x, ex in zip(outs, qa)])) if qa else float("nan"),
                f1=float(np.mean([token_f1(x, ex.answer) for x, ex in zip(outs, qa)])) if qa else float("nan"),
            )
        text_bytes = np.mean([len(c.text.encode()) for c in chunks])
        tokens = np.mean([len(model.tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in chunks])

        print(f"\n{len(chunks)} chunks, memory {info.n_mem} x {info.d} (rate {info.compression_rate}), "
              f"{store_settings_for(info).key_dim}-d key; {len(picked)} questions for retrieval, {len(qa)} answered")
        print(f"{'dtype':8}{'disk B/chunk':>13}{'memory B':>10}{'recall@10':>11}{'top-1 =':>9}{'max dscore':>12}"
              f"{'gold R@5':>10}{'same answer':>13}{'cover-EM':>10}{'F1':>7}")
        for dtype, r in rows.items():
            print(f"{dtype:8}{r['disk']:>13.0f}{r['memory']:>10}{r['recall']:>11.3f}{r['top1']:>9.3f}"
                  f"{r['dscore']:>12.2e}{r['gold_r5']:>10.3f}{r['same']:>13.2f}{r['cover']:>10.2f}{r['f1']:>7.3f}")
        f32 = rows["float32"]
        print("ratios to float32 (disk): " + ", ".join(f"{d} {r['disk'] / f32['disk']:.2f}" for d, r in rows.items()))

        # extrapolation: the same layout at the target model size
        n_mem = a.target_chunk_tokens // a.target_rate
        key_dim = default_key_dim(n_mem, a.target_d)
        # measured here, per chunk: everything but memory and key (text, ids, hash, timestamp, file overhead)
        rest = float(np.mean([r["disk"] - r["memory"] - r["key"] for r in rows.values()]))
        text_t = text_bytes / tokens * a.target_chunk_tokens
        other = max(rest - text_bytes, 0.0) + text_t  # the same, with the text of a target-size chunk
        print(f"\nmeasured per chunk besides memory and key: {rest:.0f} B ({text_bytes:.0f} B of text, "
              f"{text_bytes / tokens:.2f} B/token)")
        print(f"extrapolated: d={a.target_d}, rate {a.target_rate}, {a.target_chunk_tokens}-token chunks -> memory "
              f"{n_mem} x {a.target_d}, {key_dim}-d key, {other:.0f} B of text and ids per chunk; "
              f"{a.chunks:.0e} chunks")
        print(f"{'dtype':8}{'memory KiB':>11}{'row KiB':>10}{'TiB total':>11}{'x float32':>11}")
        total32 = None
        for dtype in rows:
            mem_b = n_mem * a.target_d * BYTES[dtype] + SCALE_BYTES.get(dtype, 0) * n_mem
            row_b = mem_b + 4 * key_dim + other
            total = row_b * a.chunks / 2**40
            total32 = total32 or total
            print(f"{dtype:8}{mem_b / 1024:>11.1f}{row_b / 1024:>10.1f}{total:>11.1f}{total / total32:>11.2f}")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
