"""Training job: the three CLaRa stages on Ray Train with DeepSpeed.

    python -m pipelines.train --config pipelines/recipes/stage1_scp.yaml
    python -m pipelines.train --config pipelines/recipes/stage1_scp.yaml --override steps=200 num_workers=2
    ray job submit --working-dir . -- python -m pipelines.train --config pipelines/recipes/stage3_e2e.yaml

(``clara train ...`` is the same command.) Stages: ``scp`` (stage 1, salient compressor
pretraining: compressor + generator, CE + 0.1 x MSE), ``instruct`` (stage 2: question + top-5
chunks -> answer, the stage-1 compressor kept, a fresh generator adapter), ``e2e`` (stage 3: the
compressor frozen, the query reasoner initialised from it, query reasoner + generator trained
through the differentiable top-k). Each stage starts from the previous stage's exported model.

One run:

1. driver: the recipe fills a :class:`TrainJobConfig` (unknown keys and bad values are errors);
   Ray Data reads the JSONL / Parquet records (local paths or object-store URIs) and validates
   every one before anything trains: a bad record fails the job naming file and line.
2. workers (``TorchTrainer``): each builds the model, applies the stage's adapter set-up
   (:mod:`clara.training.stages`), wraps the trainable parameters in DeepSpeed (ZeRO 0-3, bf16 on GPU,
   fp32 on CPU, gradient accumulation up to the global batch, AdamW, warm-up + cosine-to-minimum)
   and trains on its shard of the data. Every ``report_every`` steps it reports loss, CE, MSE,
   tokens/s, lr (and Recall@k in stage 3); every ``checkpoint_every`` steps and at the end every
   rank saves its share of the training state and Ray merges them into one checkpoint
   (safetensors and JSON, never pickle: see :mod:`pipelines.train_checkpoint`).
3. A run started again under the same ``name`` and ``storage_path`` continues from its latest
   checkpoint (step, optimizer, schedule, random state, data position), and ``max_failures`` lets
   Ray restart a failed worker group from it.
4. rank 0 exports a model directory (consolidated weights; ZeRO-3 shards are gathered) that
   ``ClaraModel.from_pretrained`` loads; the driver prints a summary.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clara import settings
from clara.config import BEHAVIOUR_FIELDS, ClaraConfig, ConfigError
from clara.data.records import Example, RecordError, parse_record
from clara.training.stages import CLARA_STAGES, get_stage

#: Fields of a saved model that a job may change when it starts from ``init`` (they do not touch weights).
INIT_OVERRIDES: tuple[str, ...] = BEHAVIOUR_FIELDS
DATA_SUFFIXES: tuple[str, ...] = ("jsonl", "json", "parquet")
_JOB_FILE = "clara_job.json"


def _is_uri(path: str) -> bool:
    return "://" in path


@dataclass
class TrainJobConfig:
    """One training job. A recipe (YAML) fills these fields; every one is checked here."""

    #: ``scp`` (stage 1), ``instruct`` (stage 2) or ``e2e`` (stage 3).
    stage: str
    #: Record files of the stage's format: JSONL or Parquet files, directories or globs, local or
    #: object-store URIs (``s3://...``, ``gs://...``).
    data: list[str]
    #: The previous stage's exported model directory (required for ``instruct`` and ``e2e``).
    init: str | None = None
    #: Without ``init``: :class:`~clara.config.ClaraConfig` fields of a fresh model (``base_model``,
    #: ``compression_rate``, ``lora``, ...). With ``init``: only the fields in ``INIT_OVERRIDES``, and in
    #: stage 1 a higher ``compression_rate`` than init's (fewer memory slots: training starts from init's first
    #: slots, :meth:`~clara.model.ClaraModel.keep_memory_slots`; e.g. a rate-16 compressor from a rate-4 one).
    model: dict[str, Any] = field(default_factory=dict)
    #: Run name; a run started again with the same name and storage_path resumes. Default ``clara-<stage>``.
    name: str | None = None
    #: Where checkpoints go (shared storage on a multi-node cluster: NFS or an object-store URI).
    storage_path: str = "runs"
    #: Where the trained model directory goes. Default ``<storage_path>/<name>/model``.
    export_dir: str | None = None
    #: Ray Train workers (data-parallel ranks).
    num_workers: int = 1
    #: Give each worker a GPU.
    use_gpu: bool = False
    #: Ray resources of one worker, e.g. ``{"CPU": 8, "GPU": 1}``. Default ``{"CPU": 1}``.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    #: DeepSpeed ZeRO stage 0-3.
    zero_stage: int = 2
    #: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
    precision: str = "auto"
    #: Examples per optimizer step over all workers. Default: the paper's (128; 32 for e2e).
    global_batch_size: int | None = None
    #: Examples per forward pass on one worker; the rest of the global batch is gradient accumulation.
    micro_batch_size: int = 4
    #: Peak learning rate. Default: the paper's (1e-4; 5e-6 for e2e).
    lr: float | None = None
    #: Fraction of the steps with a linear learning-rate warm-up.
    warmup_ratio: float = 0.03
    #: The cosine schedule decays to ``lr * min_lr_ratio``.
    min_lr_ratio: float = 0.1
    #: AdamW weight decay.
    weight_decay: float = 0.0
    #: Gradient-norm clipping (0: none).
    grad_clip: float = 1.0
    #: Optimizer steps; or ``epochs`` (passes over the data). Neither: one epoch.
    steps: int | None = None
    #: Passes over the data (instead of ``steps``).
    epochs: float | None = None
    #: Stage 1 only: fraction of the first steps in which every example is replaced by the
    #: reconstruction of its chunk (teaches a small model to read memory before it memorises answers).
    reconstruction_warmup: float = 0.0
    #: Stages 1-2: fraction of QA / instruction examples that each micro-batch pairs with another
    #: example's chunks and the target "The background does not say." (in-batch wrong-memory
    #: negatives, :func:`clara.data.records.with_wrong_memory_negatives`), so answers must come from memory.
    wrong_memory_negatives: float = 0.0
    #: Apply the stage's adapter set-up on a fresh start: stage 2 re-initialises the generator
    #: adapter, stage 3 copies the compressor into the query reasoner.
    reinit_adapters: bool = True
    #: Steps between metric reports (loss, learning rate, throughput).
    report_every: int = 10
    #: Steps between checkpoints.
    checkpoint_every: int = 100
    #: Checkpoints kept in storage (the oldest are deleted).
    keep_checkpoints: int = 2
    #: Times Ray restarts the workers from the latest checkpoint after a failure (-1: always).
    max_failures: int = 0
    #: Seed of the model's new weights, the data order and the negatives.
    seed: int = 0
    #: Examples in each worker's shuffle buffer (0: no shuffling).
    shuffle_buffer_size: int = 1024
    #: torch threads per worker. Default: the worker's CPU count.
    torch_threads: int | None = None
    #: Ray address (default: the running Ray, $RAY_ADDRESS, or a new local one).
    ray_address: str | None = None

    def __post_init__(self) -> None:
        import os

        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        self.data = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in self.data]
        for name in ("init", "storage_path", "export_dir"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if self.stage not in CLARA_STAGES:
            raise ConfigError(f"stage: must be one of {', '.join(CLARA_STAGES)}, got {self.stage!r}")
        if not self.data or not all(self.data):
            raise ConfigError("data: give at least one record file, directory, glob or URI")
        if self.stage != "scp" and not self.init:
            raise ConfigError(f"init: stage {self.stage!r} starts from the previous stage's exported model")
        if self.init:
            allowed = set(INIT_OVERRIDES) | ({"compression_rate"} if self.stage == "scp" else set())
            bad = sorted(set(self.model) - allowed)
            if bad:
                raise ConfigError(f"model: with init, only {', '.join(sorted(allowed))} may be set"
                                  f"{' (in stage scp)' if self.stage == 'scp' else ''}; got {', '.join(bad)}")
            ClaraConfig(base_model="x", **self.model)  # validates the values
        else:
            if "base_model" not in self.model:
                raise ConfigError("model.base_model: needed to start stage 1 without init (or give init)")
            ClaraConfig.from_dict(self.model)
        for name in ("num_workers", "micro_batch_size", "report_every", "checkpoint_every", "keep_checkpoints"):
            _positive(name, getattr(self, name))
        for name in ("global_batch_size", "steps", "torch_threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs: must be > 0, got {self.epochs}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("steps, epochs: give one or the other")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision: must be auto, fp32 or bf16 (fp16 is not supported), got {self.precision!r}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        for name in ("warmup_ratio", "min_lr_ratio", "reconstruction_warmup", "wrong_memory_negatives"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        stage = get_stage(self.stage)
        if self.wrong_memory_negatives and not stage.wrong_memory_negatives:
            raise ConfigError(f"wrong_memory_negatives: stage {self.stage} picks its own chunks; "
                              "only scp and instruct use it")
        if self.reconstruction_warmup and not stage.reconstruction_warmup:
            raise ConfigError("reconstruction_warmup: only stage scp reads reconstruction examples")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.shuffle_buffer_size < 0:
            raise ConfigError("weight_decay, grad_clip, shuffle_buffer_size: must be >= 0")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures: must be >= -1, got {self.max_failures}")
        if any(v < 0 for v in self.resources_per_worker.values()):
            raise ConfigError(f"resources_per_worker: amounts must be >= 0, got {self.resources_per_worker}")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError(f"name: must be a non-empty name without '/', got {self.name!r}")
        if self.global_batch_size is not None and self.global_batch_size % (self.micro_batch_size * self.num_workers):
            raise ConfigError(f"global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size x "
                              f"num_workers = {self.micro_batch_size * self.num_workers}")

    # -- derived values --------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        return self.name or f"clara-{self.stage}"

    @property
    def batch_size(self) -> int:
        gbs = self.global_batch_size or get_stage(self.stage).global_batch_size
        return max(gbs, self.micro_batch_size * self.num_workers)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else get_stage(self.stage).lr

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    @property
    def model_dir(self) -> str:
        return self.export_dir or f"{self.run_dir}/model"

    def resolved(self) -> TrainJobConfig:
        """A copy with local paths made absolute (workers may run elsewhere) and defaults filled in."""
        def absolute(p: str | None) -> str | None:
            return p if p is None or _is_uri(p) else str(Path(p).expanduser().resolve())

        out = TrainJobConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.data = [absolute(p) for p in self.data]
        from clara.bases import pretrained_names

        keep_name = self.init in pretrained_names() and not Path(self.init).exists()  # a packaged model
        out.init = self.init if keep_name else absolute(self.init)
        out.storage_path = absolute(self.storage_path)
        out.export_dir = absolute(self.model_dir)
        out.name = self.run_name
        out.resources_per_worker = dict(self.resources_per_worker) or {"CPU": 1.0}
        if self.init is None and "base_model" in self.model and Path(self.model["base_model"]).exists():
            out.model = {**self.model, "base_model": absolute(self.model["base_model"])}
        return out

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Any, source: str | None = None) -> TrainJobConfig:
        """A job from a recipe's mapping, every field checked (:func:`clara.settings.load`)."""
        return settings.load(cls, data, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainJobConfig:
        """Load a recipe and apply ``key=value`` overrides (dotted keys reach into mappings)."""
        data = settings.read_file(recipe_path(path))
        for item in overrides:
            apply_override(data, item)
        return cls.from_mapping(data, source=str(path))


def apply_override(data: dict, item: str) -> None:
    """Apply one ``key=value`` (``model.compression_rate=4``) to ``data``; the value is read as YAML."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value")
    value = yaml.safe_load(raw) if raw.strip() else None
    *parents, last = key.strip().split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a mapping")
    node[last] = value


def _positive(name: str, v: Any) -> None:
    if v <= 0:
        raise ConfigError(f"{name}: must be positive, got {v}")


# -- plan -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainPlan:
    """What a job will do, once the data is counted."""

    examples: int
    steps: int
    global_batch_size: int
    grad_accum: int
    lr: float
    #: Micro-batches one worker reads per pass over the data (its equal share, ``drop_last``).
    micro_batches_per_epoch: int

    @property
    def epochs(self) -> float:
        return self.steps * self.grad_accum / self.micro_batches_per_epoch


def plan_run(cfg: TrainJobConfig, examples: int) -> TrainPlan:
    per_worker = examples // cfg.num_workers
    micro_per_epoch = per_worker // cfg.micro_batch_size
    if micro_per_epoch == 0:
        raise ConfigError(f"data: {examples} examples over {cfg.num_workers} worker(s) give fewer than "
                          f"micro_batch_size={cfg.micro_batch_size} examples per worker")
    accum = cfg.batch_size // (cfg.micro_batch_size * cfg.num_workers)
    if cfg.steps is not None:
        steps = cfg.steps
    else:
        steps = max(1, math.floor((cfg.epochs or 1.0) * micro_per_epoch / accum))
    return TrainPlan(examples, steps, cfg.batch_size, accum, cfg.peak_lr, micro_per_epoch)


# -- data: read and validate with Ray Data ------------------------------------------------------------
def _example_schema():
    import pyarrow as pa

    return pa.schema([("chunks", pa.list_(pa.string())), ("question", pa.string()), ("answer", pa.string()),
                      ("gold", pa.list_(pa.int64())), ("kind", pa.string()), ("error", pa.string())])


def _parse_file(path: str, data: bytes, stage: str) -> Iterator[Example]:
    """Examples of one record file (JSONL, or Parquet by suffix); raises RecordError naming file:line."""
    n = 0
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), 1):
            n += 1
            # Parquet has a column for every field of every row: null means absent.
            yield from parse_record({k: v for k, v in row.items() if v is not None}, stage, f"{path}:row {i}")
    else:
        from clara.data.jsonl import jsonl_lines, parse_jsonl

        for where, obj in parse_jsonl(jsonl_lines(data), path, RecordError):
            n += 1
            yield from parse_record(obj, stage, where)
    if n == 0:
        raise RecordError(path, "<file>", "holds no records")


def _parse_files(batch, stage: str):
    """Ray Data UDF: files (``path``, ``bytes``) -> example rows, or one error row per bad file."""
    import pyarrow as pa

    cols: dict[str, list] = {name: [] for name in _example_schema().names}
    for path, data in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist()):
        try:
            examples = list(_parse_file(path, data, stage))
        except RecordError as e:
            for name, v in zip(cols, ([], "", "", [], "", json.dumps([e.where, e.field, e.msg]))):
                cols[name].append(v)
            continue
        for ex in examples:
            for name, v in zip(cols, (list(ex.chunks), ex.question, ex.answer, list(ex.gold), ex.kind, "")):
                cols[name].append(v)
    return pa.Table.from_pydict(cols, schema=_example_schema())


def _rows_where_error(batch, bad: bool):
    import pyarrow.compute as pc

    mask = pc.not_equal(batch["error"], "") if bad else pc.equal(batch["error"], "")
    return batch.filter(mask)


def read_examples(paths: Sequence[str], stage: str):
    """Read and validate every record with Ray Data; returns ``(dataset of example rows, count)``.

    All or nothing: any bad record raises :class:`~clara.data.records.RecordError` naming its file and
    line (``file:row N`` for Parquet), before any training starts.
    """
    import ray.data

    for p in paths:
        if not _is_uri(p) and not any(ch in p for ch in "*?[") and not Path(p).exists():
            raise ConfigError(f"data: {p}: no such file or directory")
        if not _is_uri(p) and Path(p).is_file() and not p.endswith(tuple(f".{s}" for s in DATA_SUFFIXES)):
            raise ConfigError(f"data: {p}: expected a .jsonl, .json or .parquet file")
    files = ray.data.read_binary_files(list(paths), include_paths=True, file_extensions=list(DATA_SUFFIXES))
    parsed = files.map_batches(_parse_files, fn_kwargs={"stage": stage}, batch_size=1,
                               batch_format="pyarrow").materialize()
    bad = parsed.map_batches(_rows_where_error, fn_kwargs={"bad": True}, batch_format="pyarrow").take(10)
    if bad:
        where, field_name, msg = json.loads(bad[0]["error"])
        if len(bad) > 1:
            others = ", ".join(json.loads(r["error"])[0] for r in bad[1:])
            msg = f"{msg} (other bad files: {others})"
        raise RecordError(where, field_name, msg)
    good = parsed.map_batches(_rows_where_error, fn_kwargs={"bad": False}, batch_format="pyarrow")
    good = good.drop_columns(["error"]).materialize()
    return good, good.count()


def _examples(batch) -> list[Example]:
    return [Example(tuple(c), q, a, tuple(g), k) for c, q, a, g, k in zip(
        batch["chunks"].to_pylist(), batch["question"].to_pylist(), batch["answer"].to_pylist(),
        batch["gold"].to_pylist(), batch["kind"].to_pylist())]


# -- storage helpers (local paths and object-store URIs) ------------------------------------------------
def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def _read_text(path: str) -> str | None:
    import pyarrow.fs

    fs, p = _fs(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def _write_text(path: str, text: str) -> None:
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def _local_copy(path: str, tmp: str) -> str:
    """A local directory with the contents of ``path`` (downloaded when it is a URI)."""
    if not _is_uri(path):
        return path
    import pyarrow.fs

    dest = str(Path(tmp) / "init")
    pyarrow.fs.copy_files(path, dest)
    return dest


def _claim_run_dir(cfg: TrainJobConfig) -> dict | None:
    """Record what this run trains in its run directory; a rerun under the same name must match.

    Returns what an earlier run of this name recorded (``None`` for a new run).
    """
    job = {"stage": cfg.stage, "init": cfg.init, "model": cfg.model}
    path = f"{cfg.run_dir}/{_JOB_FILE}"
    old = _read_text(path)
    if old is not None:
        before = json.loads(old)
        if before != job:
            raise ConfigError(f"name: run {cfg.run_name!r} in {cfg.storage_path} trained {before}, not {job}; "
                              "choose another name to start a new run")
        return before
    _write_text(path, json.dumps(job, indent=2) + "\n")
    return None


# -- the training loop, on every worker --------------------------------------------------------------------
def _build_model(cfg: TrainJobConfig, device, tmp: str):
    """The stage's starting model on ``device``; its saved ``device`` setting is kept for the export."""
    from clara.model import ClaraModel

    if cfg.init:
        from clara.checkpoint import read_manifest

        path = _local_copy(cfg.init, tmp)
        saved_device = read_manifest(path)["config"]["device"]
        model = ClaraModel.from_pretrained(path, device=str(device))
        overrides = dict(cfg.model)
        rate = overrides.pop("compression_rate", None)
        if rate is not None and rate != model.config.compression_rate:
            try:
                model.keep_memory_slots(rate)
            except ValueError as e:
                raise ConfigError(f"model.compression_rate: init {cfg.init}: {e}") from None
        for k, v in overrides.items():
            setattr(model.config, k, v)
    else:
        config = ClaraConfig.from_dict({**cfg.model, "device": str(device)})
        model = ClaraModel.from_base(config, seed=cfg.seed)
        saved_device = cfg.model.get("device", "auto")
    model.config.device = saved_device
    return model


def _maybe_fail(cfg: TrainJobConfig, fault: dict[str, int], next_step: int, rank: int, world: int) -> None:
    """An injected fault (:mod:`pipelines.faults`): fail once (a marker in the run directory remembers it)."""
    if fault.get("fail_at_step") != next_step or rank != fault.get("fail_rank", -1) % world:
        return
    marker = f"{cfg.run_dir}/fault_injected_at_step_{next_step}"
    if _read_text(marker) is not None:
        return
    _write_text(marker, f"rank {rank} failed before step {next_step}\n")
    from pipelines.faults import InjectedFault

    raise InjectedFault(f"injected fault: rank {rank} fails before step {next_step} (train.fail_at_step)")


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _export(model, dest: str) -> None:
    if not _is_uri(dest):
        model.save_pretrained(dest)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        local = model.save_pretrained(Path(tmp) / "model")
        pyarrow.fs.copy_files(str(local), dest)


class StageRecipe:
    """One worker's run of a stage, in the shape of a torchtune recipe: :meth:`setup` (model, stage
    set-up, DeepSpeed engine, resume), :meth:`train` (the loop: micro-batches, accumulation,
    reports, checkpoints), :meth:`save` (export the model). Ray Train runs :func:`train_worker`."""

    def __init__(self, job: dict):
        import ray.train
        import ray.train.torch
        import torch

        self.cfg, self.plan = TrainJobConfig(**job["config"]), TrainPlan(**job["plan"])
        self.faults: dict[str, int] = job.get("faults") or {}
        ctx = ray.train.get_context()
        self.rank, self.world, self.device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
        torch.set_num_threads(self.cfg.torch_threads or max(1, int(self.cfg.resources_per_worker.get("CPU", 1))))
        self.stage = get_stage(self.cfg.stage)
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "history": [], "starts": []}

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{self.cfg.stage}] {msg}", flush=True)

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed
        import ray.train
        import torch

        from clara.training.deepspeed import deepspeed_config, resolve_precision
        from clara.training.loop import lr_factor
        from pipelines import compat, train_checkpoint

        cfg, plan = self.cfg, self.plan
        t_setup = time.perf_counter()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        with tempfile.TemporaryDirectory() as tmp:
            self.model = _build_model(cfg, self.device, tmp)
        restored = ray.train.get_checkpoint()
        if restored is None and cfg.reinit_adapters:
            note = self.stage.prepare(self.model, seed=cfg.seed)
            if note:
                self.say(note)
        params = self.stage.configure(self.model)
        n_params = sum(p.numel() for p in params)  # before ZeRO-3 partitions them
        precision = resolve_precision(cfg.precision, self.device.type)
        ds_config = deepspeed_config(micro_batch_size=cfg.micro_batch_size, grad_accum=plan.grad_accum,
                                     world_size=self.world, lr=plan.lr, zero_stage=cfg.zero_stage,
                                     precision=precision, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_factor(s, plan.steps, cfg.warmup_ratio, cfg.min_lr_ratio))

        compat.clear_stale_extension_locks(out=lambda m: print(f"[{cfg.stage}] {m}", flush=True))  # per node
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=self.model, model_parameters=params,
                                                                 config=ds_config, lr_scheduler=schedule)
        if restored is not None:
            with restored.as_directory() as d:
                self.state.update(train_checkpoint.load(self.engine, d, rank=self.rank, world=self.world))
            self.say(f"resumed from the checkpoint at step {self.state['step']}")
        self.state["starts"].append(self.state["step"])
        self.say(f"{self.world} worker(s) on {self.device.type}, {precision}, ZeRO-{cfg.zero_stage}; "
                 f"{n_params:,} trainable parameters; global batch {plan.global_batch_size} = "
                 f"{cfg.micro_batch_size} x {self.world} worker(s) x {plan.grad_accum} accumulation; "
                 f"steps {self.state['step']} -> {plan.steps} (set-up {time.perf_counter() - t_setup:.0f}s)")

    # -- train ----------------------------------------------------------------------------------------
    def train(self) -> None:
        import random

        import ray.train
        import torch

        cfg, plan, state = self.cfg, self.plan, self.state
        warm_steps = int(plan.steps * cfg.reconstruction_warmup)
        shard = ray.train.get_dataset_shard("train")
        # loss ce mse micro tokens samples recall, memory spread and the micro-batches that measured it
        sums = torch.zeros(9, dtype=torch.float64, device=self.device)
        self.recall_key = None
        self.first_step, self.t_start, self.cpu_start = state["step"], time.perf_counter(), time.process_time()
        self.t_last, self.step_last = self.t_start, state["step"]
        micro = 0
        while state["step"] < plan.steps:
            skip = state["micro_in_epoch"]  # resuming mid-epoch: pass over what was already read
            batches = shard.iter_batches(
                batch_size=cfg.micro_batch_size, batch_format="pyarrow", drop_last=True,
                local_shuffle_buffer_size=cfg.shuffle_buffer_size or None,
                local_shuffle_seed=cfg.seed + state["epoch"] if cfg.shuffle_buffer_size else None)
            for batch in batches:
                if skip:
                    skip -= 1
                    continue
                if micro == 0:
                    _maybe_fail(cfg, self.faults, state["step"] + 1, self.rank, self.world)
                # negatives seeded by (seed, rank, micro-batch): the same after a resume
                rng = random.Random(f"{cfg.seed}:{self.rank}:{state['epoch']}:{state['micro_in_epoch']}")
                examples = self.stage.examples(_examples(batch), warm=state["step"] < warm_steps,
                                               negatives=cfg.wrong_memory_negatives, rng=rng)
                out = self.engine(examples, stage=cfg.stage)
                self.engine.backward(out.loss)
                self.engine.step()
                state["micro_in_epoch"] += 1
                micro += 1
                recall = next(((k, v) for k, v in out.metrics.items() if k.startswith("recall@")), None)
                if recall:
                    self.recall_key = recall[0]
                spread = out.metrics.get("memory_spread")
                sums += torch.tensor([float(out.loss.detach()), out.ce, out.mse, 1, out.tokens, len(examples),
                                      recall[1] if recall else 0.0, spread or 0.0, spread is not None],
                                     dtype=torch.float64, device=self.device)
                if micro < plan.grad_accum:
                    continue
                micro = 0
                state["step"] += 1
                self._step_done(sums)
                if state["step"] >= plan.steps:
                    break
            else:  # the shard is exhausted: next epoch
                state["epoch"] += 1
                state["micro_in_epoch"] = 0

    def _step_done(self, sums) -> None:
        """After an optimizer step: report metrics every ``report_every`` steps, with a checkpoint every
        ``checkpoint_every`` steps and at the end."""
        import ray.train
        import torch
        import torch.distributed as dist

        from pipelines import train_checkpoint

        cfg, plan, state = self.cfg, self.plan, self.state
        step = state["step"]
        checkpoint_now = step % cfg.checkpoint_every == 0 or step == plan.steps
        if step % cfg.report_every and not checkpoint_now:
            return
        cpu = torch.tensor([time.process_time() - self.cpu_start], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        dist.all_reduce(cpu)
        now = time.perf_counter()
        n = max(1.0, float(sums[3]))
        metrics = {"step": step, "epoch": state["epoch"], "loss": float(sums[0]) / n, "ce": float(sums[1]) / n,
                   "mse": float(sums[2]) / n, "lr": self.scheduler.get_last_lr()[0],
                   "tokens_per_s": float(sums[4]) / (now - self.t_last),
                   "samples_per_s": float(sums[5]) / (now - self.t_last),
                   "step_time_s": (now - self.t_last) / (step - self.step_last), "elapsed_s": now - self.t_start,
                   "cpu_s": float(cpu[0])}
        key = self.recall_key
        if key:
            metrics[key] = float(sums[6]) / n
        if float(sums[8]):  # stages 1-2: whether the compressor still tells chunks apart (a collapse shows here)
            metrics["memory_spread"] = float(sums[7]) / float(sums[8])
        sums.zero_()
        state["history"].append(metrics)
        eta = (now - self.t_start) / (step - self.first_step) * (plan.steps - step)
        self.say(f"step {step}/{plan.steps} loss {metrics['loss']:.4f} ce {metrics['ce']:.4f} "
                 f"mse {metrics['mse']:.4f}" + (f" {key} {metrics[key]:.2f}" if key else "")
                 + (f" spread {metrics['memory_spread']:.3f}" if "memory_spread" in metrics else "")
                 + f" lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} samples/s "
                 f"{metrics['tokens_per_s']:.0f} tok/s elapsed {_fmt_time(now - self.t_start)} eta {_fmt_time(eta)}")
        if checkpoint_now:
            with tempfile.TemporaryDirectory() as d:
                train_checkpoint.save(self.engine, d, rank=self.rank, world=self.world, client_state=state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        self.t_last, self.step_last = time.perf_counter(), step

    # -- save -----------------------------------------------------------------------------------------
    def save(self) -> dict:
        import deepspeed
        import torch.distributed as dist

        gather = (deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
                  if self.cfg.zero_stage == 3 else nullcontext())
        with gather:
            if self.rank == 0:
                _export(self.model, self.cfg.model_dir)
        dist.barrier()
        self.say(f"exported the model to {self.cfg.model_dir}")
        return {"step": self.state["step"], "starts": self.state["starts"], "history": self.state["history"],
                "seconds": time.perf_counter() - self.t_start}


def train_worker(job: dict) -> dict:
    """Ray Train's per-worker loop (``TorchTrainer(train_worker, train_loop_config=job)``)."""
    recipe = StageRecipe(job)
    recipe.setup()
    recipe.train()
    return recipe.save()


# -- driver -------------------------------------------------------------------------------------------------
@dataclass
class TrainSummary:
    stage: str
    name: str
    steps: int
    #: The step each attempt started from: ``[0]`` for an uninterrupted run, ``[0, 40]`` after one restart.
    starts: list[int]
    #: Reported metrics, one dict per report, in step order (restored across restarts).
    history: list[dict[str, float]]
    examples: int
    model_dir: str
    run_dir: str
    checkpoint: str | None
    seconds: float

    def line(self) -> str:
        h = self.history
        loss = f"loss {h[0]['loss']:.4f} -> {h[-1]['loss']:.4f}" if h else "no steps run"
        resumed = [s for s in self.starts if s] if self.starts else []
        how = f", resumed at step(s) {', '.join(map(str, resumed))}" if resumed else ""
        rate = f", {h[-1]['samples_per_s']:.1f} samples/s" if h else ""
        return (f"[{self.stage}] done: {self.steps} steps over {self.examples} examples in {_fmt_time(self.seconds)}"
                f"{how}; {loss}{rate}; model: {self.model_dir}; checkpoints: {self.run_dir}")


def run_train(cfg: TrainJobConfig, out: Callable[[str], None] = print,
              dry_run: bool = False) -> TrainSummary | TrainPlan:
    """Validate the data, train on Ray Train + DeepSpeed, export the model; returns the summary.

    With ``dry_run`` only the data is read and validated and the plan returned.
    """
    from pipelines import compat, faults

    t0 = time.perf_counter()
    cfg = cfg.resolved()
    fault = faults.injected("train")
    compat.ensure_ray(cfg.ray_address)
    ds, n = read_examples(cfg.data, cfg.stage)
    plan = plan_run(cfg, n)
    out(f"[{cfg.stage}] {n} examples from {len(cfg.data)} source(s), all valid; {plan.steps} steps of "
        f"{plan.global_batch_size} (~{plan.epochs:.2f} epochs), lr {plan.lr:g}, {cfg.num_workers} worker(s), "
        f"ZeRO-{cfg.zero_stage}, precision {cfg.precision}")
    if dry_run:
        return plan
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:  # checked on the driver, before a worker fails on it
        raise SystemExit("the training job needs DeepSpeed, the `train` extra: pip install 'clara-on-ray[train]' "
                         "(on a cluster, add deepspeed==0.19.8 to the job's runtime_env pip list)")
    if _claim_run_dir(cfg) is not None:
        out(f"[{cfg.stage}] run {cfg.run_name!r} exists in {cfg.storage_path}: continuing from its latest checkpoint")
    result = compat.fit_torch_trainer(
        train_worker, loop_config={"config": asdict(cfg), "plan": asdict(plan), "faults": fault},
        datasets={"train": ds},
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=cfg.resources_per_worker,
        storage_path=cfg.storage_path, name=cfg.run_name, max_failures=cfg.max_failures,
        keep_checkpoints=cfg.keep_checkpoints)
    if getattr(result, "error", None) is not None:
        raise result.error
    rv = result.return_value or {}
    summary = TrainSummary(cfg.stage, cfg.run_name, rv.get("step", 0), rv.get("starts", []), rv.get("history", []),
                           n, cfg.model_dir, cfg.run_dir, result.checkpoint.path if result.checkpoint else None,
                           time.perf_counter() - t0)
    out(summary.line())
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_config_flags(p)
    p.add_argument("--override", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change a setting of the recipe (dotted keys: model.compression_rate=4); repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and the data, print the plan, stop")
    settings.add_flags(p.add_argument_group("settings (a recipe's fields; flags win over --config)"),
                       TrainJobConfig, required=REQUIRED)
    return p


def recipe_path(path: str) -> Path:
    """``--config``'s file: as given when it exists, else the shipped recipe of that name
    (``pipelines/recipes/stage1_scp.yaml`` or ``stage1_scp`` resolve from any directory, so a job in the
    project image needs no checkout)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    recipes = Path(__file__).resolve().parent / "recipes"
    for candidate in (recipes.parent.parent / given, recipes / given, recipes / f"{given}.yaml"):
        if candidate.is_file():
            return candidate
    return given


#: Fields a recipe or the command line must give.
REQUIRED = ("stage", "data")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        base = settings.read_file(recipe_path(args.config)) if args.config else {}
        for item in args.override:
            apply_override(base, item)
        cfg = settings.from_args(TrainJobConfig, args, config="", base=base, required=REQUIRED,
                                  source=args.config)
        if args.print_config:
            settings.print_config(cfg)
            return 0
        run_train(cfg, dry_run=args.dry_run)
    except (ConfigError, RecordError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
