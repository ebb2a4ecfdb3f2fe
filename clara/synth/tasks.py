"""What an engine is asked and answers: tasks, requests, generations, the engine interface."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

#: Bumped whenever a prompt or a verification rule changes, so unit keys (and reruns) follow.
PROMPT_VERSION = "synth-v1"
TASK_KINDS: tuple[str, ...] = ("qa", "multihop", "paraphrase")
#: How simple QA is asked for: ``rules`` suits instruct models that follow instructions and write JSON
#: (7B and up); ``answer_first`` suits small ones (SmolLM2-135M), which copy a few-shot pattern well.
QA_STYLES: tuple[str, ...] = ("rules", "answer_first")
JUDGE_KIND = "judge"
#: A round-trip check of a QA pair: the engine answers the question from the passage(s) alone, and the pair is
#: kept only if that answer is the pair's (:func:`clara.synth.rounds.roundtrip_verdict`).
ROUNDTRIP_KIND = "roundtrip"
CHECK_KINDS: tuple[str, ...] = (JUDGE_KIND, ROUNDTRIP_KIND)


# =============================================================================================
# tasks, requests, generations


@dataclass(frozen=True)
class Task:
    """One request for generated items about one chunk (``qa``, ``paraphrase``) or a chunk pair (``multihop``).

    ``known`` are items accepted in earlier rounds (questions or paraphrases) that must not be repeated;
    ``focus`` the sentences no accepted question covers yet. A ``judge`` or ``roundtrip`` task carries the
    ``item`` to check and the ``parent`` task key.
    """

    kind: str
    chunk_ids: tuple[str, ...]
    chunks: tuple[str, ...]
    unit: str = ""
    round: int = 0
    n_items: int = 1
    known: tuple[str, ...] = ()
    focus: tuple[str, ...] = ()
    item: Mapping[str, Any] | None = None
    parent: str = ""
    #: ``qa`` only: ``rules`` (the instructions and JSON reply of :func:`task_messages`) or ``answer_first``
    #: (:func:`answer_first_prompt`: a span of the chunk is the answer, the model writes its question).
    style: str = "rules"

    def __post_init__(self) -> None:
        if self.style not in QA_STYLES:
            raise ValueError(f"task style must be one of {QA_STYLES}, got {self.style!r}")
        if self.kind not in TASK_KINDS + CHECK_KINDS:
            raise ValueError(f"task kind must be one of {TASK_KINDS + CHECK_KINDS}, got {self.kind!r}")
        if len(self.chunk_ids) != len(self.chunks) or not self.chunks:
            raise ValueError("a task needs one chunk id per chunk text, and at least one chunk")
        if self.kind == "multihop" and len(self.chunks) != 2:
            raise ValueError(f"a multihop task needs exactly two chunks, got {len(self.chunks)}")

    @property
    def key(self) -> str:
        """Identity across rounds: the kind and the chunks (plus the judged item for a judge task)."""
        base = f"{self.kind}:{'|'.join(self.chunk_ids)}"
        if self.kind in CHECK_KINDS:
            base += f"#{self.parent}#{json.dumps(self.item, sort_keys=True)}"
        return base

    def to_json(self) -> str:
        d = asdict(self)
        d["item"] = dict(self.item) if self.item is not None else None
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str | bytes) -> Task:
        d = json.loads(s)
        for k in ("chunk_ids", "chunks", "known", "focus"):
            d[k] = tuple(d.get(k) or ())
        return cls(**d)


@dataclass(frozen=True)
class GenerationRequest:
    """What an engine is asked: the rendered ``prompt`` of ``task`` and its sampling parameters.

    ``json_schema`` (a JSON string) constrains decoding where the engine supports it (vLLM).
    """

    task: Task
    prompt: str
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    json_schema: str | None = None


@dataclass(frozen=True)
class Generation:
    """An engine's answer to one request; ``error`` is set (and ``text`` empty) when generation failed."""

    text: str
    num_generated_tokens: int = 0
    num_input_tokens: int = 0
    error: str | None = None


class SynthEngine(Protocol):
    """What the job needs of an engine. ``kinds``: the task kinds it can serve; ``regenerates``: whether
    asking again can give a different answer (a deterministic engine gets one round only)."""

    name: str
    kinds: frozenset[str]
    regenerates: bool

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...


