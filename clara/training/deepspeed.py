"""The DeepSpeed configuration of a CLaRa training run, built from plain settings.

Only a dict is built here (DeepSpeed itself is imported by the job that uses it). The choices
that are not obvious:

* the optimizer is DeepSpeed's ``AdamW`` with ``torch_adam``: ``torch.optim.AdamW`` (foreach
  kernels on CUDA). DeepSpeed's FusedAdam is built by a JIT compile on first use (about a minute
  with g++ on CPU; nvcc on GPU, where it failed on an H100 image whose arch list reads ``9.0a``);
* precision is ``bf16`` on GPU and ``fp32`` on CPU (``auto``); fp16 is not offered: it needs loss
  scaling and does not run on DeepSpeed's CPU accelerator;
* the learning-rate schedule is not in this dict: the job passes the paper's warm-up + cosine
  schedule (:func:`clara.training.loop.lr_factor`) as a client scheduler, so both loops share one schedule.
"""

from __future__ import annotations

from typing import Any

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto``: bf16 on CUDA, fp32 elsewhere (CPU and MPS kernels are fastest and exact in fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    zero_stage: int = 2,
    precision: str = "fp32",
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    torch_adam: bool = True,
) -> dict[str, Any]:
    """A DeepSpeed config dict; ``train_batch_size = micro_batch_size * grad_accum * world_size``.

    ``precision`` is a resolved one (``fp32`` or ``bf16``, see :func:`resolve_precision`).
    """
    for name, v in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be resolved to fp32 or bf16, got {precision!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # Gathered 16-bit weights on save: the export reads whole tensors, not shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                       "torch_adam": torch_adam},
        },
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # The job prints its own progress; DeepSpeed's per-step log would drown it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
