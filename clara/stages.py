"""What the model carries from one training stage into the next.

* Stage 1 (``scp``) starts from fresh adapters (or any CLaRa model directory).
* Stage 2 (``instruct``) keeps stage 1's compressor and memory slots and starts a **fresh
  generator adapter** (:func:`reset_adapter`): LoRA ``A`` re-drawn, ``B`` zero, so the generator
  starts as the bare base model.
* Stage 3 (``e2e``) keeps the compressor frozen and **initialises the query reasoner from the
  compressor** (:func:`copy_adapter`): questions start in the same space as the chunks' memory.
"""

from __future__ import annotations

import torch

from clara.config import ADAPTERS


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


def prepare_stage(model, stage: str, seed: int = 0) -> str | None:
    """Apply the stage's adapter initialisation; returns what was done (for the log), or None."""
    if stage == "instruct":
        n = reset_adapter(model, "generator", seed)
        return f"fresh generator adapter ({n} LoRA layers re-initialised)"
    if stage == "e2e":
        n = copy_adapter(model, "compressor", "query_reasoner")
        return f"query reasoner initialised from the compressor ({n} LoRA tensors copied)"
    return None
