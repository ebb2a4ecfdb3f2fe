"""Synthesis of stage-1 (SCP) training data, the library half: prompts, parsing, verification, engines.

The Ray job (:mod:`pipelines.synth`) is a thin shell over this module. For every chunk it asks an
engine for

- ``qa``: simple question-answer pairs that together cover every fact of the chunk;
- ``multihop``: questions that need two related chunks (paired by :func:`pair_chunks`: shared
  entities, else shared rare words);
- ``paraphrase``: rewrites of the chunk that keep every fact.

Each engine output goes through :func:`process_generation`: :func:`extract_json` (JSON inside prose
or a code fence, truncated JSON, trailing commas), the items are coerced (missing fields become
rejects), and each item is verified lexically against its chunk(s) (:func:`verify_qa`,
:func:`verify_paraphrase`). The driver keeps a :class:`TaskState` per task: it removes duplicates,
measures which facts the accepted questions cover, and builds the next round's task (a new seed and
the list of still uncovered sentences) until the task is satisfied or the rounds run out.

Engines share one interface (:class:`SynthEngine`): a batch of :class:`GenerationRequest` in, one
:class:`Generation` each out. :class:`TransformersEngine` runs any causal LM in-process;
:class:`ClozeEngine` is rule-based (a named entity, number or date masked in the chunk's own
sentences) for machines without a usable LLM, and writes its questions in the same JSON an LLM is
asked for, so the same parser and verifier apply. The vLLM engine lives in the Ray job, behind
``ray.data.llm``, producing the same generation columns.

Work is grouped into :class:`WorkUnit` s whose key is derived from their content and the settings; a
unit's output is one file written atomically (:func:`write_unit_file`), so a rerun after a crash
skips finished units and every chunk's records appear exactly once.

This module never imports ``ray``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clara.metrics import normalize_answer
from clara.records import RecordError, parse_record

#: Bumped whenever a prompt or a verification rule changes, so unit keys (and reruns) follow.
PROMPT_VERSION = "synth-v1"
TASK_KINDS: tuple[str, ...] = ("qa", "multihop", "paraphrase")
#: How simple QA is asked for: ``rules`` suits instruct models that follow instructions and write JSON
#: (7B and up); ``answer_first`` suits small ones (SmolLM2-135M), which copy a few-shot pattern well.
QA_STYLES: tuple[str, ...] = ("rules", "answer_first")
JUDGE_KIND = "judge"

# =============================================================================================
# text utilities

_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having he
    her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
    now of off on once only or other our ours ourselves out over own same she should so some such than that the
    their theirs them themselves then there these they this those through to too under until up very was we were
    what when where which while who whom whose why will with would you your yours yourself yourselves
    one ones many much may might must shall also s t""".split()
)
_QUESTION_WORDS = frozenset(
    "who whom whose what which when where why how is are was were do does did can could will would has have had "
    "should name list in on at according".split()
)
_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December|"
           "Jan\\.|Feb\\.|Mar\\.|Apr\\.|Jun\\.|Jul\\.|Aug\\.|Sep\\.|Sept\\.|Oct\\.|Nov\\.|Dec\\.")
_DATE_RES = (
    re.compile(rf"\b(?:\d{{1,2}}\s+)?(?:{_MONTHS})\s+(?:\d{{1,2}},?\s+)?\d{{3,4}}\b"),  # 12 March 1999, March 12, 1999
    re.compile(rf"\b(?:{_MONTHS})\s+\d{{1,2}}\b"),  # March 12
    re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})s?\b"),  # 1999, 1990s
)
_NUMBER_RE = re.compile(
    r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:\s?(?:%|percent|per cent|million|billion|trillion|thousand|hundred))?(?![\w])"
)
_WORD_RE = re.compile(r"[^\W_][\w'’\-]*")
_ABBREV = frozenset("mr mrs ms dr prof st jr sr no vs etc inc ltd co corp mt ft gen col lt sgt rev fr".split())
_ENTITY_CONNECTORS = frozenset("of the de da di del della von van der la le du and for y".split())
_BLANK = "_____"


_TOKEN_RE = re.compile(r"[^\W_]+")


def word_tokens(text: str) -> list[str]:
    """Lowercased runs of letters and digits: any punctuation (hyphens, dashes, apostrophes) splits, so
    ``under-15`` holds ``15`` and ``12–13 October`` holds ``13`` on both sides of a comparison."""
    return _TOKEN_RE.findall(text.lower())


def content_tokens(text: str) -> list[str]:
    """:func:`word_tokens` without stopwords (articles, pronouns, auxiliaries, prepositions)."""
    return [t for t in word_tokens(text) if t not in _STOPWORDS]


def _stem(tok: str) -> str:
    """A crude suffix stripper so ``founded``/``founding``/``founds`` and ``cities``/``city`` match."""
    if tok.isdigit() or len(tok) <= 3:
        return tok
    for suf, rep in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", ""), ("ly", "")):
        if tok.endswith(suf) and len(tok) - len(suf) >= 3:
            tok = tok[: len(tok) - len(suf)] + rep
            break
    return tok[:-1] if tok.endswith("e") and len(tok) > 3 else tok  # name / named, use / used


def stems(text: str) -> set[str]:
    return {_stem(t) for t in content_tokens(text)}


