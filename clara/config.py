"""Typed, validated configuration of a CLaRa model.

A config file (JSON or YAML) only fills in these dataclasses; every field is checked in
``__post_init__`` so a bad value fails at load time with the field's name, not deep inside a job.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from clara.settings import ConfigError

#: The three LoRA adapters carried by the one base model, in the paper's words.
ADAPTERS: tuple[str, ...] = ("compressor", "query_reasoner", "generator")


#: Ways memory states are normalised (see :attr:`ClaraConfig.memory_norm`).
MEMORY_NORMS: tuple[str, ...] = ("center", "none")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass
class LoraSettings:
    """LoRA settings shared by the three adapters (paper: r=16, alpha=32, dropout 0.1, all linear layers)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    #: ``"all-linear"`` or a list of module names (``["q_proj", "v_proj"]``).
    target_modules: str | list[str] = "all-linear"

    def __post_init__(self) -> None:
        _check(isinstance(self.r, int) and self.r > 0, "lora.r", f"must be a positive int, got {self.r!r}")
        _check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "lora.alpha",
               f"must be > 0, got {self.alpha!r}")
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "lora.dropout",
               f"must be in [0, 1), got {self.dropout!r}")
        ok = self.target_modules == "all-linear" or (
            isinstance(self.target_modules, list) and self.target_modules
            and all(isinstance(m, str) for m in self.target_modules)
        )
        _check(bool(ok), "lora.target_modules", f"must be 'all-linear' or a list of names, got {self.target_modules!r}")


#: Field metadata of :class:`ClaraConfig`'s runtime choices, which do not define the model (they are
#: not hashed into its ``compressor_version`` and a later stage may change them): where it runs ...
PLACEMENT = {"runtime": "placement"}
#: ... and how it retrieves, trains and generates.
BEHAVIOUR = {"runtime": "behaviour"}


