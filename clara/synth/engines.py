"""Engines without Ray: the rule-based cloze engine and the in-process transformers engine."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from clara.synth.tasks import CHECK_KINDS, TASK_KINDS, Generation, GenerationRequest
from clara.synth.text import _BLANK, _DATE_RES, _NUMBER_RE, entity_spans, split_sentences

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
    kinds = frozenset(TASK_KINDS + CHECK_KINDS)
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