def _is_number(tok: str) -> bool:
    return any(ch.isdigit() for ch in tok)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (``.``, ``!``, ``?`` or a line break followed by a new sentence).

    Abbreviations (``Dr.``, ``St.``), initials (``J. R. R.``) and decimals do not end a sentence.
    """
    out: list[str] = []
    for block in re.split(r"\s*\n\s*", text):
        start = 0
        for m in re.finditer(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])", block):
            before = block[start : m.start()].rsplit(None, 1)
            last = before[-1].lower().rstrip(".") if before else ""
            if last in _ABBREV or (len(last) == 1 and last.isalpha()):
                continue
            out.append(block[start : m.end()].strip())
            start = m.end()
        tail = block[start:].strip()
        if tail:
            out.append(tail)
    return [s for s in out if s]


def fact_sentences(text: str, min_tokens: int = 3) -> list[str]:
    """The sentences that state something (at least ``min_tokens`` content tokens): what QA must cover."""
    return [s for s in split_sentences(text) if len(content_tokens(s)) >= min_tokens]


def entity_spans(sentence: str) -> list[tuple[int, int]]:
    """Character spans of capitalised word runs (``Jake Phelps``, ``Bank of England``) in ``sentence``.

    Connectors (``of``, ``de``) may join capitalised words but not start or end a run; a leading
    stopword (``The``, ``In``) is dropped; a lone capitalised word that starts the sentence is not an
    entity (it is capitalised because it starts the sentence).
    """
    words = list(_WORD_RE.finditer(sentence))
    spans: list[tuple[int, int]] = []

    def joined(a: int, b: int) -> bool:  # nothing but spaces between words a and b
        return not sentence[words[a].end() : words[b].start()].strip()

    i = 0
    while i < len(words):
        if not words[i].group()[0].isupper():
            i += 1
            continue
        j = i
        while j + 1 < len(words) and joined(j, j + 1):
            nxt = words[j + 1].group()
            if nxt[0].isupper():
                j += 1
            elif (nxt.lower() in _ENTITY_CONNECTORS and j + 2 < len(words) and joined(j + 1, j + 2)
                  and words[j + 2].group()[0].isupper()):
                j += 2
            else:
                break
        start = i
        while start <= j and words[start].group().lower() in _STOPWORDS:
            start += 1
        if start <= j and not (start == j == 0):
            spans.append((words[start].start(), words[j].end()))
        i = j + 1
    return spans


def chunk_entities(text: str) -> set[str]:
    """Normalised entity names of ``text`` (see :func:`entity_spans`), for pairing chunks."""
    out: set[str] = set()
    for s in split_sentences(text):
        for a, b in entity_spans(s):
            name = normalize_answer(s[a:b])
            if name and name not in _STOPWORDS and not name.isdigit():
                out.add(name)
    return out


# =============================================================================================
# tasks, requests, generations


@dataclass(frozen=True)
class Task:
    """One request for generated items about one chunk (``qa``, ``paraphrase``) or a chunk pair (``multihop``).

    ``known`` are items accepted in earlier rounds (questions or paraphrases) that must not be repeated;
    ``focus`` the sentences no accepted question covers yet. A ``judge`` task carries the ``item`` to judge
    and the ``parent`` task key.
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
        if self.kind not in TASK_KINDS + (JUDGE_KIND,):
            raise ValueError(f"task kind must be one of {TASK_KINDS + (JUDGE_KIND,)}, got {self.kind!r}")
        if len(self.chunk_ids) != len(self.chunks) or not self.chunks:
            raise ValueError("a task needs one chunk id per chunk text, and at least one chunk")
        if self.kind == "multihop" and len(self.chunks) != 2:
            raise ValueError(f"a multihop task needs exactly two chunks, got {len(self.chunks)}")

    @property
    def key(self) -> str:
        """Identity across rounds: the kind and the chunks (plus the judged item for a judge task)."""
        base = f"{self.kind}:{'|'.join(self.chunk_ids)}"
        if self.kind == JUDGE_KIND:
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


# =============================================================================================
# prompts

SYSTEM_PROMPT = (
    "You write training data for a reading-comprehension model. You reply with a single JSON object and "
    "nothing else: no text before or after it and no Markdown code fence."
)

_QA_RULES = """Rules:
1. Write {lo} to {hi} pairs: at least one for every fact of the passage (every name, date, number, place, \
event and relation it states), and more for sentences that hold several facts.
2. Each question asks about exactly one fact and can be answered from the passage alone. Name the subject \
explicitly (write "When was the Eiffel Tower completed?", not "When was it completed?"): the question will be \
shown without the passage.
3. Each answer is a short span copied from the passage: a name, number, date or phrase of at most 10 words, \
never a whole sentence.
4. Do not put the answer in the question, do not ask about anything the passage does not say, and do not \
repeat a question.
5. Write in the language of the passage."""

_MULTIHOP_RULES = """Rules:
1. Find what links the two passages (a person, place, organisation, work, date or event both mention, or a \
fact of one that explains something in the other) and use it as the bridge: the question states a fact from \
one passage, and its answer is a fact that only the other passage gives.
2. Neither passage alone may be enough to answer. Do not join two separate questions ("What is X and what is \
Y?").
3. The answer is a short span copied from one passage: a name, number, date or phrase of at most 10 words.
4. Name every entity explicitly: the question will be shown without the passages.
5. If the passages share nothing that supports such a question, reply {{"qa": []}}."""

_PARAPHRASE_RULES = """Rules:
1. Keep every fact: every name, number, date, place and relation of the passage, and add nothing that is not \
in it.
2. Change the wording and the sentence structure; do not copy long phrases. Names, numbers and dates stay \
exactly as written.
3. Each rewrite is about as long as the passage, in its language, as plain prose without lists or headings."""

_JUDGE_QA = """Passage(s):
{passages}

Question: {question}
Proposed answer: {answer}

Is the proposed answer correct, and is it stated in the passage(s) above (not merely plausible)? \
Reply with JSON of exactly this form:
{{"supported": true or false, "reason": "one short sentence"}}"""

_JUDGE_PARAPHRASE = """Passage:
{passages}

Rewrite:
{text}

Does the rewrite state exactly the facts of the passage, with none missing, none added and none changed? \
Reply with JSON of exactly this form:
{{"supported": true or false, "reason": "one short sentence"}}"""


def _quote(text: str) -> str:
    return '"""\n' + text.strip() + '\n"""'


def qa_counts(chunk: str, min_qa: int = 3, max_qa: int = 15) -> tuple[int, int]:
    """How many simple QA pairs to ask for: about two per fact sentence, within ``[min_qa, max_qa]``."""
    n = len(fact_sentences(chunk))
    lo = max(min_qa, min(max_qa, n))
    return lo, max(lo, min(max_qa, 2 * n))


