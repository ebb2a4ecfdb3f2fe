"""The CLaRa model: one base causal LM, three LoRA adapters, chunks as memory tokens.

Read this file top to bottom to learn the method:

1. **Compress** (adapter ``compressor``). A chunk's tokens are followed by ``n_mem`` memory slots
   whose input embeddings are learned vectors (:attr:`ClaraModel.memory_embeddings`). The last
   layer's hidden states at those slots are the chunk's memory, ``[n_mem, d]``.
2. **Encode the question** (adapter ``query_reasoner``) the same way, to ``[n_mem, d]``.
3. **Score**: cosine between flattened question memory and flattened chunk memory.
4. **Select** the top-k with the straight-through estimator of :mod:`clara.topk`.
5. **Generate** (adapter ``generator``): the prompt holds one run of ``n_mem`` placeholder slots per
   retrieved chunk; their input embeddings are replaced by the chunk's memory vectors, exactly.

Shapes use B (batch), T (tokens), N (candidate chunks), k (retrieved), M (= n_mem), D (hidden).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clara.config import ADAPTERS, ClaraConfig
from clara.prompts import PARAPHRASE_INSTRUCTION, Background, GeneratorBatch, GeneratorPrompt, positions
from clara.settings import ConfigError


@dataclass
class EncoderOutput:
    memory: torch.Tensor  # (B, M, D)
    #: MSE between the mean memory-token state and the mean text-token state, averaged over B.
    mse: torch.Tensor  # ()


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got one string")
    if not texts:
        raise ValueError("need at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"text {i} is empty or not a string: {t!r}")


class MemorySlots(nn.Module):
    """The learned input embeddings of the memory tokens appended to every chunk, ``(M, D)``.

    Kept in fp32 whatever the base's dtype, like PEFT keeps LoRA weights: trained parameters are
    their own master copy, so AdamW's small updates are not rounded away in bf16. A module of its
    own so that ZeRO-3 gathers the partitioned weight when it is used, like any other layer's.
    """

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init)  # (M, D) float32

    def forward(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)  # (B, M, D)


class ClaraModel(nn.Module):
    """A base causal LM with the compressor, query-reasoner and generator LoRA adapters.

    Build one with :meth:`from_base` (fresh adapters) or :meth:`from_pretrained` (a saved
    CLaRa directory, see :mod:`clara.checkpoint`).
    """

    def __init__(self, causal_lm: nn.Module, tokenizer, config: ClaraConfig, seed: int = 0):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config = config
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        #: The generator's input layout (token ids around memory slots), shared with the vLLM engine.
        self.prompt = GeneratorPrompt(tokenizer, config.n_mem, config.doc_max_tokens, config.query_max_tokens)
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            bias="none",
        )
        self.peft = get_peft_model(causal_lm, lora, adapter_name=ADAPTERS[0])
        if config.memory_layer is not None:
            depth = len(getattr(self._decoder(), "layers", ()))
            if not 1 <= config.memory_layer <= depth:
                raise ConfigError(f"memory_layer: {config.memory_layer} is not a layer of {config.base_model} "
                                  f"(its decoder has {depth} layers{'' if depth else ' in no `layers` list'})")
        for name in ADAPTERS[1:]:
            self.peft.add_adapter(name, lora)
        emb = self.input_embeddings.weight
        g = torch.Generator().manual_seed(seed)
        # Memory slots start as random vectors with the statistics of real token embeddings.
        init = emb.detach().float().mean(0) + emb.detach().float().std(0) * torch.randn(
            config.n_mem, emb.shape[1], generator=g)
        self.memory = MemorySlots(init)
        # Memory normalisation (config.memory_norm == "center"): the per-slot mean of the raw
        # memory states, a running statistic updated while the compressor trains, and the norm
        # each memory vector is rescaled to (the token embeddings' mean norm, fixed at build time).
        self.register_buffer("memory_center", torch.zeros(config.n_mem, emb.shape[1], dtype=torch.float32))
        self.register_buffer("memory_scale", emb.detach().float().norm(dim=-1).mean())
        self.register_buffer("memory_center_steps", torch.zeros((), dtype=torch.long))
        #: Weight of the newest batch in the running mean (after the first batch, which sets it).
        self.memory_center_momentum = 0.05
        self._trainable: tuple[frozenset[str], bool, bool] = (frozenset(), False, False)
        self._active: str | None = None
        self.set_trainable(())

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_base(cls, config: ClaraConfig, seed: int = 0) -> ClaraModel:
        """Fresh adapters on ``config.base_model`` (a hub name, a local directory or a named base)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from clara.bases import resolve_base

        device = config.resolve_device()
        dtype = config.resolve_dtype(device)
        source = resolve_base(config.base_model)  # a named base (smollm2-135m) becomes its local folder
        tok = AutoTokenizer.from_pretrained(source)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        return cls(lm, tok, config, seed=seed).to(device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None) -> ClaraModel:
        from clara.checkpoint import load_model

        return load_model(cls, path, device=device)

    @classmethod
    def from_apple(cls, path: str | Path, base_model: str | None = None, device: str | None = None,
                   dtype: str = "auto") -> ClaraModel:
        """A checkpoint in apple/ml-clara's layout (see :func:`clara.checkpoint.import_apple_checkpoint`)."""
        from clara.checkpoint import import_apple_checkpoint

        return import_apple_checkpoint(cls, path, base_model=base_model, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        from clara.checkpoint import save_model

        return save_model(self, path)

    @torch.no_grad()
    def keep_memory_slots(self, compression_rate: int) -> ClaraModel:
        """Make this model a higher-rate one in place (fewer memory slots), keeping its first slots.

        The memory slots follow the chunk and attention is causal, so the first ``n`` slots' states
        do not depend on the slots after them: the model at ``compression_rate`` starts out producing
        exactly the first ``n`` memory vectors the trained lower-rate model produced (their running
        centre included), a warm start for training a rate-16 compressor from a rate-4 one.
        Everything else (adapters, base, tokenizer) is kept; the compressor version changes.
        """
        from dataclasses import replace

        new = replace(self.config, compression_rate=compression_rate)
        if new.n_mem > self.config.n_mem:
            raise ValueError(f"compression_rate {compression_rate} needs {new.n_mem} memory slots; this model has "
                             f"{self.config.n_mem} (rate {self.config.compression_rate}): slots can only be dropped")
        m = new.n_mem
        self.memory = MemorySlots(self.memory.weight.detach()[:m].clone()).to(self.device)
        self.memory_center = self.memory_center[:m].clone()
        self.config = new
        self.prompt = GeneratorPrompt(self.tokenizer, m, new.doc_max_tokens, new.query_max_tokens)
        self._apply_trainable()
        return self

    # -- plumbing -------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The causal LM (with LoRA layers injected in place)."""
        return self.peft.get_base_model()

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.peft.get_base_model().get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.memory.weight.device

    @property
    def memory_embeddings(self) -> nn.Parameter:
        """The memory slots' embeddings ``(M, D)`` (:class:`MemorySlots`)."""
        return self.memory.weight

    @property
    def hidden_size(self) -> int:
        return self.input_embeddings.embedding_dim

    def _decoder(self) -> nn.Module:
        base = self.base_model
        return base.get_decoder() if hasattr(base, "get_decoder") else base.base_model

    def _memory_decoder(self) -> nn.Module:
        """The decoder the compressor and query reasoner run: the whole one, or its first
        ``config.memory_layer`` layers (then its final norm).

        A shallow copy sharing every weight, rotary table and adapter with the full decoder, with a
        shorter list of layers; made per call (microseconds) so that it follows ``train()``/``eval()``
        and never changes the full decoder under a concurrent caller.
        """
        decoder = self._decoder()
        k = self.config.memory_layer
        if k is None or k == len(decoder.layers):
            return decoder
        view = copy.copy(decoder)
        view._modules = dict(decoder._modules)
        view._modules["layers"] = nn.ModuleList(list(decoder.layers)[:k])
        return view

    def set_trainable(self, adapters: Sequence[str], base: bool = False, memory_embeddings: bool = False) -> None:
        """Choose what receives gradients: some adapters, the base weights, the memory slots."""
        unknown = set(adapters) - set(ADAPTERS)
        if unknown:
            raise ValueError(f"unknown adapter(s) {sorted(unknown)}; expected {ADAPTERS}")
        self._trainable = (frozenset(adapters), base, memory_embeddings)
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        # PEFT's set_adapter flips requires_grad of the adapters; re-impose ours after every switch.
        adapters, base, mem = self._trainable
        for name, p in self.peft.named_parameters():
            if "lora_" in name:
                p.requires_grad_(any(f".{a}." in name for a in adapters))
            else:
                p.requires_grad_(base)
        self.memory_embeddings.requires_grad_(mem)

    @contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Run the block with one adapter active (``None``: the bare base model)."""
        if name is None:
            with self.peft.disable_adapter():
                yield
            return
        if name not in ADAPTERS:
            raise ValueError(f"unknown adapter {name!r}; expected one of {ADAPTERS}")
        if self._active != name:
            self.peft.set_adapter(name)
            self._active = name
            self._apply_trainable()
        yield

    def forward(self, batch: Sequence, stage: str = "scp"):
        """The training loss of one batch of examples in ``stage`` (a :class:`clara.losses.LossOutput`).

        What both training loops call, and what DeepSpeed wraps: ``engine(batch, stage=...)``.
        """
        from clara.training.stages import get_stage

        return get_stage(stage).loss(self, batch)

    def copy_adapter(self, src: str, dst: str) -> int:
        """Overwrite adapter ``dst`` with ``src``'s weights (stage 3 starts the query reasoner as a
        copy of the compressor). Returns the tensors copied."""
        from clara.training.stages import copy_adapter

        return copy_adapter(self, src, dst)

    def reset_adapter(self, name: str, seed: int = 0) -> int:
        """Re-initialise adapter ``name`` as PEFT does for a fresh one (A random, B zero: a no-op
        adapter); stage 2 starts from a fresh generator. Returns the LoRA layers reset."""
        from clara.training.stages import reset_adapter

        return reset_adapter(self, name, seed)

    def _tok(self, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)
        return [list(ids) for ids in enc["input_ids"]]

    # -- 1-2. compress chunks / encode questions -------------------------------------------
    def encode(self, texts: Sequence[str], adapter: str, max_tokens: int | None = None) -> EncoderOutput:
        """Encode texts into memory tokens with ``adapter`` (gradients flow; see :meth:`compress`).

        Each text is truncated to ``max_tokens`` tokens (default ``doc_max_tokens``), then read as
        ``[bos] text <M memory slots>``, left-padded so the memory slots end every row.
        """
        _check_texts(texts)
        m = self.config.n_mem
        ids = self._tok(texts, max_tokens or self.config.doc_max_tokens)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        rows = [bos + r for r in ids]
        t = max(len(r) for r in rows) + m
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), t), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        text_mask = torch.zeros((len(rows), t), dtype=torch.bool)
        for i, r in enumerate(rows):
            start = t - m - len(r)
            input_ids[i, start:t - m] = torch.tensor(r)
            mask[i, start:] = 1
            text_mask[i, start + len(bos):t - m] = True
        input_ids, mask, text_mask = input_ids.to(self.device), mask.to(self.device), text_mask.to(self.device)
        with self.adapter(adapter):
            emb = self.input_embeddings(input_ids[:, :-m])  # (B, T-M, D)
            mem = self.memory(len(rows), emb.dtype)  # (B, M, D)
            embeds = torch.cat([emb, mem], dim=1)  # (B, T, D)
            hidden = self._memory_decoder()(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=False
            ).last_hidden_state  # (B, T, D)
        states = hidden[:, -m:]  # (B, M, D)
        tm = text_mask.unsqueeze(-1).to(hidden.dtype)
        text_mean = (hidden * tm).sum(1) / tm.sum(1).clamp(min=1)  # (B, D)
        mse = F.mse_loss(states.float().mean(1), text_mean.float())
        if adapter == "compressor" and self.training and torch.is_grad_enabled() and self._compressor_trains():
            self._track_memory_center(states)
        return EncoderOutput(memory=self.normalise_memory(states), mse=mse)

    def _compressor_trains(self) -> bool:
        """Whether what trains now changes the compressor's states (its adapter, the memory slots or the base):
        only then does the running memory centre move, so a frozen compressor keeps its memories exactly."""
        adapters, base, mem = self._trainable
        return "compressor" in adapters or base or mem

    # -- memory normalisation ---------------------------------------------------------------
    @torch.no_grad()
    def _track_memory_center(self, states: torch.Tensor) -> None:
        """Fold a training batch's per-slot mean state ``[M, D]`` into the running centre.

        Under data parallelism the ranks' batch means are averaged first (one all-reduce of ``M x D``
        floats per step), so every rank holds the same centre and any rank's saved model is the model.
        """
        batch_mean = states.detach().float().mean(0)  # (M, D)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                torch.distributed.all_reduce(batch_mean)
                batch_mean /= world
        if int(self.memory_center_steps) == 0:
            self.memory_center.copy_(batch_mean)
        else:
            self.memory_center.lerp_(batch_mean, self.memory_center_momentum)
        self.memory_center_steps += 1

    def normalise_memory(self, states: torch.Tensor) -> torch.Tensor:
        """Raw last-layer states ``[..., M, D]`` -> the memory vectors stored, searched and read.

        ``center``: minus the running per-slot mean, then each vector rescaled to the token
        embeddings' mean norm, so the generator receives vectors of the size it was trained on.
        """
        if self.config.memory_norm == "none":
            return states
        x = states.float() - self.memory_center  # (..., M, D)
        x = x * (self.memory_scale / x.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return x.to(states.dtype)

    @torch.no_grad()
    def _encode_batched(self, texts: Sequence[str], adapter: str, batch_size: int, max_tokens: int) -> torch.Tensor:
        _check_texts(texts)
        was_training = self.training
        self.eval()
        try:
            # Sort by length so each batch pads little; restore the caller's order at the end.
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            out = torch.empty(len(texts), self.config.n_mem, self.hidden_size, dtype=self.input_embeddings.weight.dtype,
                              device=self.device)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                out[idx] = self.encode([texts[i] for i in idx], adapter, max_tokens).memory
            return out
        finally:
            self.train(was_training)

    def compress(self, chunks: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Chunks -> memory tokens ``[n, M, D]`` (compressor adapter, no gradients, eval mode)."""
        return self._encode_batched(chunks, "compressor", batch_size, self.config.doc_max_tokens)

    def encode_query(self, questions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Questions -> query memory ``[B, M, D]`` (query-reasoner adapter, no gradients)."""
        return self._encode_batched(questions, "query_reasoner", batch_size, self.config.query_max_tokens)

    # -- 3. score -------------------------------------------------------------------------
    @staticmethod
    def score(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Cosine of flattened memories. query ``[B, M, D]``; memory ``[N, M, D]`` (shared) or
        ``[B, N, M, D]`` (per question). Returns ``[B, N]`` in float32."""
        q = F.normalize(query.flatten(1).float(), dim=-1)  # (B, M*D)
        if memory.dim() == 3:
            c = F.normalize(memory.flatten(1).float(), dim=-1)  # (N, M*D)
            return q @ c.T
        c = F.normalize(memory.flatten(2).float(), dim=-1)  # (B, N, M*D)
        return torch.einsum("bf,bnf->bn", q, c)

    # -- 5. generate from memory ----------------------------------------------------------
    def build_generator_batch(
        self, questions: Sequence[str], backgrounds: Background | Sequence[Background],
        answers: Sequence[str] | None = None,
    ) -> GeneratorBatch:
        """Token layout of the generator's input (:meth:`clara.prompts.GeneratorPrompt.batch`)."""
        return self.prompt.batch(questions, backgrounds, answers)

    def generator_embeddings(self, batch: GeneratorBatch, memory: torch.Tensor | Sequence[torch.Tensor] | None):
        """Input embeddings ``[B, T, D]`` with the memory slots replaced by the memory vectors
        (:meth:`clara.prompts.GeneratorPrompt.embeddings`)."""
        return self.prompt.embeddings(self.input_embeddings, batch, memory)

    def _answer_logits(self, batch: GeneratorBatch, memory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at the answer positions only: ``(logits [n, V], targets [n], keep [B, T-1])``."""
        with self.adapter("generator"):
            embeds = self.generator_embeddings(batch, memory)
            hidden = self._decoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids, use_cache=False).last_hidden_state
            target = batch.labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
            keep = target != -100
            # The LM head only where a loss is taken: vocab x T logits would dominate memory.
            logits = self.base_model.get_output_embeddings()(hidden[:, :-1][keep])  # (n, V)
        return logits, target[keep], keep

    def generator_loss(self, batch: GeneratorBatch, memory) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy on the answer tokens; returns (loss, answer tokens).

        With ``config.content_weight`` other than 1, a weighted mean: content tokens
        (:meth:`content_mask`) count that many times.
        """
        batch = batch.to(self.device)
        logits, target, keep = self._answer_logits(batch, memory)
        w = self.config.content_weight
        if w == 1:
            return F.cross_entropy(logits.float(), target), int(target.numel())
        ce = F.cross_entropy(logits.float(), target, reduction="none")  # (n,)
        weights = 1 + (w - 1) * self.content_mask(batch.labels[:, 1:])[keep].float()
        return (ce * weights).sum() / weights.sum(), int(target.numel())

    def content_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Which of the token ids ``[B, T]`` belong to a content word: a token with a capital letter or a digit,
        and the pieces that continue such a word (no leading space, letters or digits), e.g. "Ph" + "elps".
        Ids outside the vocabulary (padding labels) are never content."""
        if getattr(self, "_content_vocab", None) is None:
            pieces = [self.tokenizer.convert_tokens_to_string([t]) for t in
                      self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))]
            self._content_vocab = (
                torch.tensor([any(ch.isupper() or ch.isdigit() for ch in p) for p in pieces]),
                torch.tensor([bool(p) and p[0].isalnum() for p in pieces]),  # continues the word before it
            )
        starts, cont = (t.to(ids.device) for t in self._content_vocab)
        valid = (ids >= 0) & (ids < len(starts))
        safe = ids.clamp(0, len(starts) - 1)
        is_start, is_cont = starts[safe] & valid, cont[safe] & valid
        out = is_start.clone()
        for t in range(1, ids.shape[1]):
            out[:, t] |= is_cont[:, t] & out[:, t - 1]
        return out

    @property
    def context_length(self) -> int | None:
        """Positions the base model was trained for (``max_position_embeddings``), if it says."""
        return getattr(self.base_model.config, "max_position_embeddings", None)

    def _room_for(self, prompt_len: int, max_new_tokens: int) -> int:
        """``max_new_tokens`` capped so that prompt + answer fit the base model's context."""
        limit = self.context_length
        if limit is None:
            return max_new_tokens
        if prompt_len >= limit:
            raise ValueError(f"the prompt takes {prompt_len} positions, the model's whole context ({limit})")
        return min(max_new_tokens, limit - prompt_len)

    @torch.no_grad()
    def _generate(self, batch: GeneratorBatch, memory, adapter: str | None, max_new_tokens: int) -> list[str]:
        """Greedy decoding with a KV cache, from input embeddings (so memory slots work)."""
        was_training = self.training
        self.eval()
        try:
            batch = batch.to(self.device)
            eos = self.tokenizer.eos_token_id
            with self.adapter(adapter):
                embeds = self.generator_embeddings(batch, memory)
                max_new_tokens = self._room_for(embeds.shape[1], max_new_tokens)
                mask, pos = batch.attention_mask, batch.position_ids
                decoder, head = self._decoder(), self.base_model.get_output_embeddings()
                out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
                done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=self.device)
                tokens = []
                for _ in range(max_new_tokens):
                    nxt = head(out.last_hidden_state[:, -1]).float().argmax(-1)  # (B,)
                    nxt = torch.where(done, torch.full_like(nxt, self.tokenizer.pad_token_id), nxt)
                    tokens.append(nxt)
                    if eos is not None:
                        done |= nxt == eos
                    if bool(done.all()):
                        break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    pos = pos[:, -1:] + 1
                    out = decoder(inputs_embeds=self.input_embeddings(nxt[:, None]), attention_mask=mask,
                                  position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
            texts = []
            for row in torch.stack(tokens, 1).tolist():
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
            return texts
        finally:
            self.train(was_training)

    def generate(self, questions: Sequence[str], memory: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Answer each question from its retrieved chunks' memory ``[B, k, M, D]``."""
        if memory.dim() != 4 or memory.shape[0] != len(questions) or memory.shape[2] != self.config.n_mem:
            raise ValueError(f"memory must be [B={len(questions)}, k, M={self.config.n_mem}, D], "
                             f"got {tuple(memory.shape)}")
        batch = self.build_generator_batch(questions, memory.shape[1])
        return self._generate(batch, memory, "generator", max_new_tokens or self.config.max_new_tokens)

    def generate_from_text(
        self, questions: Sequence[str], chunks: Sequence[Sequence[str]] | None = None,
        adapter: str | None = "generator", max_new_tokens: int | None = None,
    ) -> list[str]:
        """Plain-text RAG on the same base model (the baseline): chunks' text in the prompt.

        ``adapter=None`` runs the bare base model, without any LoRA adapter.
        """
        bgs = [list(c) for c in chunks] if chunks is not None else None
        batch = self.build_generator_batch(questions, bgs)
        return self._generate(batch, None, adapter, max_new_tokens or self.config.max_new_tokens)

    def decode_memory(self, memory: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Regenerate text from chunk memory ``[N, M, D]`` (or ``[M, D]``): inspect a latent."""
        if memory.dim() == 2:
            memory = memory.unsqueeze(0)
        n = memory.shape[0]
        return self.generate([PARAPHRASE_INSTRUCTION] * n, memory.unsqueeze(1),
                             max_new_tokens=max_new_tokens or self.config.doc_max_tokens)

    # -- identity -------------------------------------------------------------------------
    def compressor_version(self) -> str:
        """A digest of everything that determines the compressor's output.

        Stored with every index row: an index built by one compressor is never searched with, or
        mixed with, another's memory.
        """
        import json

        h = hashlib.sha256()
        h.update(json.dumps(self.config.model_dict(), sort_keys=True).encode())
        tensors = {"memory_embeddings": self.memory_embeddings}
        if self.config.memory_norm != "none":
            tensors.update(memory_center=self.memory_center, memory_scale=self.memory_scale.reshape(1))
        for name, p in self.peft.named_parameters():
            if ".compressor." in name or (self.config.train_base and "lora_" not in name):
                tensors[name] = p
        for name in sorted(tensors):
            h.update(name.encode())
            # Rounded to bf16 so the digest is the same whether the weights are held in fp32 (CPU)
            # or bf16 (GPU): one compressor, one version, on every device.
            h.update(tensors[name].detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]
