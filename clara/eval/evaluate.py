"""Evaluation: compressed (memory tokens) vs plain-text RAG vs closed-book, on the same backbone.

Input: stage-2/3-style examples (a question, its candidate chunks, the gold chunks' positions,
an answer). For every example the query reasoner ranks the candidates (cosine of flattened
memories, as served); Recall@k of the gold chunks is measured on that ranking. Then, per mode:

* ``compressed``: the generator reads the top-k chunks' memory tokens;
* ``text``: the generator reads the same top-k chunks as text (plain-text RAG, same base model);
* ``closed_book``: the generator gets the question alone;

and per setting:

* ``normal``: the retrieved top-k;
* ``oracle``: the top-k with the gold chunk put in (replacing the lowest-ranked non-gold one) when
  retrieval missed it.

Answers are scored with SQuAD-normalised EM, cover-EM and token F1 (:mod:`clara.eval.metrics`).
:func:`evaluate_examples` returns one row per example and mode/setting, so a distributed run (Ray
Data, in ``pipelines.evaluate``) evaluates shards and :func:`aggregate` merges them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from clara.data.records import Example
from clara.eval.metrics import cover_em, exact_match, token_f1

MODES: tuple[str, ...] = ("compressed", "text", "closed_book")
SETTINGS: tuple[str, ...] = ("normal", "oracle")

#: A ranking function: (questions, candidates per question) -> scores per question, one per candidate.
Ranker = Callable[[Sequence[str], Sequence[Sequence[str]]], list[list[float]]]


@dataclass
class EvalSettings:
    """What one evaluation measures."""

    #: How the generator is given the chunks: compressed (memory), text, closed_book (none).
    modes: tuple[str, ...] = MODES
    #: normal (the query reasoner's retrieval) and/or oracle (the gold chunks included).
    settings: tuple[str, ...] = SETTINGS
    #: Chunks the generator reads.
    top_k: int = 5
    #: Recall@k cut-offs of the retrieval.
    recall_ks: tuple[int, ...] = (1, 3, 5)
    #: Longest answer generated.
    max_new_tokens: int = 32
    #: Questions per model call (and per Ray Data batch).
    batch_size: int = 16
    #: How the candidates are ranked: latent (the query reasoner) or hybrid (latent and BM25 over the
    #: candidates, fused by reciprocal rank as the served hybrid retrieval fuses them).
    retrieval: Literal["latent", "hybrid"] = "latent"
    #: hybrid: weight of BM25's rank term.
    text_weight: float = 1.0

    def __post_init__(self) -> None:
        self.modes, self.settings = tuple(self.modes), tuple(self.settings)
        self.recall_ks = tuple(self.recall_ks)
        bad = [m for m in self.modes if m not in MODES] + [s for s in self.settings if s not in SETTINGS]
        if bad:
            raise ValueError(f"unknown mode/setting {bad}; modes are {MODES}, settings {SETTINGS}")
        if self.top_k <= 0 or self.batch_size <= 0 or any(k <= 0 for k in self.recall_ks):
            raise ValueError("top_k, batch_size and recall_ks must be positive")
        if self.retrieval not in ("latent", "hybrid") or self.text_weight < 0:
            raise ValueError(f"retrieval must be latent or hybrid and text_weight >= 0, got {self.retrieval!r}, "
                             f"{self.text_weight}")


def hybrid_scores(questions: Sequence[str], candidates: Sequence[Sequence[str]],
                  latent: Sequence[Sequence[float]], text_weight: float = 1.0) -> list[list[float]]:
    """Each question's latent scores fused with BM25 over its candidates (a candidate sharing no term
    with the question gets no BM25 term), by :func:`clara.index.store.reciprocal_rank_fusion`."""
    import numpy as np

    from clara.data.derive import BM25
    from clara.index.store import reciprocal_rank_fusion

    out = []
    for q, cands, lat in zip(questions, candidates, latent):
        bm25 = BM25(list(cands)).scores(q)
        text = np.array([bm25[j] if bm25.get(j, 0.0) > 0 else np.nan for j in range(len(cands))])
        out.append(reciprocal_rank_fusion(np.asarray(lat), text, text_weight).tolist())
    return out


def _topk(scores: Sequence[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]


def _with_gold(ranked: list[int], gold: Sequence[int]) -> list[int]:
    if any(g in ranked for g in gold):
        return ranked
    return ranked[:-1] + [gold[0]]


def evaluate_examples(model, examples: Sequence[Example], settings: EvalSettings | None = None,
                      ranker: Ranker | None = None) -> list[dict]:
    """Evaluate ``examples``; one row per (example, mode, setting) plus one retrieval row each.

    Rows: ``{"kind": "answer", "mode", "setting", "question", "prediction", "answer", "em",
    "cover_em", "f1"}`` and ``{"kind": "retrieval", "question", "recall@k": ...}``.
    """
    s = settings or EvalSettings()
    rows: list[dict] = []
    for start in range(0, len(examples), s.batch_size):
        batch = list(examples[start:start + s.batch_size])
        questions = [ex.question for ex in batch]
        unique = list(dict.fromkeys(c for ex in batch for c in ex.chunks))
        pos = {c: i for i, c in enumerate(unique)}
        memory = model.compress(unique)  # (U, M, D): compressed once, used to rank and to answer
        if ranker is None:
            query = model.encode_query(questions)  # (B, M, D)
            scores = [model.score(query[i:i + 1], memory[[pos[c] for c in ex.chunks]])[0].tolist()
                      for i, ex in enumerate(batch)]
            if s.retrieval == "hybrid":
                scores = hybrid_scores(questions, [list(ex.chunks) for ex in batch], scores, s.text_weight)
        else:
            scores = ranker(questions, [list(ex.chunks) for ex in batch])
        ranked = [_topk(sc, len(sc)) for sc in scores]
        for ex, r in zip(batch, ranked):
            row = {"kind": "retrieval", "question": ex.question}
            for k in s.recall_ks:
                row[f"recall@{k}"] = len(set(r[:k]) & set(ex.gold)) / len(set(ex.gold))
            rows.append(row)
        k = min([s.top_k] + [len(ex.chunks) for ex in batch])
        picks = {"normal": [r[:k] for r in ranked],
                 "oracle": [_with_gold(r[:k], ex.gold) for r, ex in zip(ranked, batch)]}
        for mode in s.modes:
            for setting in (s.settings if mode != "closed_book" else ("normal",)):
                chosen = picks[setting]
                if mode == "compressed":
                    idx = torch.tensor([[pos[ex.chunks[j]] for j in c] for ex, c in zip(batch, chosen)])
                    preds = model.generate(questions, memory[idx], max_new_tokens=s.max_new_tokens)
                elif mode == "text":
                    preds = model.generate_from_text(questions, [[ex.chunks[j] for j in c] for ex, c in
                                                                 zip(batch, chosen)], max_new_tokens=s.max_new_tokens)
                else:
                    preds = model.generate_from_text(questions, None, max_new_tokens=s.max_new_tokens)
                for ex, p in zip(batch, preds):
                    rows.append({"kind": "answer", "mode": mode, "setting": setting, "question": ex.question,
                                 "prediction": p, "answer": ex.answer, "em": exact_match(p, ex.answer),
                                 "cover_em": cover_em(p, ex.answer), "f1": token_f1(p, ex.answer)})
    return rows


@dataclass
class EvalReport:
    """Mean figures (in %, like the paper) keyed ``answers[mode][setting][metric]``."""

    answers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    retrieval: dict[str, float] = field(default_factory=dict)
    n: int = 0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        lines = ["| mode | setting | cover-EM | EM | F1 |", "|---|---|---|---|---|"]
        for mode, by_setting in self.answers.items():
            for setting, m in by_setting.items():
                lines.append(f"| {mode} | {setting} | {m['cover_em']:.2f} | {m['em']:.2f} | {m['f1']:.2f} |")
        if self.retrieval:
            lines += ["", "| retrieval | " + " | ".join(self.retrieval) + " |",
                      "|---|" + "---|" * len(self.retrieval),
                      "| query reasoner | " + " | ".join(f"{v:.2f}" for v in self.retrieval.values()) + " |"]
        return "\n".join(lines) + f"\n\n{self.n} questions.\n"


def aggregate(rows: Sequence[dict], meta: dict | None = None) -> EvalReport:
    """Merge per-example rows (from one process or many shards) into mean figures in %."""
    report = EvalReport(meta=dict(meta or {}))
    sums: dict[tuple[str, str], dict[str, float]] = {}
    counts: dict[tuple[str, str], int] = {}
    rec: dict[str, float] = {}
    n_ret = 0
    for r in rows:
        if r["kind"] == "retrieval":
            n_ret += 1
            for key, v in r.items():
                if key.startswith("recall@"):
                    rec[key] = rec.get(key, 0.0) + v
            continue
        key = (r["mode"], r["setting"])
        acc = sums.setdefault(key, {"cover_em": 0.0, "em": 0.0, "f1": 0.0})
        for m in acc:
            acc[m] += r[m]
        counts[key] = counts.get(key, 0) + 1
    for (mode, setting), acc in sums.items():
        report.answers.setdefault(mode, {})[setting] = {m: 100 * v / counts[(mode, setting)] for m, v in acc.items()}
    report.retrieval = {k: 100 * v / n_ret for k, v in sorted(rec.items(), key=lambda kv: int(kv[0][7:]))}
    report.n = n_ret
    return report


def write_report(reports: dict[str, EvalReport], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and PNG plots for one or more evaluated models.

    ``reports`` maps a label (e.g. ``"rate 16"``) to its report; models that carry a
    ``compression_rate`` in ``meta`` are plotted as accuracy against compression rate.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2) + "\n")
    paths["markdown"].write_text("\n".join(f"## {k}\n\n{r.markdown()}" for k, r in reports.items()))

    try:
        import matplotlib
    except ImportError:  # the plots are the `plots` extra; the tables above are written without it
        return paths
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rated = sorted(((r.meta.get("compression_rate"), k, r) for k, r in reports.items()
                    if r.meta.get("compression_rate")), key=lambda t: t[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    if rated:
        rates = [t[0] for t in rated]
        for mode, style in (("compressed", "o-"), ("text", "s--"), ("closed_book", "x:")):
            for setting in SETTINGS:
                ys = [t[2].answers.get(mode, {}).get(setting, {}).get("cover_em") for t in rated]
                if all(y is not None for y in ys):
                    ax.plot(rates, ys, style, label=f"{mode} ({setting})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression rate (chunk tokens per memory token)")
    else:
        labels = list(reports)
        for i, mode in enumerate(MODES):
            ys = [reports[k].answers.get(mode, {}).get("normal", {}).get("cover_em", 0.0) for k in labels]
            ax.bar([x + 0.25 * i for x in range(len(labels))], ys, width=0.25, label=mode)
        ax.set_xticks([x + 0.25 for x in range(len(labels))], labels)
    ax.set_ylabel("cover-EM (%)")
    ax.set_title("Answer accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["accuracy_plot"] = out / "accuracy_vs_rate.png"
    fig.savefig(paths["accuracy_plot"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, r) in enumerate(reports.items()):
        ks = list(r.retrieval)
        ax.bar([x + 0.8 / max(1, len(reports)) * i for x in range(len(ks))], list(r.retrieval.values()),
               width=0.8 / max(1, len(reports)), label=label)
    if reports:
        ks = list(next(iter(reports.values())).retrieval)
        ax.set_xticks(range(len(ks)), ks)
    ax.set_ylabel("recall of the gold chunk (%)")
    ax.set_title("Retrieval: Recall@k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["recall_plot"] = out / "recall_at_k.png"
    fig.savefig(paths["recall_plot"], dpi=120)
    plt.close(fig)
    return paths
