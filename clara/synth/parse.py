"""Parsing model output: JSON inside prose or fences, truncated JSON, items coerced into shape."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

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


