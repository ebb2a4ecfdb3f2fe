"""The prompts of the three stages, in one place so training, serving and evaluation agree.

The generator reads ``Background:`` followed by one run of ``n_mem`` memory slots per retrieved
chunk (each run followed by a separator), then the question. The same text is used with plain
chunk text in place of the memory slots for the text-RAG baseline.
"""

from __future__ import annotations

BACKGROUND_HEADER = "Background:\n"
CHUNK_SEPARATOR = "\n"
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
#: The question of a paraphrase (and reconstruction) record: regenerate the chunk from its memory.
PARAPHRASE_INSTRUCTION = "Paraphrase the background."
#: The target of a wrong-memory negative: a question read with chunks that do not hold its answer.
NO_ANSWER = "The background does not say."


def question_text(question: str) -> str:
    return QUESTION_TEMPLATE.format(question=question.strip())


def answer_text(answer: str) -> str:
    """Targets start with a space so they tokenise like a continuation of ``Answer:``."""
    return " " + answer.strip()
