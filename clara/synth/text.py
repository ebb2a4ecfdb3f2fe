"""Text utilities of synthesis: tokens, stems, sentences, named-entity spans, answer spans."""

from __future__ import annotations

import re

from clara.eval.metrics import normalize_answer

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


