"""One generation -> accepted items and rejects; a task's state across regeneration rounds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from clara.synth.parse import _scalar_text, coerce_paraphrases, coerce_qa_items, extract_json
from clara.synth.prompts import answer_first_target, json_schema, question_fits_answer
from clara.synth.tasks import JUDGE_KIND, ROUNDTRIP_KIND, Generation, GenerationRequest, Task
from clara.synth.text import fact_sentences
from clara.synth.verify import (
    DEFAULT_VERIFY,
    VerifySettings,
    coverage,
    is_duplicate_paraphrase,
    is_duplicate_qa,
    verify_paraphrase,
    verify_qa,
)

# =============================================================================================
# one generation -> accepted items and rejects


@dataclass
class Outcome:
    """What one generation gave: lexically verified ``items`` and ``rejects`` (each with a ``reason``).

    ``declined`` marks a multi-hop reply that says the passages support no such question.
    """

    task_key: str
    kind: str
    round: int
    items: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    parsed: str = ""
    declined: bool = False
    num_generated_tokens: int = 0
    num_input_tokens: int = 0
    judge: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str | bytes) -> Outcome:
        return cls(**json.loads(s))


def _excerpt(text: str, n: int = 400) -> str:
    text = text or ""
    return text if len(text) <= n else text[:n] + "..."


def process_generation(task: Task, gen: Generation, v: VerifySettings = DEFAULT_VERIFY) -> Outcome:
    """Parse ``gen`` as the reply to ``task`` and verify each item against the task's chunk(s)."""
    out = Outcome(task.key, task.kind, task.round, num_generated_tokens=int(gen.num_generated_tokens or 0),
                  num_input_tokens=int(gen.num_input_tokens or 0))
    if gen.error:
        out.rejects.append({"reason": "engine_error", "detail": _excerpt(str(gen.error), 300)})
        return out
    if task.kind == "qa" and task.style == "answer_first":
        return _answer_first_outcome(task, gen, out, v)
    if task.kind == ROUNDTRIP_KIND:
        out.parsed = "plain_text"
        out.judge = roundtrip_verdict(gen.text, str((task.item or {}).get("answer", "")))
        return out
    expect = {"qa": ("qa",), "multihop": ("qa",), "paraphrase": ("paraphrases",), JUDGE_KIND: ("supported",)}
    value, how = extract_json(gen.text, expect[task.kind])
    out.parsed = how
    if task.kind == JUDGE_KIND:
        supported = value.get("supported") if isinstance(value, dict) else None
        if isinstance(supported, str):
            supported = {"true": True, "yes": True, "false": False, "no": False}.get(supported.strip().lower())
        out.judge = {"supported": supported if isinstance(supported, bool) else None,
                     "reason": _scalar_text(value.get("reason")) if isinstance(value, dict) else None}
        return out
    if value is None:
        if task.kind == "paraphrase" and how == "no_json" and len(gen.text.split()) >= 5:
            value, out.parsed = {"paraphrases": [gen.text.strip()]}, "plain_text"
        else:
            out.rejects.append({"reason": how, "raw": _excerpt(gen.text)})
            return out
    if task.kind == "paraphrase":
        texts, rejects = coerce_paraphrases(value)
        out.rejects.extend(rejects)
        if not texts and not rejects:
            out.rejects.append({"reason": "truncated_output" if how == "repaired" else "no_items",
                                "raw": _excerpt(gen.text)})
        for t in texts:
            reason = verify_paraphrase(t, task.chunks[0], v)
            if reason:
                out.rejects.append({"reason": reason, "item": {"text": t}})
            else:
                out.items.append({"text": t})
        return out
    items, rejects = coerce_qa_items(value, with_bridge=task.kind == "multihop")
    out.rejects.extend(rejects)
    if not items and not rejects:
        if task.kind == "multihop" and how != "repaired":  # an explicit {"qa": []}: the pair supports none
            out.declined = True
        else:
            out.rejects.append({"reason": "truncated_output" if how == "repaired" else "no_items",
                                "raw": _excerpt(gen.text)})
    for it in items:
        reason = verify_qa(it["question"], it["answer"], task.chunks, v, multihop=task.kind == "multihop")
        if reason:
            out.rejects.append({"reason": reason, "item": it})
        else:
            out.items.append(it)
    return out


def roundtrip_verdict(reply: str, answer: str, min_f1: float = 0.5) -> dict[str, Any]:
    """Does the engine's answer (the first line of ``reply``) give the pair's ``answer`` back? ``supported``
    when it contains the answer (normalised as for cover-EM) or reaches token F1 >= ``min_f1`` with it: a
    question that does not lead back to its answer from the passage is ambiguous, off the passage, or asks
    for something else ("What is the polar vortex?" for the answer "Earth's")."""
    from clara.eval.metrics import cover_em, token_f1

    line = next((ln.strip() for ln in (reply or "").splitlines() if ln.strip()), "")
    if not line:
        return {"supported": None, "reason": "no answer read back"}
    ok = bool(cover_em(line, answer)) or token_f1(line, answer) >= min_f1
    return {"supported": ok, "reason": f"read back {_excerpt(line, 120)!r}"}


def _answer_first_outcome(task: Task, gen: Generation, out: Outcome, v: VerifySettings) -> Outcome:
    target = answer_first_target(task)
    lines = [ln.strip() for ln in (gen.text or "").strip().splitlines() if ln.strip()]
    out.parsed = "plain_text"
    if target is None:
        out.declined = True  # nothing in the chunk to ask about
        return out
    if not lines:
        out.rejects.append({"reason": "no_items", "raw": _excerpt(gen.text)})
        return out
    item = {"question": lines[0], "answer": target[1]}
    reason = verify_qa(item["question"], item["answer"], task.chunks, v)
    if reason is None and not question_fits_answer(item["question"], item["answer"]):
        reason = "question_does_not_fit_answer"
    if reason:
        out.rejects.append({"reason": reason, "item": item})
    else:
        out.items.append(item)
    return out