@dataclass
class ClaraConfig:
    """Everything that defines a CLaRa model besides its weights, and its runtime choices.

    The fields without ``runtime`` metadata define the model (:meth:`model_dict`, hashed into
    ``compressor_version``); the others (:data:`RUNTIME_FIELDS`: device, dtype, top-k, temperature,
    MSE weight, generation length) are choices of a run.

    ``n_mem = doc_max_tokens // compression_rate`` memory tokens represent one chunk of at most
    ``doc_max_tokens`` tokens (longer chunks are truncated to that many tokens).
    """

    #: Hugging Face model name or local directory of the base causal LM.
    base_model: str
    #: Chunk tokens per memory token (paper: 4 to 256).
    compression_rate: int = 16
    #: Maximum tokens of one chunk; longer chunks are truncated to their first ``doc_max_tokens`` tokens.
    doc_max_tokens: int = 256
    #: Maximum tokens of a question (query reasoner and generator prompt); longer ones are truncated.
    query_max_tokens: int = 128
    lora: LoraSettings = field(default_factory=LoraSettings)
    #: Also train (and save) the base model's weights; the paper keeps them frozen. Tiny models
    #: trained from random weights need it.
    train_base: bool = False
    #: ``"auto"`` (cuda, then mps, then cpu) or an explicit torch device string.
    device: str = field(default="auto", metadata=PLACEMENT)
    #: Dtype of the base's weights: ``"auto"`` (bf16 on cuda, and on CPUs with native bf16 when the
    #: base is frozen; fp32 elsewhere; see :func:`resolve_dtype`), ``"float32"``, ``"bfloat16"``
    #: or ``"float16"``. Adapters and memory slots are always held in fp32.
    dtype: str = field(default="auto", metadata=PLACEMENT)
    #: Chunks retrieved per question.
    top_k: int = field(default=5, metadata=BEHAVIOUR)
    #: Temperature of the differentiable top-k's softmax (paper: 0.02).
    topk_temperature: float = field(default=0.02, metadata=BEHAVIOUR)
    #: Weight of the MSE term between mean memory-token and mean chunk-token states (paper: 0.1).
    mse_weight: float = field(default=0.1, metadata=BEHAVIOUR)
    #: Weight of the generator's cross-entropy on content tokens (a word with a capital letter or a
    #: digit, continuation pieces included: names, numbers, dates), against 1 for every other answer
    #: token; 1 (the paper's plain mean) by default. Above 1 the reconstruction loss spends its
    #: weight on the facts an unseen chunk's memory most often loses (see ``benchmarks/memory_probe.py``).
    content_weight: float = field(default=1.0, metadata=BEHAVIOUR)
    #: Default generation length.
    max_new_tokens: int = field(default=64, metadata=BEHAVIOUR)
    #: How the compressor's last-layer states become memory vectors. ``"center"``: subtract the
    #: per-slot mean memory (a running statistic kept during training and saved with the model),
    #: then rescale each vector to the mean norm of the base's token embeddings. A pretrained
    #: base's states share one large direction (mean pairwise cosine ~0.86 between chunks, norm ~47
    #: against ~3 for token embeddings) that drowns what is specific to a chunk; without this the
    #: generator of SmolLM2 learns to ignore its memory. ``"none"``: the raw states (the paper's).
    memory_norm: str = "center"
    #: The decoder layer whose output states (after the base's final norm) become memory, counted
    #: from 1; ``None``: the last layer (the paper's). With ``k`` below the base's depth the
    #: compressor and the query reasoner run only the first ``k`` layers, so compressing a chunk
    #: costs about ``k / depth`` of a full forward pass. Part of the model's identity.
    memory_layer: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        _check(isinstance(self.base_model, str) and bool(self.base_model), "base_model", "must be a non-empty string")
        for name in ("compression_rate", "doc_max_tokens", "query_max_tokens", "top_k", "max_new_tokens"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, f"must be a positive int, got {v!r}")
        _check(self.compression_rate <= self.doc_max_tokens, "compression_rate",
               f"{self.compression_rate} is larger than doc_max_tokens={self.doc_max_tokens}: n_mem would be 0")
        _check(isinstance(self.topk_temperature, (int, float)) and self.topk_temperature > 0, "topk_temperature",
               f"must be > 0, got {self.topk_temperature!r}")
        _check(isinstance(self.mse_weight, (int, float)) and self.mse_weight >= 0, "mse_weight",
               f"must be >= 0, got {self.mse_weight!r}")
        _check(isinstance(self.content_weight, (int, float)) and not isinstance(self.content_weight, bool)
               and self.content_weight > 0, "content_weight", f"must be > 0, got {self.content_weight!r}")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
               f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _check(isinstance(self.device, str) and bool(self.device), "device", "must be a device string")
        _check(self.memory_norm in MEMORY_NORMS, "memory_norm",
               f"must be one of {MEMORY_NORMS}, got {self.memory_norm!r}")
        k = self.memory_layer
        _check(k is None or (isinstance(k, int) and not isinstance(k, bool) and k > 0), "memory_layer",
               f"must be a positive int (a decoder layer, counted from 1) or null, got {k!r}")

    @property
    def n_mem(self) -> int:
        """Memory tokens per chunk."""
        return self.doc_max_tokens // self.compression_rate

    def resolve_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolve_dtype(self, device: torch.device | None = None) -> torch.dtype:
        return resolve_dtype(self.dtype, device or self.resolve_device(), frozen_base=not self.train_base)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_dict(self) -> dict[str, Any]:
        """The fields that define the model (what ``compressor_version`` hashes), without runtime choices."""
        d = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
        if d.get("memory_layer") is None:  # the default: models saved before the field keep their version
            d.pop("memory_layer", None)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> ClaraConfig:
        """A config from plain data (a saved ``clara.json``, a recipe's ``model:`` block), every field checked."""
        from clara.settings import load

        return load(cls, data, source=source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ClaraConfig:
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))


#: Runtime choices (not part of the model's identity), and those a later stage may change.
RUNTIME_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ClaraConfig) if f.metadata.get("runtime"))
BEHAVIOUR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ClaraConfig) if f.metadata == BEHAVIOUR)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device, frozen_base: bool = False) -> torch.dtype:
    """The dtype of the base model's weights.

    ``auto``: bf16 on cuda; bf16 on CPUs with native bf16 arithmetic when the base is frozen
    (PEFT keeps the LoRA weights, and this project the memory slots, in fp32, so everything that
    trains keeps fp32 master weights while the frozen matmuls run in bf16: 1.8-3x faster than
    fp32 or autocast on this project's CPUs); fp32 elsewhere (MPS, older CPUs, and a trained
    base, whose updates would round away in bf16).
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if device.type == "cpu" and frozen_base and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AVX512-BF16 or AMX), where bf16 weights pay.

    ``CLARA_CPU_BF16=0`` in the environment says no (``dtype: auto`` then stays fp32 on CPU).
    """
    if os.environ.get("CLARA_CPU_BF16", "1") == "0":
        return False
    return cpu_flags_have_bf16()


def cpu_flags_have_bf16() -> bool:
    """What the processor's flags say, whatever the environment says."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype of a training step; weights (the optimizer's master copy) keep theirs.

    ``auto``: bf16 on cuda and on CPUs with native bf16, none elsewhere (MPS, older CPUs);
    ``bf16``: bf16 wherever autocast supports it; ``off``: none.
    """
    if setting not in ("auto", "bf16", "off"):
        raise ConfigError(f"autocast: must be auto, bf16 or off, got {setting!r}")
    if setting == "off" or device.type not in ("cpu", "cuda"):
        return None
    if setting == "bf16" or device.type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return None
