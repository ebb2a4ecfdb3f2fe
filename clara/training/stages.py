"""The training stages, each defined once: what it reads, what trains, its loss, how it starts.

* Stage 1 (``scp``) trains the compressor, the generator and the memory slots on QA, paraphrase
  and reconstruction examples of one chunk each; it may start with reconstruction-only steps.
* Stage 2 (``instruct``) keeps stage 1's compressor and memory slots and starts a **fresh
  generator adapter** (:func:`reset_adapter`): LoRA ``A`` re-drawn, ``B`` zero, so the generator
  starts as the bare base model; it learns to answer from several chunks' memory.
* Stage 3 (``e2e``) keeps the compressor frozen and **initialises the query reasoner from the
  compressor** (:func:`copy_adapter`): questions start in the same space as the chunks' memory,
  and the answer's loss reaches the query reasoner through the differentiable top-k.
* ``text`` is not a CLaRa stage: the plain-text RAG baseline on the same backbone, a generator
  adapter trained on instruct records with the chunks given as text.

Both training loops (:mod:`clara.training.loop` on one process, ``pipelines.train`` on Ray Train with
DeepSpeed), the benchmarks and the demo take everything stage-specific from :data:`STAGES`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clara.config import ADAPTERS


@dataclass(frozen=True)
class Stage:
    name: str
    #: The record format its data is in (:func:`clara.data.records.parse_record`).
    records: str
    #: The LoRA adapters it trains.
    adapters: tuple[str, ...]
    #: Whether the learned memory-slot embeddings train.
    memory_embeddings: bool
    #: Whether the base weights train when the model's ``config.train_base`` is set.
    base: bool
    #: What :meth:`prepare` does to a model that starts this stage fresh.
    start: str | None
    #: The paper's peak learning rate and global batch (every job may override them).
    lr: float
    global_batch_size: int
    #: Chunks per record when records are derived for this stage (``None``: one chunk per example).
    candidates: int | None
    #: Whether reconstruction-only warm-up steps and wrong-memory negatives apply.
    reconstruction_warmup: bool
    wrong_memory_negatives: bool

    def configure(self, model) -> list[torch.nn.Parameter]:
        """Set what trains in this stage on ``model``; returns the trainable parameters."""
        model.set_trainable(self.adapters, base=model.config.train_base and self.base,
                            memory_embeddings=self.memory_embeddings)
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, model, batch):
        """The stage's loss on one batch of examples (a :class:`clara.losses.LossOutput`)."""
        from clara import losses

        fn = {"e2e": losses.e2e_loss, "text": losses.text_rag_loss}.get(self.name, losses.compression_loss)
        return fn(model, batch)

    def prepare(self, model, seed: int = 0) -> str | None:
        """Apply the stage's adapter initialisation to a fresh start; returns what was done, or None."""
        if self.start == "fresh generator":
            n = reset_adapter(model, "generator", seed)
            return f"fresh generator adapter ({n} LoRA layers re-initialised)"
        if self.start == "query reasoner from compressor":
            n = copy_adapter(model, "compressor", "query_reasoner")
            return f"query reasoner initialised from the compressor ({n} LoRA tensors copied)"
        return None

    def examples(self, batch: Sequence, *, warm: bool = False, negatives: float = 0.0,
                 rng: random.Random | None = None) -> list:
        """What one batch of records trains on: during the reconstruction warm-up (``warm``) each
        example is replaced by the reconstruction of its chunk; otherwise about ``negatives`` of the
        QA / instruction examples become wrong-memory negatives (drawn with ``rng``)."""
        from clara.data.records import reconstruction_example, with_wrong_memory_negatives

        if warm and self.reconstruction_warmup:
            return [reconstruction_example(ex.chunks[0]) for ex in batch]
        if negatives and self.wrong_memory_negatives:
            return with_wrong_memory_negatives(list(batch), negatives, rng or random.Random(0))
        return list(batch)


#: The three CLaRa stages, in order, then the text-RAG baseline. Defaults are the paper's
#: (stages 1-2: lr 1e-4, batch 128, 5 candidates; stage 3: lr 5e-6, batch 32, 20 candidates).
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("scp", records="scp", adapters=("compressor", "generator"), memory_embeddings=True, base=True,
          start=None, lr=1e-4, global_batch_size=128, candidates=None,
          reconstruction_warmup=True, wrong_memory_negatives=True),
    Stage("instruct", records="instruct", adapters=("compressor", "generator"), memory_embeddings=True, base=True,
          start="fresh generator", lr=1e-4, global_batch_size=128, candidates=5,
          reconstruction_warmup=False, wrong_memory_negatives=True),
    Stage("e2e", records="e2e", adapters=("query_reasoner", "generator"), memory_embeddings=False, base=False,
          start="query reasoner from compressor", lr=5e-6, global_batch_size=32, candidates=20,
          reconstruction_warmup=False, wrong_memory_negatives=False),
    Stage("text", records="instruct", adapters=("generator",), memory_embeddings=False, base=True,
          start=None, lr=1e-4, global_batch_size=128, candidates=5,
          reconstruction_warmup=False, wrong_memory_negatives=False),
)}
#: The stages a training job runs from records: the method's three.
CLARA_STAGES: tuple[str, ...] = ("scp", "instruct", "e2e")


def get_stage(name: str) -> Stage:
    """The stage called ``name``; a clear error for an unknown one."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}") from None


def _check(adapter: str) -> None:
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; expected one of {ADAPTERS}")


def reset_adapter(model, adapter: str, seed: int = 0) -> int:
    """Re-initialise one LoRA adapter as PEFT does for a new one (A: Kaiming-uniform, B: zeros).

    Deterministic for a seed; the caller's torch RNG state is left as it was. Returns the number
    of LoRA layers reset.
    """
    from peft.tuners.lora import LoraLayer

    _check(adapter)
    n = 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in model.peft.modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                module.reset_lora_parameters(adapter, True)
                n += 1
    if n == 0:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter!r}")
    return n


def copy_adapter(model, src: str, dst: str) -> int:
    """Copy every LoRA tensor of adapter ``src`` into adapter ``dst``; returns the tensors copied."""
    _check(src)
    _check(dst)
    params = dict(model.peft.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in params.items():
            if "lora_" in name and f".{src}." in name:
                target = params.get(name.replace(f".{src}.", f".{dst}."))
                if target is None or target.shape != p.shape:
                    raise ValueError(f"adapter {dst!r} has no tensor matching {name}")
                target.copy_(p)
                n += 1
    if n == 0:
        raise ValueError(f"the model has no LoRA tensors for adapter {src!r}")
    return n
