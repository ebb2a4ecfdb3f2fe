"""Lexical verification of generated items against their chunk(s), coverage and duplicates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from clara.eval.metrics import normalize_answer
from clara.synth.text import (
    _BLANK,
    _QUESTION_WORDS,
    _is_number,
    _stem,
    content_tokens,
    fact_sentences,
    stems,
    word_tokens,
)

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


