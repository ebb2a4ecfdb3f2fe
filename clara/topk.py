"""The straight-through differentiable top-k that lets the generator's loss reach the query reasoner.

Forward: the exact hard top-k (one-hot rows). Backward: the gradient of a masked softmax over the
scores, taken k times, each time masking the items already chosen. No noise (unlike Gumbel top-k):
retrieval at training time is the same as at serving time.
"""

from __future__ import annotations

import torch


def differentiable_topk(scores: torch.Tensor, k: int, temperature: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the top ``k`` of ``scores`` with a straight-through estimator.

    Args:
        scores: ``[B, N]`` retrieval scores (any dtype; computed in float32).
        k: items to select, ``1 <= k <= N``.
        temperature: softmax temperature of the backward relaxation.

    Returns:
        ``selection``: ``[B, k, N]``; forward values are exact one-hot rows of the top-k in
        descending score order, gradients are those of the masked softmaxes.
        ``indices``: ``[B, k]`` long, the selected items.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of candidates ({n})")
    logits = scores.float() / temperature  # (B, N)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    hard_rows, soft_rows, picked = [], [], []
    for _ in range(k):
        masked = logits.masked_fill(mask, float("-inf"))
        soft = torch.softmax(masked, dim=-1)  # (B, N)
        idx = masked.argmax(dim=-1)  # (B,)
        hard = torch.nn.functional.one_hot(idx, n).to(soft.dtype)
        hard_rows.append(hard)
        soft_rows.append(soft)
        picked.append(idx)
        mask = mask | hard.bool()
    hard = torch.stack(hard_rows, dim=1)  # (B, k, N)
    soft = torch.stack(soft_rows, dim=1)  # (B, k, N)
    # Straight-through: value of `hard`, gradient of `soft`.
    selection = hard + (soft - soft.detach())
    return selection, torch.stack(picked, dim=1)


def select(selection: torch.Tensor, candidates: torch.Tensor, shared: bool | None = None) -> torch.Tensor:
    """Apply a ``[B, k, N]`` selection to candidates.

    ``candidates`` is ``[B, N, ...]`` (each question its own candidates) or ``[N, ...]`` (one
    candidate set shared by the batch); ``shared=None`` infers which from the shape, preferring
    per-question. Returns ``[B, k, ...]``: in the forward pass exactly the selected candidates.
    """
    b, k, n = selection.shape
    if shared is None:
        shared = not (candidates.dim() >= 2 and candidates.shape[0] == b and candidates.shape[1] == n)
    sel = selection.to(candidates.dtype)
    if shared:
        if candidates.shape[0] != n:
            raise ValueError(f"shared candidates of shape {tuple(candidates.shape)} do not have {n} items")
        flat = candidates.reshape(n, -1)  # (N, F)
        return torch.einsum("bkn,nf->bkf", sel, flat).reshape(b, k, *candidates.shape[1:])
    if candidates.dim() < 2 or candidates.shape[:2] != (b, n):
        raise ValueError(f"candidates of shape {tuple(candidates.shape)} are not [B={b}, N={n}, ...]")
    flat = candidates.reshape(b, n, -1)  # (B, N, F)
    return torch.bmm(sel, flat).reshape(b, k, *candidates.shape[2:])
