"""The losses of the three training stages.

* Stages 1 and 2 (:func:`compression_loss`): compressor and generator trained together;
  cross-entropy on the target + ``mse_weight`` x MSE between the mean memory-token state and the
  mean chunk-token state (keeps the memory in the space of the chunk's own states).
* Stage 3 (:func:`e2e_loss`): compressor frozen; the question is encoded by the query reasoner,
  candidates are scored and the top-k picked by the straight-through estimator, so the answer's
  cross-entropy reaches the query reasoner through the selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from clara.data.records import Example
from clara.topk import differentiable_topk, select


@dataclass
class LossOutput:
    loss: torch.Tensor
    ce: float
    mse: float
    tokens: int  # answer tokens the cross-entropy was taken over
    metrics: dict[str, float] = field(default_factory=dict)


def compression_loss(model, examples: Sequence[Example]) -> LossOutput:
    """Stage 1 / 2: each example's chunks are compressed (with gradients) and read as memory."""
    chunks = [c for ex in examples for c in ex.chunks]
    enc = model.encode(chunks, "compressor")  # memory (C, M, D)
    memory, start = [], 0
    for ex in examples:
        memory.append(enc.memory[start:start + len(ex.chunks)])  # (k_i, M, D)
        start += len(ex.chunks)
    batch = model.build_generator_batch([ex.question for ex in examples], [len(ex.chunks) for ex in examples],
                                        [ex.answer for ex in examples])
    ce, tokens = model.generator_loss(batch, memory)
    loss = ce + model.config.mse_weight * enc.mse
    spread = memory_spread(enc.memory, chunks)
    return LossOutput(loss, float(ce.detach()), float(enc.mse.detach()), tokens,
                      {} if spread is None else {"memory_spread": spread})


def memory_spread(memory: torch.Tensor, chunks: Sequence[str]) -> float | None:
    """How different a batch's memories are: 1 - the mean pairwise cosine between the flattened memories
    ``[C, M, D]`` of its distinct chunks (None with fewer than two).

    Near 0 when the compressor writes the same memory for every chunk, a collapse the loss does not show
    (the generator then answers from its own weights: measured on SmolLM2 with memory from layer 15,
    where it fell to ~0.02); a compressor that carries its chunks keeps it well above that.
    """
    first: dict[str, int] = {}
    for i, c in enumerate(chunks):
        first.setdefault(c, i)
    if len(first) < 2:
        return None
    x = torch.nn.functional.normalize(memory.detach()[list(first.values())].float().flatten(1), dim=-1)
    n = x.shape[0]
    return float(1 - ((x @ x.T).sum() - n) / (n * n - n))


def text_rag_loss(model, examples: Sequence[Example]) -> LossOutput:
    """The plain-text RAG baseline's loss: the generator reads the chunks' text, not their memory."""
    batch = model.build_generator_batch([ex.question for ex in examples], [list(ex.chunks) for ex in examples],
                                        [ex.answer for ex in examples])
    ce, tokens = model.generator_loss(batch, None)
    return LossOutput(ce, float(ce.detach()), 0.0, tokens)


def e2e_loss(model, examples: Sequence[Example], k: int | None = None) -> LossOutput:
    """Stage 3: retrieve the top-k of each example's candidates, differentiably, then answer."""
    k = k or model.config.top_k
    with torch.no_grad():  # the compressor is frozen in stage 3
        cand = model.encode([c for ex in examples for c in ex.chunks], "compressor").memory.detach()  # (C, M, D)
    query = model.encode([ex.question for ex in examples], "query_reasoner",
                         model.config.query_max_tokens).memory  # (B, M, D)
    picked, hits, start = [], 0.0, 0
    kk = min(k, min(len(ex.chunks) for ex in examples))
    for i, ex in enumerate(examples):
        cands = cand[start:start + len(ex.chunks)]  # (N_i, M, D)
        start += len(ex.chunks)
        scores = model.score(query[i:i + 1], cands)  # (1, N_i)
        sel, idx = differentiable_topk(scores, kk, model.config.topk_temperature)  # (1, k, N_i)
        picked.append(select(sel, cands, shared=True)[0])  # (k, M, D)
        hits += len(set(idx[0].tolist()) & set(ex.gold)) / len(ex.gold)
    memory = torch.stack(picked)  # (B, k, M, D)
    batch = model.build_generator_batch([ex.question for ex in examples], kk, [ex.answer for ex in examples])
    ce, tokens = model.generator_loss(batch, memory)
    return LossOutput(ce, float(ce.detach()), 0.0, tokens, {f"recall@{kk}": hits / len(examples)})
