"""Answer and retrieval metrics: SQuAD-style normalisation, EM, cover-EM, token F1, Recall@k.

Every answer metric takes one prediction and one gold answer or a list of them, and scores the
best-matching gold.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Collection, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    out = [golds] if isinstance(golds, str) else list(golds)
    if not out:
        raise ValueError("at least one gold answer is needed")
    for g in out:
        if not isinstance(g, str):
            raise TypeError(f"gold answers must be strings, got {type(g).__name__}")
    return out


def exact_match(pred: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _golds(golds)))


def cover_em(pred: str, golds: str | Sequence[str]) -> float:
    """1.0 if, for some gold answer, every normalised gold token appears among the prediction's tokens.

    A gold answer with no tokens left after normalisation covers only a prediction with none either.
    """
    p = set(normalize_answer(pred).split())
    for g in _golds(golds):
        g_toks = normalize_answer(g).split()
        if (all(t in p for t in g_toks)) if g_toks else not p:
            return 1.0
    return 0.0


def _f1(pred_toks: list[str], gold_toks: list[str]) -> float:
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    common = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_toks), common / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, golds: str | Sequence[str]) -> float:
    """SQuAD token F1 (multiset overlap of normalised tokens), the maximum over the gold answers."""
    p = normalize_answer(pred).split()
    return max(_f1(p, normalize_answer(g).split()) for g in _golds(golds))


def recall_at_k(retrieved_ids: Sequence, gold_ids: Collection, k: int) -> float:
    """Fraction of the (distinct) gold ids found among the first ``k`` retrieved ids.

    Raises ``ValueError`` for an empty gold set (recall is undefined) or ``k < 1``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    gold = set(gold_ids)
    if not gold:
        raise ValueError("recall@k is undefined without gold ids")
    return len(gold.intersection(list(retrieved_ids)[:k])) / len(gold)


def summarize(preds: Sequence[str], golds: Sequence[str | Sequence[str]]) -> dict[str, float | int]:
    """Mean ``em``, ``cover_em`` and ``f1`` over paired predictions and golds, with their count ``n``."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold entries")
    n = len(preds)
    if n == 0:
        raise ValueError("nothing to summarize: no predictions")
    em = sum(exact_match(p, g) for p, g in zip(preds, golds))
    cem = sum(cover_em(p, g) for p, g in zip(preds, golds))
    f1 = sum(token_f1(p, g) for p, g in zip(preds, golds))
    return {"n": n, "em": em / n, "cover_em": cem / n, "f1": f1 / n}
