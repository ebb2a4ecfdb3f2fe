"""A single-process training loop for the three stages: used by the demo and the tests.

The Ray Train job (``pipelines.train``) runs the same losses under DeepSpeed; this loop is the
reference it is checked against, and the fastest way to train a tiny model on one machine.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from clara.config import autocast_dtype
from clara.data.records import Example
from clara.losses import LossOutput
from clara.training.stages import Stage, get_stage


@dataclass
class TrainSettings:
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    #: The cosine schedule decays to ``lr * min_lr_ratio``.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    #: Stage 1: fraction of steps at the start in which every example is replaced by the
    #: reconstruction of its chunk (the curriculum that teaches the generator to read memory before it
    #: can memorise answers); the Ray Train job's ``reconstruction_warmup`` means the same.
    reconstruction_warmup: float = 0.0
    #: bf16 autocast of the forward and backward passes (:func:`clara.config.autocast_dtype`), for a
    #: model whose weights are fp32 (a trained base). ``off`` by default: with a frozen base,
    #: ``dtype: auto`` already holds the base in bf16 and what trains in fp32, which was 3x faster
    #: on CPU than fp32 weights under autocast (16.5 vs ~5 s a step on SmolLM2).
    autocast: str = "off"
    #: ``random``: each batch drawn with replacement (seeded); ``sequential``: consecutive slices of
    #: ``examples``, cycling, as the Ray Train job reads a file without its shuffle buffer.
    order: str = "random"
    #: Apply the stage's adapter set-up first (:meth:`clara.training.stages.Stage.prepare`: stage 2 starts a
    #: fresh generator, stage 3 the query reasoner as a copy of the compressor), as the Ray Train job
    #: does on a fresh start.
    reinit_adapters: bool = True
    #: Stages 1-2: fraction of QA examples replaced in each batch by a wrong-memory negative
    #: (:func:`clara.data.records.with_wrong_memory_negatives`); not during the reconstruction warm-up.
    wrong_memory_negatives: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("warmup_ratio", "min_lr_ratio", "reconstruction_warmup", "wrong_memory_negatives"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.order not in ("random", "sequential"):
            raise ValueError(f"order must be random or sequential, got {self.order!r}")


def lr_factor(step: int, total: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (the paper's schedule)."""
    warm = max(1, int(total * warmup_ratio)) if warmup_ratio > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batches(examples: Sequence[Example], settings: TrainSettings, stage: Stage) -> Iterator[list[Example]]:
    """Random batches of ``examples`` as ``stage`` trains on them (:meth:`~clara.training.stages.Stage.examples`:
    reconstructions of their chunks during the warm-up, then wrong-memory negatives if asked)."""
    rng = random.Random(settings.seed)
    neg_rng = random.Random(settings.seed + 1)
    warm_steps = int(settings.steps * settings.reconstruction_warmup)
    for step in range(settings.steps):
        if settings.order == "sequential":
            start = step * settings.batch_size
            batch = [examples[(start + i) % len(examples)] for i in range(settings.batch_size)]
        else:
            batch = [examples[rng.randrange(len(examples))] for _ in range(settings.batch_size)]
        yield stage.examples(batch, warm=step < warm_steps, negatives=settings.wrong_memory_negatives, rng=neg_rng)


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def train(model, stage: str | Stage, examples: Sequence[Example], settings: TrainSettings,
          progress: Callable[[int, LossOutput, float], None] | None = None) -> TrainLog:
    """Train ``model`` in place for ``settings.steps`` steps of ``stage``; returns per-step losses.

    ``stage`` is a stage's name or a :class:`~clara.training.stages.Stage` (for example one of
    :data:`~clara.training.stages.STAGES` with fewer adapters trainable, via ``dataclasses.replace``);
    its ``name`` picks the loss.
    """
    if not examples:
        raise ValueError("no training examples")
    spec = stage if isinstance(stage, Stage) else get_stage(stage)
    stage = spec.name
    if settings.reconstruction_warmup and not spec.reconstruction_warmup:
        raise ValueError(f"reconstruction_warmup: stage {stage!r} has no reconstruction warm-up (only scp)")
    if settings.wrong_memory_negatives and not spec.wrong_memory_negatives:
        raise ValueError(f"wrong_memory_negatives: stage {stage!r} does not use them (only scp and instruct)")
    if settings.reinit_adapters:
        spec.prepare(model, seed=settings.seed)
    torch.manual_seed(settings.seed)
    params = spec.configure(model)
    amp = autocast_dtype(settings.autocast, model.device)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    log, t0 = TrainLog(), time.perf_counter()
    for step, batch in enumerate(batches(examples, settings, spec)):
        for g in opt.param_groups:
            g["lr"] = settings.lr * lr_factor(step, settings.steps, settings.warmup_ratio, settings.min_lr_ratio)
        with torch.autocast(model.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(batch, stage=stage)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        log.losses.append(float(out.loss.detach()))
        log.tokens += out.tokens
        if progress is not None and (step % settings.log_every == 0 or step == settings.steps - 1):
            progress(step, out, time.perf_counter() - t0)
    model.eval()
    log.seconds = time.perf_counter() - t0
    return log
