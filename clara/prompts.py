"""The prompts of the three stages, in one place so training, serving and evaluation agree.

The generator reads ``Background:`` followed by one run of ``n_mem`` memory slots per retrieved
chunk (each run followed by a separator), then the question. The same text is used with plain
chunk text in place of the memory slots for the text-RAG baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

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


# --------------------------------------------------------------------------------------------
# the generator's input layout (token ids around memory slots, then embeddings)

#: A question's background: an int (that many chunks given as memory), a list of chunk texts
#: (plain-text RAG), or ``None`` (no background).
Background = int | Sequence[str] | None


@dataclass
class GeneratorBatch:
    input_ids: torch.Tensor  # (B, T) long; memory slots hold the pad id
    attention_mask: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long
    memory_mask: torch.Tensor  # (B, T) bool; True at memory slots
    labels: torch.Tensor | None  # (B, T) long, -100 where no loss; None for generation

    def to(self, device: torch.device) -> GeneratorBatch:
        return GeneratorBatch(
            *(t.to(device) if t is not None else None for t in
              (self.input_ids, self.attention_mask, self.position_ids, self.memory_mask, self.labels))
        )


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, for left- or right-padded rows."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class GeneratorPrompt:
    """The generator's input: the layout above as token ids with memory slots, then as embeddings.

    It needs only the tokenizer and three sizes, so a generator that runs elsewhere (the vLLM engine)
    builds exactly :class:`~clara.model.ClaraModel`'s prompts with a token-embedding table beside it.
    """

    def __init__(self, tokenizer, n_mem: int, doc_max_tokens: int, query_max_tokens: int) -> None:
        self.tokenizer, self.n_mem = tokenizer, n_mem
        self.doc_max_tokens, self.query_max_tokens = doc_max_tokens, query_max_tokens

    def _tok(self, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)
        return [list(ids) for ids in enc["input_ids"]]

    def batch(self, questions: Sequence[str], backgrounds: Background | Sequence[Background],
              answers: Sequence[str] | None = None) -> GeneratorBatch:
        """Token layout of the generator's input.

        ``backgrounds`` per question (see :data:`Background`), or one such value for all questions.
        With ``answers`` the batch is right-padded with labels on the answer tokens (training);
        without, left-padded for generation.
        """
        n = len(questions)
        if backgrounds is None or isinstance(backgrounds, int):
            backgrounds = [backgrounds] * n
        if len(backgrounds) != n or (answers is not None and len(answers) != n):
            raise ValueError("questions, backgrounds and answers must have the same length")
        m, pad = self.n_mem, self.tokenizer.pad_token_id
        header, sep = self._tok([BACKGROUND_HEADER, CHUNK_SEPARATOR], 64)
        qs = self._tok([question_text(q) for q in questions], self.query_max_tokens + 16)
        prompts: list[tuple[list[int], list[bool]]] = []
        for q, bg in zip(qs, backgrounds):
            ids: list[int] = []
            slots: list[bool] = []
            if isinstance(bg, int) and bg > 0:
                for _ in range(bg):
                    ids += [pad] * m + sep
                    slots += [True] * m + [False] * len(sep)
                ids, slots = header + ids, [False] * len(header) + slots
            elif bg is not None and not isinstance(bg, int):
                for chunk in self._tok(list(bg), self.doc_max_tokens):
                    ids += chunk + sep
                ids = header + ids
                slots = [False] * len(ids)
            prompts.append((ids + q, slots + [False] * len(q)))
        targets = None
        if answers is not None:
            eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            targets = [a + eos for a in self._tok([answer_text(a) for a in answers], self.doc_max_tokens)]
        lengths = [len(p) + (len(targets[i]) if targets else 0) for i, (p, _) in enumerate(prompts)]
        t = max(lengths)
        input_ids = torch.full((n, t), pad, dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.long)
        mem_mask = torch.zeros((n, t), dtype=torch.bool)
        labels = torch.full((n, t), -100, dtype=torch.long) if targets else None
        for i, (ids, slots) in enumerate(prompts):
            row = ids + (targets[i] if targets else [])
            start = 0 if targets else t - len(row)  # right-pad to train, left-pad to generate
            input_ids[i, start:start + len(row)] = torch.tensor(row)
            mask[i, start:start + len(row)] = 1
            mem_mask[i, start:start + len(slots)] = torch.tensor(slots, dtype=torch.bool)
            if targets:
                labels[i, len(ids):len(row)] = torch.tensor(targets[i])
        return GeneratorBatch(input_ids, mask, positions(mask), mem_mask, labels)

    @staticmethod
    def embeddings(embed: nn.Module, batch: GeneratorBatch,
                   memory: torch.Tensor | Sequence[torch.Tensor] | None) -> torch.Tensor:
        """Input embeddings ``[B, T, D]`` (``embed``: the token-embedding table) with the memory slots
        replaced by the memory vectors: ``[B, k, M, D]``, or one ``[k_i, M, D]`` per question."""
        emb = embed(batch.input_ids)  # (B, T, D)
        n_slots = int(batch.memory_mask.sum())
        if memory is None or n_slots == 0:
            if n_slots:
                raise ValueError("the prompt has memory slots but no memory was given")
            return emb
        flat = memory.reshape(-1, memory.shape[-1]) if isinstance(memory, torch.Tensor) else torch.cat(
            [mm.reshape(-1, mm.shape[-1]) for mm in memory])  # (sum k_i*M, D)
        if flat.shape[0] != n_slots:
            raise ValueError(f"the prompts hold {n_slots} memory slots but {flat.shape[0]} memory vectors were given")
        # masked_scatter fills slots in row-major order: question by question, chunk by chunk.
        return emb.masked_scatter(batch.memory_mask.unsqueeze(-1), flat.to(emb.dtype))