def task_messages(task: Task, min_qa: int = 3, max_qa: int = 15) -> list[dict[str, str]]:
    """Chat messages (system + user) asking for ``task``'s items as JSON."""
    if task.kind == "qa":
        lo, hi = qa_counts(task.chunks[0], min_qa, max_qa)
        if task.round and task.known:
            lo = max(1, min(lo, len(task.focus) or 1))
            hi = max(lo, hi - len(task.known))
        parts = ["Read the passage and write question-answer pairs that together cover every fact in it.",
                 _QA_RULES.format(lo=lo, hi=hi), "Passage:\n" + _quote(task.chunks[0])]
        if task.known:
            parts.append("These questions were already written; do not repeat them:\n"
                         + "\n".join(f"- {q}" for q in task.known))
        if task.focus:
            parts.append("No question covers these sentences of the passage yet; ask about them first:\n"
                         + "\n".join(f"- {s}" for s in task.focus))
        parts.append('Reply with JSON of exactly this form:\n{"qa": [{"question": "...", "answer": "..."}]}')
    elif task.kind == "multihop":
        n = task.n_items
        parts = [f"Read the two passages and write {n} question{'s' if n > 1 else ''} that can only be answered by "
                 "combining a fact from passage A with a fact from passage B.",
                 _MULTIHOP_RULES, "Passage A:\n" + _quote(task.chunks[0]), "Passage B:\n" + _quote(task.chunks[1])]
        if task.known:
            parts.append("These questions were already written; write different ones:\n"
                         + "\n".join(f"- {q}" for q in task.known))
        parts.append('Reply with JSON of exactly this form:\n'
                     '{"qa": [{"question": "...", "answer": "...", "bridge": "what links the passages"}]}')
    elif task.kind == "paraphrase":
        n = task.n_items
        parts = [f"Rewrite the passage {'once' if n == 1 else f'{n} times'} in different words.", _PARAPHRASE_RULES,
                 "Passage:\n" + _quote(task.chunks[0])]
        if task.known:
            parts.append(f"{len(task.known)} rewrite(s) already exist; make yours differ from the passage's wording "
                         "as much as the rules allow.")
        parts.append('Reply with JSON of exactly this form:\n{"paraphrases": ["..."]}')
    else:  # judge
        item = task.item or {}
        passages = "\n".join(_quote(c) for c in task.chunks)
        if "text" in item:
            parts = [_JUDGE_PARAPHRASE.format(passages=passages, text=_quote(str(item["text"])))]
        else:
            parts = [_JUDGE_QA.format(passages=passages, question=item.get("question", ""),
                                      answer=item.get("answer", ""))]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


#: The worked examples of the ``answer_first`` prompt (written for this project).
_ANSWER_FIRST_SHOTS: tuple[tuple[str, str, str], ...] = (
    ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris.", "1889",
     "When was the Eiffel Tower completed?"),
    ("Marie Curie was born in Warsaw and later moved to France.", "Warsaw", "Where was Marie Curie born?"),
    ("The Amazon River flows through Brazil, Peru and Colombia.", "Brazil, Peru and Colombia",
     "Which countries does the Amazon River flow through?"),
    ("Hamlet is a tragedy written by William Shakespeare.", "William Shakespeare",
     "Who wrote the tragedy Hamlet?"),
)


def answer_first_target(task: Task) -> tuple[str, str] | None:
    """The ``(sentence, answer)`` an ``answer_first`` task asks a question for, or None if the chunk has none.

    Answers are the spans the cloze engine masks (dates, numbers, named entities), best span of every
    sentence first; round ``r`` takes the ``r``-th, or the first one in a sentence no question covers yet.
    """
    def pairs(sentences: Sequence[str]) -> list[tuple[str, str]]:
        per = [(s, ClozeEngine.candidates(s)) for s in sentences if len(s.split()) >= 5]
        out = []
        for depth in range(2):
            for s, cands in per:
                if depth < len(cands):
                    span = s[cands[depth][1]:cands[depth][2]].strip()
                    if len(span.split()) * 2 <= len(s.split()):
                        out.append((s, span))
        return out

    focus = pairs(task.focus) if task.focus else []
    if focus:
        return focus[0]
    every = pairs(fact_sentences(task.chunks[0]))
    return every[task.round % len(every)] if every else None


def answer_first_prompt(task: Task) -> str:
    """A plain completion prompt (no chat template): worked examples, then the chunk's sentence and
    answer, ending in ``Question:``. The reply's first line is the question."""
    target = answer_first_target(task)
    if target is None:
        return ""
    shots = "".join(f"Text: {t}\nAnswer: {a}\nQuestion: {q}\n\n" for t, a, q in _ANSWER_FIRST_SHOTS)
    return shots + f"Text: {target[0]}\nAnswer: {target[1]}\nQuestion:"


_TEMPORAL_WORDS = frozenset("when year years date century decade month day period era age".split())


def question_fits_answer(question: str, answer: str) -> bool:
    """A date or year must be asked for with a temporal question ("When ...", "In which year ..."): the
    mismatch a small question writer makes most often ("What is the Qing dynasty?" -> "1636")."""
    is_date = any(rx.fullmatch(answer.strip()) for rx in _DATE_RES)
    return not is_date or bool(_TEMPORAL_WORDS & set(word_tokens(question)))


def json_schema(kind: str, max_items: int | None = None) -> dict[str, Any]:
    """The JSON schema of the reply to a ``kind`` task (for constrained decoding)."""
    if kind in ("qa", "multihop"):
        # generous caps (the rules ask for answers of at most 10 words) that stop a runaway string
        props: dict[str, Any] = {"question": {"type": "string", "maxLength": 300},
                                 "answer": {"type": "string", "maxLength": 150}}
        if kind == "multihop":
            props["bridge"] = {"type": "string", "maxLength": 200}
        arr: dict[str, Any] = {"type": "array", "items": {"type": "object", "properties": props,
                                                          "required": ["question", "answer"]}}
        if max_items:
            arr["maxItems"] = max_items
        return {"type": "object", "properties": {"qa": arr}, "required": ["qa"]}
    if kind == "paraphrase":
        arr = {"type": "array", "items": {"type": "string"}, "minItems": 1}
        if max_items:
            arr["maxItems"] = max_items
        return {"type": "object", "properties": {"paraphrases": arr}, "required": ["paraphrases"]}
    if kind == JUDGE_KIND:
        return {"type": "object", "properties": {"supported": {"type": "boolean"}, "reason": {"type": "string"}},
                "required": ["supported"]}
    raise ValueError(f"unknown task kind {kind!r}")


