"""The prompts: instructions with a JSON reply (``rules``), worked examples (``answer_first``), judges."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from clara.synth.engines import ClozeEngine
from clara.synth.tasks import JUDGE_KIND, Task
from clara.synth.text import _DATE_RES, _NUMBER_RE, fact_sentences

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


def roundtrip_prompt(task: Task) -> str:
    """The round-trip check's plain completion prompt: the same worked examples read the other way (a text, a
    question, its answer), then the item's passage(s) and question, ending in ``Answer:``. The reply's first
    line is the engine's answer, which :func:`clara.synth.rounds.roundtrip_verdict` compares with the item's."""
    item = task.item or {}
    shots = "".join(f"Text: {t}\nQuestion: {q}\nAnswer: {a}\n\n" for t, a, q in _ANSWER_FIRST_SHOTS)
    text = " ".join(" ".join(c.split()) for c in task.chunks)
    return shots + f"Text: {text}\nQuestion: {' '.join(str(item.get('question', '')).split())}\nAnswer:"


_TEMPORAL_WORDS = frozenset("when year years date century decade month day period era age".split())
_QUANTITY_WORDS = frozenset(
    """how many much number numbers percent percentage population size area length height long tall high far
    old age cost price amount total count rate elevation distance speed weight temperature capacity figure
    deep depth wide width""".split())


_PERSON_PLACE_WORDS = frozenset("who whom whose where".split())
_WH_WORDS = _PERSON_PLACE_WORDS | frozenset("what which when how why".split())


def question_fits_answer(question: str, answer: str) -> bool:
    """An answer's type must match its question: a date or year is asked for with a temporal question
    ("When ...", "In which year ..."), a number with a quantity ("How many ...", "What is the elevation
    ..."), and never by a question for a person or a place ("Who ...", "Where ..."). The mismatches a
    small question writer makes most often: "What is the Qing dynasty?" -> "1636", "Which country is the
    capital of India?" -> "21,778", "Who wrote The Gilded Age?" -> "1894". Capitalised words inside the
    question are names and titles, not what it asks for ("Age" in "The Gilded Age")."""
    a = answer.strip()
    raw = re.findall(r"[^\W\d_]+", question)
    asks = {w.lower() for i, w in enumerate(raw) if i == 0 or not w[0].isupper() or w.lower() in _WH_WORDS}
    dated = any(rx.fullmatch(a) for rx in _DATE_RES)
    numeric = not dated and _NUMBER_RE.fullmatch(a) is not None
    # the question's own wh-word: its first word, or its second after a preposition ("To whom ...");
    # a "who" / "where" later opens a clause ("... the scientist who discovered it born?")
    opening = [w.lower() for w in raw[:2]]
    wh = opening[0] if opening and opening[0] in _WH_WORDS else (
        opening[1] if len(opening) > 1 and opening[1] in _WH_WORDS else "")
    if (dated or numeric) and wh in _PERSON_PLACE_WORDS:
        return False
    if dated:
        return bool(_TEMPORAL_WORDS & asks)
    if numeric:
        return bool(_QUANTITY_WORDS & asks)
    return True


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