# =============================================================================================
# per-task state across rounds


@dataclass
class RoundSettings:
    """What a task must reach before it stops being regenerated."""

    max_rounds: int = 3
    min_coverage: float = 0.8  # qa: share of fact sentences covered
    min_qa: int = 3
    max_qa: int = 15
    paraphrases: int = 1
    multihop_per_pair: int = 1

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be in [0, 1], got {self.min_coverage}")
        if not 1 <= self.min_qa <= self.max_qa:
            raise ValueError(f"need 1 <= min_qa <= max_qa, got {self.min_qa}, {self.max_qa}")


class TaskState:
    """A task's accepted items and rejects over its rounds; decides whether to ask again."""

    def __init__(self, task: Task):
        self.task = task
        self.items: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.rounds = 0
        self.declined = False
        self.num_generated_tokens = 0
        self.num_input_tokens = 0

    def absorb(self, outcome: Outcome) -> None:
        """Add one round's outcome; duplicates of accepted items become ``duplicate`` rejects."""
        self.rounds += 1
        self.num_generated_tokens += outcome.num_generated_tokens
        self.num_input_tokens += outcome.num_input_tokens
        self.declined = self.declined or outcome.declined
        tag = {"kind": self.task.kind, "chunk_ids": list(self.task.chunk_ids), "round": outcome.round}
        self.rejects.extend({**tag, **r} for r in outcome.rejects)
        for it in outcome.items:
            if self.task.kind == "paraphrase":
                dup = is_duplicate_paraphrase(it["text"], [x["text"] for x in self.items])
            else:
                dup = is_duplicate_qa(it, self.items)
            if dup:
                self.rejects.append({**tag, "reason": "duplicate", "item": it})
            else:
                self.items.append(it)

    def reject_item(self, item: Mapping[str, Any], reason: str, detail: str | None = None) -> None:
        """Move an accepted ``item`` to the rejects (a judge said no)."""
        for i, it in enumerate(self.items):
            if it == item:
                del self.items[i]
                break
        r = {"kind": self.task.kind, "chunk_ids": list(self.task.chunk_ids), "round": self.rounds - 1,
             "reason": reason, "item": dict(item)}
        if detail:
            r["detail"] = detail
        self.rejects.append(r)

    def missing(self, s: RoundSettings) -> list[str]:
        """qa: the fact sentences no accepted pair covers (when coverage is short of the target)."""
        if self.task.kind != "qa":
            return []
        cov, missing = coverage(self.task.chunks[0], self.items)
        return missing if cov < s.min_coverage else []

    def satisfied(self, s: RoundSettings) -> bool:
        k = self.task.kind
        if k == "qa":
            return len(self.items) >= min(s.min_qa, max(1, len(fact_sentences(self.task.chunks[0])))) \
                and not self.missing(s)
        if k == "paraphrase":
            return len(self.items) >= s.paraphrases
        return self.declined or len(self.items) >= s.multihop_per_pair

    def needs_round(self, s: RoundSettings) -> bool:
        if self.task.style == "answer_first" and (self.declined or answer_first_target(self.next_task(s)) is None):
            return False
        return self.rounds < s.max_rounds and not self.satisfied(s)

    def next_task(self, s: RoundSettings) -> Task:
        """The task of the next round: what is already accepted, and (qa) the uncovered sentences."""
        t = self.task
        known = tuple(it["question"] if "question" in it else it["text"] for it in self.items)
        if t.kind == "paraphrase":
            n = max(1, s.paraphrases - len(self.items))
        elif t.kind == "multihop":
            n = max(1, s.multihop_per_pair - len(self.items))
        else:
            n = t.n_items
        focus = tuple(self.missing(s)) if t.kind == "qa" else ()
        return Task(t.kind, t.chunk_ids, t.chunks, t.unit, self.rounds, n, known, focus, style=t.style)


def request_for(task: Task, prompt: str, *, max_tokens: int, temperature: float, top_p: float, seed: int,
                structured: bool, max_qa: int = 15) -> GenerationRequest:
    """A request for ``task``: later rounds sample hotter and with their own seed, so they differ."""
    digest = int(hashlib.sha256(f"{seed}:{task.key}:{task.round}".encode()).hexdigest()[:8], 16)
    temp = temperature if task.round == 0 else min(1.0, max(temperature, 0.3) + 0.2 * task.round)
    if task.kind == ROUNDTRIP_KIND:  # a reading, not a writing: greedy, whatever the round
        temp = 0.0
    limit = {"qa": max_qa, "multihop": max(1, task.n_items), "paraphrase": max(1, task.n_items)}.get(task.kind)
    schema = json.dumps(json_schema(task.kind, limit)) if structured else None
    return GenerationRequest(task, prompt, max_tokens, temp, top_p, digest & 0x7FFFFFFF, schema)


def judge_tasks(state: TaskState, items: Sequence[Mapping[str, Any]], kind: str = JUDGE_KIND) -> list[Task]:
    """One ``kind`` task (``judge``, or ``roundtrip`` for QA pairs) per newly accepted item of ``state``."""
    t = state.task
    return [Task(kind, t.chunk_ids, t.chunks, t.unit, state.rounds - 1, 1, item=dict(it), parent=t.key)
            for it in items]