def render_prompt(messages: Sequence[Mapping[str, str]], tokenizer: Any = None) -> str:
    """The prompt text of ``messages``: the tokenizer's chat template when it has one, else a plain layout.

    Instruct models (Qwen, Mistral, Llama) ship a chat template; a base or tiny model gets
    ``### System`` / ``### User`` / ``### Assistant`` sections.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        msgs = [dict(m) for m in messages]
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # some templates reject a system turn: fold it into the first user turn
            if msgs and msgs[0]["role"] == "system" and len(msgs) > 1:
                merged = [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}] + msgs[2:]
                return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
            raise
    parts = [f"### {m['role'].capitalize()}\n{m['content'].strip()}" for m in messages]
    return "\n\n".join(parts) + "\n\n### Assistant\n"


# =============================================================================================
# parsing model output

_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)(?:```|$)", re.DOTALL)
_TRAILING_COMMA_RE = re.compile(r",(\s*[}\]])")


def _closers(stack: list[list[str]]) -> str:
    return "".join("}" if s[0] == "{" else "]" for s in reversed(stack))


def repair_truncated_json(text: str, start: int = 0) -> str | None:
    """The longest valid JSON prefix of the value starting at ``text[start]`` (``{`` or ``[``), closed.

    Scans the value; if it is complete, returns it as is. If the text ends (or breaks) inside it,
    cuts back to the last point where a whole element had ended (an unfinished string, key or number
    is dropped, never half-kept) and appends the missing closing brackets. ``None`` when not even the
    opening bracket is usable.
    """
    if start >= len(text) or text[start] not in "{[":
        return None
    stack: list[list[str]] = []  # [bracket, expect]: expect is key | colon | value | comma
    safe: tuple[int, str] | None = None
    in_str, esc, str_is_key, scalar_from = False, False, False, -1
    i, n = start, len(text)

    def value_done(end: int) -> None:
        nonlocal safe
        stack[-1][1] = "comma"
        safe = (end, _closers(stack))

    while i < n:
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if str_is_key:
                    stack[-1][1] = "colon"
                else:
                    value_done(i + 1)
            i += 1
            continue
        if scalar_from >= 0:
            if c not in ",]} \t\r\n":
                i += 1
                continue
            try:
                json.loads(text[scalar_from:i])
            except ValueError:
                break
            scalar_from = -1
            value_done(i)
        if c in " \t\r\n":
            i += 1
            continue
        top = stack[-1] if stack else None
        if c in "{[":
            if top is not None and top[1] != "value":
                break
            in_array = top is not None and top[0] == "["
            stack.append([c, "key" if c == "{" else "value"])
            if not in_array:  # an array element counts only once something in it is complete
                safe = (i + 1, _closers(stack))
        elif c in "}]":
            if top is None or top[0] != ("{" if c == "}" else "["):
                break
            if top[1] in ("colon",) or (top[1] == "value" and top[0] == "{"):
                break  # a key without its value
            stack.pop()
            if not stack:
                return text[start : i + 1]
            value_done(i + 1)
        elif c == '"':
            if top is None:
                break
            if top[0] == "{" and top[1] == "key":
                str_is_key = True
            elif top[1] == "value":
                str_is_key = False
            else:
                break
            in_str = True
        elif c == ":":
            if top is None or top[0] != "{" or top[1] != "colon":
                break
            top[1] = "value"
        elif c == ",":
            if top is None or top[1] != "comma":
                break
            top[1] = "key" if top[0] == "{" else "value"
        else:
            if top is None or top[1] != "value":
                break
            scalar_from = i
        i += 1
    if safe is None:
        return None
    end, closers = safe
    return text[start:end].rstrip().rstrip(",") + closers


def _candidates(text: str) -> list[str]:
    fenced = [m.group(1) for m in _FENCE_RE.finditer(text)]
    return fenced + [text]


def _has_keys(value: Any, keys: Sequence[str]) -> bool:
    return isinstance(value, dict) and any(k in value for k in keys)


def _repair_any(text: str) -> Any:
    for cand in _candidates(text):
        m = re.search(r"[{\[]", cand)
        if not m:
            continue
        for fixed in (_TRAILING_COMMA_RE.sub(r"\1", cand[m.start():]), cand[m.start():]):
            repaired = repair_truncated_json(fixed)
            if repaired is None:
                continue
            try:
                value = json.loads(_TRAILING_COMMA_RE.sub(r"\1", repaired), strict=False)
            except ValueError:
                continue
            if isinstance(value, (dict, list)) and value:
                return value
    return None


def extract_json(text: str, expect_keys: Sequence[str] = ()) -> tuple[Any, str]:
    """The JSON value in a model's reply, and how it was found.

    Returns ``(value, how)`` with ``how`` one of ``json`` (the reply is JSON), ``embedded`` (JSON inside
    prose or a code fence), ``repaired`` (truncated or with trailing commas, repaired), or
    ``(None, reason)`` with ``reason`` one of ``empty_output``, ``no_json``, ``unparseable_json``.
    ``<think>`` blocks of reasoning models are dropped first. Where several JSON values appear, the first
    object holding one of ``expect_keys`` wins, else the first object or array.
    """
    text = _THINK_RE.sub("", text or "").strip()
    if not text:
        return None, "empty_output"
    try:
        value = json.loads(text, strict=False)
        if isinstance(value, (dict, list)):
            return value, "json"
    except ValueError:
        pass
    decoder = json.JSONDecoder(strict=False)  # models emit raw control characters in strings
    found: list[Any] = []
    for cand in _candidates(text):
        for n_try, m in enumerate(re.finditer(r"[{\[]", cand)):
            try:
                value, _ = decoder.raw_decode(cand, m.start())
            except ValueError:
                continue
            if isinstance(value, (dict, list)) and value:
                found.append(value)
                if _has_keys(value, expect_keys) or (not expect_keys and n_try == 0):
                    return value, "embedded"
            if len(found) > 20:
                break
    repaired = _repair_any(text)
    if repaired is not None and found and not _has_keys(repaired, expect_keys):
        # neither holds the keys: the outer (repaired) value wins over a complete value nested in it
        if len(json.dumps(found[0])) >= len(json.dumps(repaired)):
            return found[0], "embedded"
    if repaired is not None:
        return repaired, "repaired"
    if found:
        return found[0], "embedded"
    if not re.search(r"[{\[]", text):
        return None, "no_json"
    return None, "unparseable_json"


_QA_LIST_KEYS = ("qa", "qa_pairs", "pairs", "questions", "question_answer_pairs", "items", "data", "results")
_Q_KEYS = ("question", "q", "Question", "query")
_A_KEYS = ("answer", "a", "Answer", "answers", "short_answer")
_P_LIST_KEYS = ("paraphrases", "paraphrase", "rewrites", "rewrite", "texts", "text")
_QA_TEXT_RE = re.compile(r"^\s*(?:Q(?:uestion)?\s*[:.]\s*)(.+?)\s+A(?:nswer)?\s*[:.]\s*(.+)$", re.DOTALL | re.I)


def _scalar_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list) and v and all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v):
        return str(v[0]).strip()
    return None


def coerce_qa_items(value: Any, with_bridge: bool = False) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Question-answer items in a parsed reply, and rejects (``missing_question``, ``missing_answer``,
    ``malformed_item``, ``no_items``) for what cannot be one. Accepts ``{"qa": [...]}`` and common
    variants (other list keys, a bare list, one bare pair, ``[q, a]`` lists, ``"Q: ... A: ..."`` strings)."""
    items: Any = None
    if isinstance(value, list):
        items = value
    elif isinstance(value, dict):
        for k in _QA_LIST_KEYS:
            if isinstance(value.get(k), list):
                items = value[k]
                break
        if items is None and any(k in value for k in _Q_KEYS + _A_KEYS):
            items = [value]
    if items is None:
        return [], [{"reason": "no_items", "detail": "no list of question-answer pairs in the reply"}]
    out: list[dict[str, str]] = []
    rejects: list[dict[str, Any]] = []
    for raw in items:
        q = a = None
        bridge = None
        if isinstance(raw, dict):
            q = next((_scalar_text(raw[k]) for k in _Q_KEYS if k in raw), None)
            a = next((_scalar_text(raw[k]) for k in _A_KEYS if k in raw), None)
            bridge = _scalar_text(raw.get("bridge"))
        elif isinstance(raw, (list, tuple)) and len(raw) == 2:
            q, a = _scalar_text(raw[0]), _scalar_text(raw[1])
        elif isinstance(raw, str) and (m := _QA_TEXT_RE.match(raw)):
            q, a = m.group(1).strip(), m.group(2).strip()
        else:
            rejects.append({"reason": "malformed_item", "item": raw})
            continue
        if not q:
            rejects.append({"reason": "missing_question", "item": raw})
            continue
        if not a:
            rejects.append({"reason": "missing_answer", "item": raw})
            continue
        item = {"question": q, "answer": a}
        if with_bridge and bridge:
            item["bridge"] = bridge
        out.append(item)
    return out, rejects


def coerce_paraphrases(value: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Paraphrase texts in a parsed reply (``{"paraphrases": [...]}`` and variants), and rejects."""
    items: Any = None
    if isinstance(value, list):
        items = value
    elif isinstance(value, dict):
        for k in _P_LIST_KEYS:
            if k in value:
                items = value[k] if isinstance(value[k], list) else [value[k]]
                break
    if items is None:
        return [], [{"reason": "no_items", "detail": "no list of paraphrases in the reply"}]
    out: list[str] = []
    rejects: list[dict[str, Any]] = []
    for raw in items:
        text = raw if isinstance(raw, str) else (raw.get("text") or raw.get("paraphrase")) if isinstance(raw, dict) \
            else None
        if not isinstance(text, str) or not text.strip():
            rejects.append({"reason": "malformed_item", "item": raw})
            continue
        out.append(text.strip())
    return out, rejects


# =============================================================================================
# verification


@dataclass(frozen=True)
class VerifySettings:
    """Limits of the lexical checks; the defaults suit Wikipedia-like chunks of ~100-250 words."""

    max_answer_words: int = 24
    min_support: float = 0.75  # share of the answer's content tokens found in the chunk (numbers: all)
    min_question_overlap: int = 1  # content tokens the question shares with the chunk(s)
    paraphrase_min_ratio: float = 0.5  # paraphrase words / chunk words
    paraphrase_max_ratio: float = 1.8
    paraphrase_min_recall: float = 0.5  # chunk content stems kept by the paraphrase
    paraphrase_max_copy: float = 0.85  # share of the paraphrase's word 4-grams copied from the chunk


DEFAULT_VERIFY = VerifySettings()


def _supported(answer_toks: list[str], passage_stems: set[str], passage_toks: set[str], min_support: float) -> bool:
    if not answer_toks:
        return False
    nums = [t for t in answer_toks if _is_number(t)]
    if any(t not in passage_toks for t in nums):
        return False
    hits = sum(1 for t in answer_toks if t in passage_toks or _stem(t) in passage_stems)
    return hits / len(answer_toks) >= min_support


def verify_qa(question: str, answer: str, passages: Sequence[str], v: VerifySettings = DEFAULT_VERIFY,
              multihop: bool = False) -> str | None:
    """``None`` if the pair passes the lexical checks against ``passages``, else the reason it fails.

    Reasons: ``empty_question``, ``empty_answer``, ``not_a_question``, ``answer_too_long``,
    ``answer_uninformative`` (only stopwords, and not yes/no), ``answer_in_question`` (the question
    gives the answer away), ``question_off_topic`` (shares no content word with the passages),
    ``answer_not_in_chunk`` (its words, every number among them, are not in the passages), and for
    multi-hop ``not_multi_hop`` (question and answer together do not draw on both passages).
    """
    q, a = (question or "").strip(), (answer or "").strip()
    if not q:
        return "empty_question"
    if not a:
        return "empty_answer"
    q_words = word_tokens(q)
    first = q_words[0] if q_words else ""
    if len(q_words) < 3 or not (q.endswith("?") or _BLANK in q or first in _QUESTION_WORDS):
        return "not_a_question"
    if len(a.split()) > v.max_answer_words:
        return "answer_too_long"
    a_toks = content_tokens(a)
    joined = "\n".join(passages)
    p_toks = set(content_tokens(joined))
    p_stems = {_stem(t) for t in p_toks}
    q_toks = content_tokens(q)
    if normalize_answer(a) in ("yes", "no"):  # the question must be about the passage; the judge checks more
        return None if sum(1 for t in set(q_toks) if _stem(t) in p_stems) >= 2 else "question_off_topic"
    if not a_toks:
        return "answer_uninformative"
    q_stems = {_stem(t) for t in q_toks}
    if all(_stem(t) in q_stems for t in a_toks):
        return "answer_in_question"
    if sum(1 for t in set(q_toks) if _stem(t) in p_stems) < v.min_question_overlap:
        return "question_off_topic"
    if not _supported(a_toks, p_stems, p_toks, v.min_support):
        return "answer_not_in_chunk"
    if multihop and len(passages) == 2:
        sa, sb = stems(passages[0]), stems(passages[1])
        used = q_stems | {_stem(t) for t in a_toks}
        if not (used & (sa - sb)) or not (used & (sb - sa)):
            return "not_multi_hop"
    return None


def _ngrams(toks: list[str], n: int = 4) -> set[tuple[str, ...]]:
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def verify_paraphrase(text: str, chunk: str, v: VerifySettings = DEFAULT_VERIFY) -> str | None:
    """``None`` if ``text`` passes as a paraphrase of ``chunk``, else the reason it fails.

    Reasons: ``empty_paraphrase``, ``too_short`` / ``too_long`` (word-count ratio), ``near_copy`` (most
    of its word 4-grams are the chunk's), ``missing_number`` / ``novel_number`` (numbers must be kept
    and none invented), ``facts_missing`` (too few of the chunk's content words kept).
    """
    t = (text or "").strip()
    if not t:
        return "empty_paraphrase"
    words_t, words_c = word_tokens(t), word_tokens(chunk)
    ratio = len(words_t) / max(1, len(words_c))
    if ratio < v.paraphrase_min_ratio:
        return "too_short"
    if ratio > v.paraphrase_max_ratio:
        return "too_long"
    grams_t = _ngrams(words_t)
    if grams_t and len(grams_t & _ngrams(words_c)) / len(grams_t) > v.paraphrase_max_copy:
        return "near_copy"
    nums_t = {w for w in words_t if _is_number(w)}
    nums_c = {w for w in words_c if _is_number(w)}
    if nums_c - nums_t:
        return "missing_number"
    if nums_t - nums_c:
        return "novel_number"
    sc, st = stems(chunk), stems(t)
    if sc and len(sc & st) / len(sc) < v.paraphrase_min_recall:
        return "facts_missing"
    return None


def sentence_covered(sentence: str, question: str, answer: str) -> bool:
    """Whether a QA pair is about ``sentence``: its answer's content words are in it and the question
    shares a content word with it (or the answer alone names two of its words)."""
    s_stems = stems(sentence)
    a_stems = stems(answer)
    if not a_stems or not a_stems <= s_stems:
        return False
    q_overlap = len((stems(question) - a_stems) & s_stems)
    return q_overlap >= 1 or len(a_stems) >= 2


def coverage(chunk: str, pairs: Iterable[Mapping[str, str]]) -> tuple[float, list[str]]:
    """Share of the chunk's fact sentences covered by ``pairs``, and the sentences not covered."""
    sents = fact_sentences(chunk)
    if not sents:
        return 1.0, []
    pairs = list(pairs)
    missing = [s for s in sents if not any(sentence_covered(s, p["question"], p["answer"]) for p in pairs)]
    return 1.0 - len(missing) / len(sents), missing


def question_key(question: str) -> str:
    """Two questions with the same key are duplicates."""
    return " ".join(normalize_answer(question).split())


def is_duplicate_qa(item: Mapping[str, str], accepted: Iterable[Mapping[str, str]]) -> bool:
    """Same normalised question, or the same answer to a question with nearly the same content words."""
    k = question_key(item["question"])
    qa, a = stems(item["question"]), normalize_answer(item["answer"])
    for other in accepted:
        if question_key(other["question"]) == k:
            return True
        if normalize_answer(other["answer"]) == a:
            qb = stems(other["question"])
            if qa and qb and len(qa & qb) / len(qa | qb) >= 0.8:
                return True
    return False


def is_duplicate_paraphrase(text: str, accepted: Iterable[str]) -> bool:
    words = word_tokens(text)
    grams = _ngrams(words)
    for other in accepted:
        ow = word_tokens(other)
        if ow == words:
            return True
        og = _ngrams(ow)
        if grams and og and len(grams & og) / len(grams | og) >= 0.9:
            return True
    return False


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
    limit = {"qa": max_qa, "multihop": max(1, task.n_items), "paraphrase": max(1, task.n_items)}.get(task.kind)
    schema = json.dumps(json_schema(task.kind, limit)) if structured else None
    return GenerationRequest(task, prompt, max_tokens, temp, top_p, digest & 0x7FFFFFFF, schema)


def judge_tasks(state: TaskState, items: Sequence[Mapping[str, Any]]) -> list[Task]:
    """One judge task per newly accepted item of ``state``."""
    t = state.task
    return [Task(JUDGE_KIND, t.chunk_ids, t.chunks, t.unit, state.rounds - 1, 1, item=dict(it), parent=t.key)
            for it in items]


# =============================================================================================
# records


def chunk_records(chunk_id: str, chunk: str, qa_items: Sequence[Mapping[str, str]],
                  paraphrases: Sequence[Mapping[str, str]], generator: str) -> list[dict[str, Any]]:
    """Stage-1 records of one chunk in the reference format: one ``qa`` record holding all its pairs,
    one ``paraphrase`` record per paraphrase. ``chunk_id`` and ``generator`` are provenance, ignored
    by readers of the reference format."""
    out: list[dict[str, Any]] = []
    if qa_items:
        out.append({"data_type": "qa", "question": [q["question"] for q in qa_items],
                    "answers": [q["answer"] for q in qa_items], "docs": [chunk], "chunk_id": chunk_id,
                    "generator": generator})
    for p in paraphrases:
        out.append({"data_type": "paraphrase", "answers": [p["text"]], "docs": [chunk], "chunk_id": chunk_id,
                    "generator": generator})
    return out


def multihop_records(chunk_ids: Sequence[str], chunks: Sequence[str], items: Sequence[Mapping[str, str]],
                     generator: str) -> list[dict[str, Any]]:
    """Multi-hop QA as stage-2 (instruct) records: both chunks are gold (``pos_index [0, 1]``).

    A stage-1 record holds exactly one chunk, so a question that needs two cannot be one.
    """
    return [{"question": it["question"], "docs": list(chunks), "answer": it["answer"], "pos_index": [0, 1],
             "chunk_ids": list(chunk_ids), "bridge": it.get("bridge"), "generator": generator} for it in items]


def validate_record(rec: Mapping[str, Any], stage: str, where: str) -> str | None:
    """``None`` if ``rec`` is a valid ``stage`` record, else the :class:`~clara.records.RecordError` text."""
    try:
        parse_record(dict(rec), stage, where)
    except RecordError as e:
        return str(e)
    return None


# =============================================================================================
# pairing chunks for multi-hop questions


def pair_chunks(chunks: Sequence[tuple[str, str]], per_chunk: int = 1, max_df: int = 64) -> list[tuple[str, str]]:
    """Pairs ``(anchor_id, partner_id)`` of related chunks, at most ``per_chunk`` anchored on each chunk.

    ``chunks`` are ``(chunk_id, text)``. The partner shares the rarest entities with the anchor
    (idf-weighted; entities in more than ``max_df`` chunks are ignored), else the rarest content words
    (weighted half). A pair is never repeated in the other direction. Deterministic.
    """
    n = len(chunks)
    if n < 2 or per_chunk <= 0:
        return []
    ents = [chunk_entities(t) for _, t in chunks]
    words = [set(content_tokens(t)) - {w for e in es for w in e.split()} for (_, t), es in zip(chunks, ents)]
    df_e: Counter[str] = Counter(e for es in ents for e in es)
    df_w: Counter[str] = Counter(w for ws in words for w in ws)
    inv_e: dict[str, list[int]] = {}
    inv_w: dict[str, list[int]] = {}
    for i, es in enumerate(ents):
        for e in es:
            if 2 <= df_e[e] <= max_df:
                inv_e.setdefault(e, []).append(i)
    for i, ws in enumerate(words):
        for w in ws:
            if 2 <= df_w[w] <= max_df and len(w) > 3 and not w.isdigit():
                inv_w.setdefault(w, []).append(i)
    taken: set[frozenset[int]] = set()
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        score: Counter[int] = Counter()
        for e in ents[i]:
            for j in inv_e.get(e, ()):
                if j != i:
                    score[j] += math.log(n / df_e[e]) + 1.0
        for w in words[i]:
            for j in inv_w.get(w, ()):
                if j != i:
                    score[j] += 0.5 * math.log(n / df_w[w])
        ranked = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))
        k = 0
        for j, sc in ranked:
            if k >= per_chunk:
                break
            if sc <= 0 or frozenset((i, j)) in taken or chunks[j][1] == chunks[i][1]:
                continue
            taken.add(frozenset((i, j)))
            pairs.append((chunks[i][0], chunks[j][0]))
            k += 1
    return pairs


# =============================================================================================
# work units: content-keyed groups of chunks, each written once, atomically


@dataclass(frozen=True)
class UnitChunk:
    chunk_id: str
    text: str
    content_hash: str


@dataclass(frozen=True)
class WorkUnit:
    """A group of chunks whose records are written together, in one file named by ``key``.

    ``pairs`` are the multi-hop pairs anchored on the unit's chunks, as ``(anchor, partner)`` chunks.
    """

    key: str
    chunks: tuple[UnitChunk, ...]
    pairs: tuple[tuple[UnitChunk, UnitChunk], ...] = ()


def plan_units(chunks: Sequence[UnitChunk], pairs: Sequence[tuple[str, str]], fingerprint: str,
               target_chunks: int = 64) -> list[WorkUnit]:
    """Group ``chunks`` (in order) into units of about ``target_chunks``, keyed by content and settings.

    Boundaries are content-defined (after a chunk whose id hashes to 0 mod ``target_chunks``, or at
    4x the target), so adding or removing a document only changes the units around it and a rerun
    redoes only those. The key hashes ``fingerprint`` (the settings that shape the output) and each
    chunk's id and content hash, and each pair's partner.
    """
    if target_chunks < 1:
        raise ValueError(f"target_chunks must be >= 1, got {target_chunks}")
    by_id = {c.chunk_id: c for c in chunks}
    if len(by_id) != len(chunks):
        dup = next(cid for cid, k in Counter(c.chunk_id for c in chunks).items() if k > 1)
        raise ValueError(f"duplicate chunk id {dup!r}")
    anchored: dict[str, list[UnitChunk]] = {}
    for a, b in pairs:
        anchored.setdefault(a, []).append(by_id[b])
    groups: list[list[UnitChunk]] = [[]]
    for c in chunks:
        groups[-1].append(c)
        h = int(hashlib.sha256(c.chunk_id.encode("utf-8")).hexdigest()[:12], 16)
        if h % target_chunks == 0 or len(groups[-1]) >= 4 * target_chunks:
            groups.append([])
    units = []
    for g in groups:
        if not g:
            continue
        unit_pairs = tuple((c, p) for c in g for p in anchored.get(c.chunk_id, ()))
        desc = json.dumps([fingerprint, [(c.chunk_id, c.content_hash) for c in g],
                           [(a.chunk_id, b.chunk_id, b.content_hash) for a, b in unit_pairs]])
        units.append(WorkUnit(hashlib.sha256(desc.encode("utf-8")).hexdigest()[:24], tuple(g), unit_pairs))
    return units


def unit_path(out_dir: str | Path, key: str) -> Path:
    return Path(out_dir) / "units" / f"{key}.jsonl"


def write_unit_file(out_dir: str | Path, key: str, lines: Iterable[Mapping[str, Any]]) -> Path:
    """Write one unit's output (JSON lines, each with a ``type``) atomically: a temporary file, fsync'd,
    then renamed, so a unit file is either whole or absent."""
    path = unit_path(out_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_unit_file(out_dir: str | Path, key: str) -> Iterator[dict[str, Any]]:
    with unit_path(out_dir, key).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# =============================================================================================
# engines


class ClozeEngine:
    """Rule-based questions for machines without a usable LLM: in each of the chunk's own sentences a
    date, a number or a named entity is masked (``_____``), and the masked span is the answer.

    Fill-in-the-blank questions test that the memory holds the chunk's facts; they are not the varied,
    reworded questions an LLM writes, and there are no paraphrases or multi-hop questions. The output is
    the JSON an LLM is asked for, so it goes through the same parser and verifier.
    """

    name = "cloze"
    kinds = frozenset({"qa"})
    regenerates = False

    def __init__(self, max_items: int = 15, min_sentence_words: int = 5):
        self.max_items = max_items
        self.min_sentence_words = min_sentence_words

    @staticmethod
    def candidates(sentence: str) -> list[tuple[int, int, int]]:
        """``(priority, start, end)`` of maskable spans: dates (0), numbers (1), multi-word (2) and
        single-word (3) entities; overlapping lower-priority spans are dropped."""
        found: list[tuple[int, int, int]] = []
        for rx in _DATE_RES:
            found += [(0, m.start(), m.end()) for m in rx.finditer(sentence)]
        found += [(1, m.start(), m.end()) for m in _NUMBER_RE.finditer(sentence)]
        for a, b in entity_spans(sentence):
            found.append((2 if " " in sentence[a:b] else 3, a, b))
        found.sort(key=lambda t: (t[0], -(t[2] - t[1]), t[1]))
        kept: list[tuple[int, int, int]] = []
        texts: set[str] = set()
        for p, a, b in found:  # every occurrence of a span is masked, so one candidate per span text
            if sentence[a:b] not in texts and all(b <= ka or a >= kb for _, ka, kb in kept):
                kept.append((p, a, b))
                texts.add(sentence[a:b])
        return kept

    def questions(self, chunk: str) -> list[dict[str, str]]:
        sents = [s for s in split_sentences(chunk) if len(s.split()) >= self.min_sentence_words]
        per_sentence = [self.candidates(s) for s in sents]
        out: list[dict[str, str]] = []
        for depth in range(2):  # the best span of every sentence first, then second-best ones
            for s, cands in zip(sents, per_sentence):
                if len(out) >= self.max_items:
                    return out
                if depth >= len(cands):
                    continue
                _, a, b = cands[depth]
                span = s[a:b].strip()
                if len(span.split()) * 2 > len(s.split()):
                    continue
                masked = s.replace(span, _BLANK)
                out.append({"question": f"Fill in the blank: {masked}", "answer": span})
        return out

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        out = []
        for r in requests:
            if r.task.kind != "qa":
                out.append(Generation("", error=f"the cloze engine writes only simple QA, not {r.task.kind!r}"))
                continue
            text = json.dumps({"qa": self.questions(r.task.chunks[0])}, ensure_ascii=False)
            out.append(Generation(text, 0, 0))
        return out


class TransformersEngine:
    """Any Hugging Face causal LM in-process (``generate``): the fallback where vLLM is not installed.

    Requests are batched by sampling parameters and left-padded. A prompt that with ``max_tokens``
    exceeds the model's context gives an error generation, not an exception.
    """

    name = "transformers"
    kinds = frozenset(TASK_KINDS + (JUDGE_KIND,))
    regenerates = True

    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "float32", batch_size: int = 4):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, dtype)).to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        torch, tok = self.torch, self.tokenizer
        results: list[Generation | None] = [None] * len(requests)
        groups: dict[tuple[float, float, int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.temperature, r.top_p, r.max_tokens), []).append(i)
        for (temp, top_p, max_tokens), idx in groups.items():
            for b in range(0, len(idx), self.batch_size):
                batch = idx[b : b + self.batch_size]
                ok = []
                for i in batch:
                    n_in = len(tok(requests[i].prompt, add_special_tokens=False)["input_ids"])
                    if n_in + max_tokens > self.max_len:
                        results[i] = Generation("", 0, n_in, error=f"prompt of {n_in} tokens + max_tokens "
                                                f"{max_tokens} exceeds the model's {self.max_len} positions")
                    else:
                        ok.append(i)
                if not ok:
                    continue
                enc = tok([requests[i].prompt for i in ok], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(self.device)
                torch.manual_seed(requests[ok[0]].seed)
                kwargs = dict(max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id, do_sample=temp > 0)
                if temp > 0:
                    kwargs.update(temperature=temp, top_p=top_p)
                with torch.no_grad():
                    out = self.model.generate(**enc, **kwargs)
                width = enc["input_ids"].shape[1]
                for row, i in enumerate(ok):
                    ids = out[row, width:].tolist()
                    if tok.eos_token_id is not None and tok.eos_token_id in ids:
                        ids = ids[: ids.index(tok.eos_token_id)]
                    n_in = int(enc["attention_mask"][row].sum())
                    results[i] = Generation(tok.decode(ids, skip_special_tokens=True), len(ids), n_in)
        return [r if r is not None else Generation("", error="not generated") for r in results]
