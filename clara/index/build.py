"""An incremental index run, the library half: what to compress, how to compress it, how to write it.

The Ray job (:mod:`pipelines.index`) is a thin shell over this module:

1. :func:`read_compressor_info` reads the model directory's manifest (no weights loaded) for the
   memory shape ``[n_mem, d]`` and the ``compressor_version``; :func:`store_settings_for` turns that
   into the table's :class:`~clara.index.store.StoreSettings`.
2. :func:`source_chunks` reads the corpus and chunks it by tokens of the compressor's tokenizer. Each
   ``content_hash`` is salted with :func:`chunking_salt` (chunking settings + compressor version), so
   changing either re-compresses everything.
3. :func:`plan_index` diffs the chunks against ``{chunk_id: content_hash}`` of the table: unchanged
   chunks are skipped, new and changed ones are compressed, stale rows are listed for deletion;
   :func:`check_deletions` refuses a plan that would delete more than a set fraction of the table.
4. :class:`ChunkCompressor` (the body of the Ray actor) loads the model once and turns a batch of chunk
   rows into encoded index rows (memory in the storage dtype, ``key``), shape-checked.
5. :class:`IndexWriter` upserts encoded rows (``merge_insert`` on ``chunk_id``), a few thousand per
   commit. Every commit is atomic and keyed on ``chunk_id``, and step 3 skips what a crashed run
   already committed, so a rerun after a crash ends with exactly one row per chunk.
6. :func:`refresh_ann_index` builds the ANN index on ``key``, or folds new rows into the existing one.
7. :func:`tag_version` tags the version a run ended on, so :func:`cleanup_index` (old untagged
   versions, optionally all but the newest job tags) keeps every finished run's table restorable.

This module never imports ``ray``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from clara.data.corpus import (
    Chunk,
    Document,
    DocumentError,
    chunk_documents,
    content_hash,
    document_from_record,
    make_chunk_id,
    parse_chunk_id,
    read_documents,
    scp_chunk_text,
    text_file_document,
    text_file_id,
)
from clara.data.jsonl import jsonl_lines, parse_jsonl
from clara.index.codec import KeyBasis, check_key_basis, encode_batch
from clara.index.schema import ANN_KINDS, IndexMismatchError, IndexNotFoundError, StoreSettings
from clara.index.store import SCAN_MAX_PARTITIONS, ChunkStore, CleanupReport

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("auto", "scp")
SCP_DOC_PREFIX = "scp:"
#: Columns of the rows handed to the compressor (one row per chunk).
CHUNK_COLUMNS = ("chunk_id", "doc_id", "position", "text", "content_hash")


def default_key_dim(n_mem: int, d: int) -> int:
    """Key dimension of a new table: ``n_mem * d / 8``, within [128, 1024] (see :func:`store_settings_for`)."""
    return min(1024, max(128, n_mem * d // 8))


# --------------------------------------------------------------------------------------------
# the compressor, read from its model directory without loading weights


@dataclass(frozen=True)
class CompressorInfo:
    """What an index needs to know about a CLaRa model directory (from ``clara.json``, no weights loaded)."""

    path: str
    n_mem: int
    d: int
    compressor_version: str
    compression_rate: int
    doc_max_tokens: int


def read_compressor_info(model_dir: str | Path) -> CompressorInfo:
    """Read the manifest and the memory-embedding shape of a model directory written by ``save_pretrained``.

    ``d`` comes from the shape of ``memory_embeddings.safetensors`` (``[n_mem, d]``), read from its
    header only, so a 7B model is not loaded on the driver.
    """
    from safetensors import safe_open

    from clara.checkpoint import CheckpointError, read_manifest
    from clara.config import ClaraConfig

    path = Path(model_dir)
    manifest = read_manifest(path)
    config = ClaraConfig.from_dict(manifest["config"])
    mem_file = path / "memory_embeddings.safetensors"
    if not mem_file.is_file():
        raise CheckpointError(f"{path}: memory_embeddings.safetensors is missing")
    with safe_open(str(mem_file), framework="np") as f:
        shape = tuple(f.get_slice("memory_embeddings").get_shape())
    if len(shape) != 2 or shape[0] != config.n_mem:
        raise CheckpointError(f"{mem_file}: memory_embeddings has shape {shape}, expected [n_mem={config.n_mem}, d]")
    return CompressorInfo(
        path=str(path),
        n_mem=config.n_mem,
        d=int(shape[1]),
        compressor_version=str(manifest["compressor_version"]),
        compression_rate=config.compression_rate,
        doc_max_tokens=config.doc_max_tokens,
    )


def store_settings_for(
    info: CompressorInfo,
    existing: StoreSettings | None = None,
    *,
    dtype: str | None = None,
    key_dim: int | None = None,
    key_seed: int | None = None,
) -> StoreSettings:
    """The table settings for ``info``: storage choices not given are taken from an ``existing`` table
    (so a rerun need not repeat them), else the defaults: float16 memory, seed 0, and a key of
    :func:`default_key_dim` dimensions (256 for the 16 x 128 memory of the tiny test model, 1024 at 7B).

    Why: the key is a random projection, whose error on a cosine shrinks as ``1/sqrt(key_dim)``; the
    fewer key dimensions, the more ANN candidates must be re-scored to find the exact top-10. On the 900
    sample chunks (tiny model) the exact top-10 lies in the key's top-50 for 98% of questions at 256-d
    (92% at 128-d) and in its top-100 for all. On 50k synthetic memories with a large shared component
    (benchmarks/bench_search.py) a 256-d key needs ~2,000 candidates for 0.99 recall, a 1024-d key 200.
    The key costs ``4 * key_dim`` bytes a row: 4 KiB at 1024-d against 128 KiB of float16 memory at 7B.

    Raises :class:`~clara.index.store.IndexMismatchError` when ``existing`` was built by another compressor or
    for another memory shape, before anything is compressed or written.
    """
    settings = StoreSettings(
        n_mem=info.n_mem,
        d=info.d,
        compressor_version=info.compressor_version,
        dtype=dtype or (existing.dtype if existing else "float16"),
        key_dim=key_dim or (existing.key_dim if existing else default_key_dim(info.n_mem, info.d)),
        key_seed=key_seed if key_seed is not None else (existing.key_seed if existing else 0),
        key_basis=existing.key_basis if existing else "",
        model=info.path,
        compression_rate=info.compression_rate,
    )
    if existing is not None:
        diff = settings.differences(existing)
        if diff:
            detail = "; ".join(f"{f}: table has {getattr(existing, f)!r}, {info.path} gives {getattr(settings, f)!r}"
                               for f in diff)
            raise IndexMismatchError(
                f"the index was built with other settings ({detail}). Index into a new table (--table-name) "
                f"or rebuild this one; memories of two compressors are never mixed"
            )
    return settings


# --------------------------------------------------------------------------------------------
# reading and chunking the corpus


def load_tokenizer(model_dir: str | Path):
    """The compressor's tokenizer (``<model_dir>/tokenizer``): chunks are windows of its tokens."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(model_dir) / "tokenizer"))


def load_chunk_tokenizer(model_dir: str | Path):
    """The tokenizer that cuts chunks, as cheaply as it loads: the ``tokenizers`` backend read from
    ``tokenizer.json`` when the model has one (the very object a fast Hugging Face tokenizer wraps, so the
    same ids and offsets, hence the same chunks), else :func:`load_tokenizer`. A planner worker loads it in
    ~0.03 s instead of the ~5 s that importing transformers (and torch) takes on a small CPU."""
    path = Path(model_dir) / "tokenizer" / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    return load_tokenizer(model_dir)


@dataclass(frozen=True)
class ChunkingSettings:
    """How documents become chunks. ``format="scp"``: each stage-1 record's ``docs[0]`` is one chunk, as is."""

    chunk_tokens: int
    overlap: int = 0
    format: str = "auto"
    title_field: str | None = None

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"format must be one of {SOURCE_FORMATS}, got {self.format!r}")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be a positive int, got {self.chunk_tokens!r}")
        overlap = self.overlap
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < self.chunk_tokens:
            raise ValueError(f"overlap must be an int in [0, chunk_tokens={self.chunk_tokens}), got {self.overlap!r}")


def chunking_salt(chunking: ChunkingSettings, compressor_version: str, tokenizer: Any = None) -> str:
    """The ``content_hash`` salt: any change of chunking or compressor changes every chunk's hash."""
    parts = {"format": chunking.format, "compressor_version": compressor_version}
    if chunking.format != "scp":
        vocab = getattr(tokenizer, "vocab_size", None)
        parts.update(chunk_tokens=chunking.chunk_tokens, overlap=chunking.overlap, title_field=chunking.title_field,
                     tokenizer=f"{type(tokenizer).__name__}/{vocab}/{len(tokenizer) if tokenizer is not None else 0}")
    return json.dumps(parts, sort_keys=True)


def scp_doc_id(text: str) -> str:
    """The document id of a stage-1 chunk: derived from its text, so it is stable when records move."""
    return SCP_DOC_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def scp_chunk(doc: Document, salt: str) -> Chunk:
    """A stage-1 chunk is its own document's only chunk, as is (not re-split)."""
    return Chunk(make_chunk_id(doc.doc_id, 0), doc.doc_id, 0, doc.text, content_hash(doc.text, salt))


def scp_documents(path: str | Path) -> Iterator[Document]:
    """The unique chunks (``docs[0]``) of a stage-1 (SCP) JSONL file as documents, in file order."""
    from clara.data.corpus import load_scp_chunks

    for text in load_scp_chunks(path):
        yield Document(doc_id=scp_doc_id(text), text=text)


def source_chunks(
    corpus: str | Path,
    tokenizer: Any,
    chunking: ChunkingSettings,
    salt: str,
    *,
    id_field: str = "id",
    text_field: str = "text",
    limit: int | None = None,
    keep_doc: Callable[[str], bool] | None = None,
) -> Iterator[Chunk]:
    """Chunks of the first ``limit`` documents of ``corpus`` (all when ``None``), in source order; with
    ``keep_doc``, only of the documents whose id it accepts (a shard's), chosen before they are tokenised.

    ``format="auto"``: JSONL, Parquet, ``.txt`` files or a directory of them (see
    :func:`clara.data.corpus.read_documents`), split into windows of ``chunk_tokens`` tokens sharing
    ``overlap``; with a ``title_field`` each chunk's text is ``title + "\\n" + window`` so the compressor
    sees which document it belongs to, and the window is narrower by the title line's tokens so the whole
    chunk stays within ``chunk_tokens`` (see :func:`clara.data.corpus.chunk_documents`). ``format="scp"``: the
    chunks of a stage-1 file, one per unique ``docs[0]``, not re-split, ``doc_id`` from :func:`scp_doc_id`,
    position 0.
    Malformed input raises :class:`~clara.data.corpus.DocumentError` naming file, line and field.
    """
    if chunking.format == "scp":
        docs: Iterable[Document] = scp_documents(corpus)
    else:
        docs = read_documents(corpus, id_field=id_field, text_field=text_field, title_field=chunking.title_field)
    if limit is not None:
        docs = itertools.islice(docs, limit)
    if keep_doc is not None:
        docs = (d for d in docs if keep_doc(d.doc_id))
    if chunking.format == "scp":
        for doc in docs:
            yield scp_chunk(doc, salt)
        return
    # documents are tokenised a few hundred at a time (one batched, multi-threaded call)
    yield from chunk_documents(docs, tokenizer, max_tokens=chunking.chunk_tokens, overlap=chunking.overlap,
                               salt=salt, titles=True)


# --------------------------------------------------------------------------------------------
# the plan


@dataclass
class IndexPlan:
    """What one run does: chunks to compress (new or changed), how many were unchanged, rows to delete."""

    to_compress: list[Chunk]
    read: int = 0
    docs: int = 0
    new: int = 0
    changed: int = 0
    skipped: int = 0
    #: Rows of the table that the source no longer has: positions past a document's new end, and
    #: (with ``delete_missing``) every chunk of a document gone from the source.
    stale_chunk_ids: list[str] = field(default_factory=list)
    #: Of those, the rows of documents gone from the source, and how many such documents.
    missing_rows: int = 0
    missing_docs: int = 0


def plan_index(chunks: Iterable[Chunk], existing: Mapping[str, str], *, delete_missing: bool = False) -> IndexPlan:
    """Diff source chunks against the table's ``{chunk_id: content_hash}``.

    Stale rows of documents present in the source (positions beyond where a shortened document now
    ends) are always deleted: they hold text the document no longer has. Rows of documents absent from
    the source are deleted only with ``delete_missing`` (so a partial run, e.g. ``limit``, loses nothing).
    Raises ``ValueError`` on a chunk id seen twice.
    """
    plan = IndexPlan(to_compress=[])
    seen: set[str] = set()
    docs: set[str] = set()
    for c in chunks:
        if c.chunk_id in seen:
            raise ValueError(f"chunk {c.chunk_id!r} (doc {c.doc_id!r}) appears twice in the source")
        seen.add(c.chunk_id)
        docs.add(c.doc_id)
        old = existing.get(c.chunk_id)
        if old == c.content_hash:
            plan.skipped += 1
            continue
        plan.to_compress.append(c)
        if c.chunk_id not in existing:  # (a row of the table without a hash is changed, not new)
            plan.new += 1
        else:
            plan.changed += 1
    plan.read, plan.docs = len(seen), len(docs)
    missing_docs: set[str] = set()
    for chunk_id in existing:
        if chunk_id in seen:
            continue
        try:
            doc_id = parse_chunk_id(chunk_id)[0]
        except ValueError:  # not an id this job writes: only a full-source run may remove it
            doc_id = None
        if doc_id in docs:
            plan.stale_chunk_ids.append(chunk_id)
        elif delete_missing:
            plan.stale_chunk_ids.append(chunk_id)
            plan.missing_rows += 1
            missing_docs.add(doc_id if doc_id is not None else chunk_id)
    plan.stale_chunk_ids.sort()
    plan.missing_docs = len(missing_docs)
    return plan


class DeletionGuardError(ValueError):
    """A run would delete more of the table than its ``max_delete_fraction`` allows; nothing was written.

    Why: a scheduled reindex with ``--delete-missing`` on a truncated corpus (3 documents) deleted
    11,447 of 11,450 rows, and served replicas picked that up within seconds. A corpus that shrank
    that much is far more often broken than meant.
    """

    def __init__(self, message: str, deleting: int, rows: int, max_fraction: float) -> None:
        super().__init__(message)
        self.deleting, self.rows, self.max_fraction = deleting, rows, max_fraction


def check_deletions(plan: IndexPlan, table_rows: int, max_fraction: float) -> None:
    """Raise :class:`DeletionGuardError` when ``plan`` deletes more than ``max_fraction`` of ``table_rows``.

    Call it before anything is written, so that a refused run leaves the table as it was. The message
    says why the rows would go (documents missing from the corpus, or shortened documents) and how to
    allow it (``--max-delete-fraction``, the flag of ``clara index``).
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be within [0, 1], got {max_fraction!r}")
    deleting = len(plan.stale_chunk_ids)
    if not deleting or deleting <= max_fraction * table_rows:
        return
    fraction = deleting / table_rows
    reasons = []
    if plan.missing_rows:
        reasons.append(f"{plan.missing_rows} rows of {plan.missing_docs} documents that are not in the corpus "
                       f"(--delete-missing)")
    if deleting - plan.missing_rows:
        reasons.append(f"{deleting - plan.missing_rows} rows past the new end of shortened documents")
    needed = math.ceil(fraction * 10_000) / 10_000
    raise DeletionGuardError(
        f"refusing to delete {deleting} of the table's {table_rows} rows ({fraction:.2%}), more than "
        f"--max-delete-fraction {max_fraction:g} allows: {' and '.join(reasons)}; the corpus had {plan.docs} "
        f"documents. Nothing was written. Check that the corpus is complete; if the deletion is intended, rerun "
        f"with --max-delete-fraction {needed:g} (or 1)",
        deleting=deleting, rows=table_rows, max_fraction=max_fraction,
    )


# --------------------------------------------------------------------------------------------
# the streamed plan: chunking and the diff on the workers

#: A chunk's status in the streamed plan; ``stale`` rows name a table row to delete (only ``chunk_id`` set),
#: an ``error`` row stands for a batch with a malformed record (its ``text``: the
#: :class:`~clara.data.corpus.DocumentError` as JSON, see :func:`plan_error`).
PLAN_STATUSES = ("new", "changed", "unchanged", "stale", "error")
#: The planner's output: the chunk columns, its status, where its record is (for error messages) and
#: :func:`doc_key` of its document.
PLAN_SCHEMA = pa.schema([
    ("chunk_id", pa.string()), ("doc_id", pa.string()), ("position", pa.int32()), ("text", pa.string()),
    ("content_hash", pa.string()), ("status", pa.string()), ("where", pa.string()), ("doc_key", pa.int64()),
])
#: Record layouts the planner reads, as Ray Data's readers give them, each with the file in a ``path``
#: column: ``jsonl``, ``scp`` and ``txt`` a ``bytes`` column, one file a row (``read_binary_files``: JSONL
#: errors then name file and line, as the driver's reader does), ``parquet`` the id / text / title columns
#: (``read_parquet``, a row group at a time: errors name file and record id).
RECORD_KINDS = ("jsonl", "scp", "parquet", "txt")
#: The plan's statuses counted in :class:`IndexPlan` fields.
STATUS_FIELDS = {"new": "new", "changed": "changed", "unchanged": "skipped"}


def doc_key(doc_id: str) -> int:
    """A 63-bit hash of a document id: the driver of a streamed run holds one per document (8 bytes) to find
    duplicate ids and, with ``delete_missing``, the table's documents that the corpus no longer has."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _row_where(path: str, rec: dict, id_field: str) -> str:
    if isinstance(rec.get(id_field), (str, int)):
        return f"{path}: record {id_field}={rec[id_field]!r}"
    return f"{path}: record {json.dumps(rec, default=str)[:60]!r}"


def plan_error(row_text: str) -> DocumentError:
    """The :class:`~clara.data.corpus.DocumentError` of a plan's ``error`` row."""
    e = json.loads(row_text)
    return DocumentError(e["where"], e["field"], e["msg"])


class ChunkPlanner:
    """Turns a batch of source records into chunks and diffs them against the table: the index job's plan,
    computed on the workers so that the driver never holds a hash per chunk.

    Called on a pyarrow Table of records in one of :data:`RECORD_KINDS`, returns :data:`PLAN_SCHEMA` rows:
    each chunk of the batch's documents with its status against the table (``new``, ``changed``,
    ``unchanged``: its text left out, it is not compressed), and a ``stale`` row for each table row of these
    documents past their new end. All chunks of a document come from one record, so they are planned in
    one call, and the table is asked only about the batch's documents (a filtered read on ``doc_id``; see
    :meth:`~clara.index.store.ChunkStore.create_scalar_indices`). Documents whose :func:`doc_key` falls
    outside ``keep_doc`` (another shard) are dropped before they are tokenised. A malformed record (or an id
    seen twice in the batch; the driver finds duplicates across batches) makes the batch's plan one ``error``
    row holding the :class:`~clara.data.corpus.DocumentError` that names the file, the record and the field.
    """

    def __init__(
        self,
        model_dir: str | Path,
        chunking: ChunkingSettings,
        salt: str,
        *,
        kind: str,
        table_uri: str,
        table_name: str,
        storage_options: dict[str, str] | None = None,
        id_field: str = "id",
        text_field: str = "text",
        base: str = "",
        keep_doc: Callable[[str], bool] | None = None,
        table_exists: bool = False,
    ) -> None:
        if kind not in RECORD_KINDS:
            raise ValueError(f"kind must be one of {RECORD_KINDS}, got {kind!r}")
        if (kind == "scp") != (chunking.format == "scp"):
            raise ValueError(f"records of kind {kind!r} with chunking format {chunking.format!r}")
        self.chunking, self.salt, self.kind = chunking, salt, kind
        self.id_field, self.text_field, self.base, self.keep_doc = id_field, text_field, base, keep_doc
        self.tokenizer = None if kind == "scp" else load_chunk_tokenizer(model_dir)
        try:
            self.store: ChunkStore | None = ChunkStore.open(table_uri, None, table=table_name, create=False,
                                                            storage_options=storage_options)
        except IndexNotFoundError:
            if table_exists:  # not "empty": every chunk would be compressed again, stale rows kept
                raise IndexNotFoundError(f"{table_uri}/{table_name}: the driver sees the table, this worker does "
                                         "not; give a URI or path that every node can read") from None
            self.store = None  # the first run: every chunk is new

    def documents(self, batch: pa.Table) -> list[tuple[str, Document]]:
        """``(where, document)`` of each record of the batch, validated."""
        paths = batch.column("path").to_pylist()
        out: list[tuple[str, Document]] = []
        if self.kind == "parquet":
            for path, rec in zip(paths, batch.drop_columns(["path"]).to_pylist()):
                where = _row_where(path, rec, self.id_field)
                out.append((where, document_from_record(rec, where, self.id_field, self.text_field,
                                                        self.chunking.title_field)))
            return out
        for path, raw in zip(paths, batch.column("bytes").to_pylist()):
            if self.kind == "txt":
                out.append((f"{path}:1", text_file_document(raw, path, text_file_id(path, self.base))))
                continue
            for where, rec in parse_jsonl(jsonl_lines(raw), path, DocumentError):
                if self.kind == "scp":
                    text = scp_chunk_text(rec, where)
                    out.append((where, Document(doc_id=scp_doc_id(text), text=text)))
                else:
                    out.append((where, document_from_record(rec, where, self.id_field, self.text_field,
                                                            self.chunking.title_field)))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        try:
            return self._plan(batch)
        except DocumentError as e:  # as data: an exception would reach the driver as Ray's wrapped text
            return pa.table({"chunk_id": [""], "doc_id": [""], "position": [-1], "text": [json.dumps(
                {"where": e.where, "field": e.field, "msg": e.msg})], "content_hash": [""], "status": ["error"],
                "where": [e.where], "doc_key": [0]}, schema=PLAN_SCHEMA)

    def _plan(self, batch: pa.Table) -> pa.Table:
        where_of: dict[str, str] = {}
        docs: list[Document] = []
        for where, doc in self.documents(batch):
            if self.keep_doc is not None and not self.keep_doc(doc.doc_id):
                continue
            if doc.doc_id in where_of:
                if self.kind == "scp":  # the same chunk in several records (one per question)
                    continue
                raise DocumentError(where, self.id_field,
                                    f"duplicate id {doc.doc_id!r} (first seen at {where_of[doc.doc_id]})")
            where_of[doc.doc_id] = where
            docs.append(doc)
        if self.kind == "scp":
            chunks = [scp_chunk(d, self.salt) for d in docs]
        else:
            chunks = list(chunk_documents(docs, self.tokenizer, max_tokens=self.chunking.chunk_tokens,
                                          overlap=self.chunking.overlap, salt=self.salt, titles=True))
        existing = self.store.hashes_of_docs(where_of) if self.store is not None and where_of else {}
        plan = plan_index(chunks, existing)
        pending = {c.chunk_id for c in plan.to_compress}
        rows: dict[str, list] = {name: [] for name in PLAN_SCHEMA.names}
        for c in chunks:
            status = ("changed" if c.chunk_id in existing else "new") if c.chunk_id in pending else "unchanged"
            for name, value in (("chunk_id", c.chunk_id), ("doc_id", c.doc_id), ("position", c.position),
                                ("text", c.text if status != "unchanged" else ""), ("content_hash", c.content_hash),
                                ("status", status), ("where", where_of[c.doc_id]), ("doc_key", doc_key(c.doc_id))):
                rows[name].append(value)
        for chunk_id in plan.stale_chunk_ids:
            for name, value in (("chunk_id", chunk_id), ("doc_id", ""), ("position", -1), ("text", ""),
                                ("content_hash", ""), ("status", "stale"), ("where", ""), ("doc_key", 0)):
                rows[name].append(value)
        return pa.table(rows, schema=PLAN_SCHEMA)


def chunks_table(chunks: Sequence[Chunk]) -> pa.Table:
    """The compressor's input: one row per chunk, columns :data:`CHUNK_COLUMNS`."""
    return pa.table({
        "chunk_id": pa.array([c.chunk_id for c in chunks], pa.string()),
        "doc_id": pa.array([c.doc_id for c in chunks], pa.string()),
        "position": pa.array([c.position for c in chunks], pa.int32()),
        "text": pa.array([c.text for c in chunks], pa.string()),
        "content_hash": pa.array([c.content_hash for c in chunks], pa.string()),
    })


def work_blocks(
    chunks: Sequence[Chunk], batch_size: int, workers: int, max_batches_per_block: int = 8
) -> list[pa.Table]:
    """Split chunks into input blocks for the worker pool, sorted by text length so each batch pads little.

    Each block holds whole batches (a multiple of ``batch_size`` rows, up to ``max_batches_per_block``)
    and there are at least ~4 blocks per worker when there is enough work, so the pool stays busy.
    """
    if batch_size <= 0 or workers <= 0:
        raise ValueError(f"batch_size and workers must be positive, got {batch_size}, {workers}")
    ordered = sorted(chunks, key=lambda c: len(c.text))
    n_batches = -(-len(ordered) // batch_size)
    per_block = max(1, min(max_batches_per_block, n_batches // (4 * workers)))
    rows = per_block * batch_size
    return [chunks_table(ordered[i : i + rows]) for i in range(0, len(ordered), rows)]


# --------------------------------------------------------------------------------------------
# compressing: the body of the worker


class ChunkCompressor:
    """Loads a CLaRa model once; called on a batch of chunk rows, returns encoded index rows.

    Input: a pyarrow Table with :data:`CHUNK_COLUMNS`. Output: a pyarrow Table in the index layout
    (:func:`clara.index.store.index_schema`), memory in the storage dtype and the ``key`` column filled, so the
    quantisation and projection run in the workers, not on the writer.
    """

    def __init__(
        self,
        model_dir: str | Path,
        settings: StoreSettings,
        *,
        device: str | None = None,
        batch_size: int = 32,
        threads: int | None = None,
        key_basis: KeyBasis | None = None,
    ) -> None:
        import torch

        from clara.config import resolve_dtype
        from clara.model import ClaraModel

        check_key_basis(settings, key_basis)
        if threads:
            torch.set_num_threads(int(threads))
        self.settings = settings
        self.key_basis = key_basis
        self.batch_size = batch_size
        # Loaded on the CPU in float32 first: the compressor version is a digest of the weights, and
        # from_pretrained(device="cuda") casts them to bf16 before it checks the digest (and fails).
        self.model = ClaraModel.from_pretrained(model_dir, device="cpu")
        version = self.model.compressor_version()
        shape = (self.model.config.n_mem, self.model.hidden_size)
        if version != settings.compressor_version or shape != (settings.n_mem, settings.d):
            raise IndexMismatchError(
                f"{model_dir}: compressor {version} with memory {shape} does not match the index's "
                f"{settings.compressor_version} with memory {(settings.n_mem, settings.d)}"
            )
        target = torch.device(device or "cpu")
        if target.type != "cpu":
            self.model.to(device=target, dtype=resolve_dtype(self.model.config.dtype, target))
        self.batches = 0

    def compress_rows(self, batch: pa.Table | pa.RecordBatch) -> tuple[pa.Table, Any]:
        """``(rows, memory)``: the batch's :data:`CHUNK_COLUMNS`, sorted by text length, and their memory
        (``[n, n_mem, d]``, the model's dtype), not yet encoded."""
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        # by length, so that each forward pass pads little (a streamed run's batches come in source order)
        batch = batch.take(pa.compute.sort_indices(pa.compute.utf8_length(batch.column("text"))))
        memory = self.model.compress(batch.column("text").to_pylist(), batch_size=self.batch_size)  # (n, M, D)
        self.batches += 1
        return batch.select(list(CHUNK_COLUMNS)), memory

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        rows, memory = self.compress_rows(batch)
        return encode_batch(rows, memory, self.settings, key_basis=self.key_basis)


# --------------------------------------------------------------------------------------------
# writing


@dataclass
class WriteStats:
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    bytes: int = 0
    commits: int = 0
    version: int = 0


class IndexWriter:
    """Upserts encoded rows into a :class:`~clara.index.store.ChunkStore`, ``commit_rows`` or more per commit.

    Each commit is one ``merge_insert`` keyed on ``chunk_id`` (atomic, one table version). ``on_commit``
    is called with the running :class:`WriteStats` after each commit.

    ``new_only``: every row given is a chunk the table did not hold when the run was planned (a plan with
    new chunks and no changed ones: a first run, or a corpus that only grew). Commits then append
    (:meth:`~clara.index.store.ChunkStore.append`) instead of joining each against the table, whose memory
    grows with the rows written. That holds while this writer is the table's only writer: before each
    append it compares the table's latest version with the one it last saw, and after it checks that its
    commit came next; at the first sign of another writer it upserts from then on (and says so).
    """

    def __init__(self, store: ChunkStore, commit_rows: int = 8192,
                 on_commit: Callable[[WriteStats], None] | None = None, *, new_only: bool = False) -> None:
        if commit_rows <= 0:
            raise ValueError(f"commit_rows must be positive, got {commit_rows}")
        self.store = store
        self.commit_rows = commit_rows
        self.on_commit = on_commit
        self.new_only = new_only
        self.stats = WriteStats(version=store.version)
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def add(self, rows: pa.Table | pa.RecordBatch) -> None:
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        if rows.num_rows == 0:
            return
        self._buffer.append(rows)
        self._buffered += rows.num_rows
        if self._buffered >= self.commit_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        if self.new_only and self.store.latest_version() != self.stats.version:
            self._another_writer(f"the table moved from version {self.stats.version} to {self.store.version}")
        if self.new_only:
            seen = self.stats.version
            result = self.store.append(data)
            if result.version != seen + 1:
                self._another_writer(f"this commit made version {result.version} after {seen}")
        else:
            result = self.store.upsert(data)
        self._buffer, self._buffered = [], 0
        s = self.stats
        s.rows += data.num_rows
        s.inserted += result.inserted
        s.updated += result.updated
        s.bytes += data.nbytes
        s.commits += 1
        s.version = result.version
        if self.on_commit is not None:
            self.on_commit(s)

    def _another_writer(self, why: str) -> None:
        logger.warning("index writer: another writer is writing to the table (%s); upserting from now on "
                       "(runs at once on one table are not supported: a chunk id may have been written twice)", why)
        self.new_only = False


# --------------------------------------------------------------------------------------------
# the ANN index


#: ``--ann-index auto`` builds an index from this many rows on: LanceDB's scan of float keys without one took
#: 242 ms a query at 10^6 rows (128-d; benchmarks/results/bench_search_1e6_pca128_profile_*), so ~24 ms at 10^5
#: if linear; IVF_SQ took 25-31 ms at 10^6.
AUTO_ANN_ROWS = 100_000
#: ... and of this kind: a scan of every key in int8 (``ChunkStore.create_ann_index``), built in seconds.
AUTO_ANN_KIND = "IVF_SQ"


def auto_ann_kind(store: ChunkStore, min_rows: int = AUTO_ANN_ROWS) -> str | None:
    """The ANN index ``--ann-index auto`` keeps on ``store``: the kind already built on ``key`` if any (a
    user's choice stands), else :data:`AUTO_ANN_KIND` once the table holds ``min_rows`` rows, else none."""
    key_index = next((i for i in store.list_indices() if list(i.columns) == ["key"]), None)
    if key_index is not None:
        built = str(getattr(store.table.index_stats(key_index.name), "index_type", "") or "").upper()
        if built in ANN_KINDS:
            return built
    return AUTO_ANN_KIND if store.count() >= min_rows else None


def refresh_ann_index(store: ChunkStore, kind: str, *, min_rows: int = 256, rebuild_factor: float = 2.0,
                      metric: str = "cosine") -> str:
    """Build the ANN index on ``key`` if there is none, else fold new rows into it; returns what was done.

    The index is rebuilt when it is of another kind than ``kind``, or when the table has grown
    ``rebuild_factor`` times past the rows it was trained on (its partitions were sized for the old
    table), or when it is an IVF_SQ index of more partitions than a search probes by default. With fewer
    than ``min_rows`` rows nothing is built: searches scan, which is exact and fast at that size.
    """
    kind = kind.upper()
    if kind not in ANN_KINDS:
        raise ValueError(f"ANN index kind must be one of {ANN_KINDS}, got {kind!r}")
    key_index = next((i for i in store.list_indices() if list(i.columns) == ["key"]), None)
    n = store.count()
    if key_index is None:
        return store.create_ann_index(kind, metric, min_rows=min_rows).message
    stats = store.table.index_stats(key_index.name)
    indexed = int(getattr(stats, "num_indexed_rows", 0) or 0)
    built_kind = str(getattr(stats, "index_type", "") or "").upper()
    t0 = time.perf_counter()
    if built_kind != kind:
        report = store.create_ann_index(kind, metric, min_rows=min_rows)
        return f"replaced {built_kind or 'the old index'}: {report.message}"
    if indexed and n > rebuild_factor * indexed:
        report = store.create_ann_index(kind, metric, min_rows=min_rows)
        return f"retrained: {report.message}"
    parts = _partitions(store, key_index.name) if kind == "IVF_SQ" else None
    if parts is not None and parts > SCAN_MAX_PARTITIONS:
        # built before IVF_SQ was a scan (sqrt(rows) partitions): a search's default probes would miss keys
        report = store.create_ann_index(kind, metric, min_rows=min_rows)
        return f"retrained ({parts} partitions, more than a search probes): {report.message}"
    store.optimize()
    return f"folded new rows into {key_index.name} ({n} rows) in {time.perf_counter() - t0:.1f}s"


def _partitions(store: ChunkStore, index_name: str) -> int | None:
    """IVF partitions of the index ``index_name`` (None where Lance does not say)."""
    try:
        return int(store.table.to_lance().stats.index_stats(index_name)["indices"][0]["num_partitions"])
    except Exception as exc:  # a statistic, never fatal
        logger.debug("could not read the partitions of %s: %s", index_name, exc)
        return None


def refresh_text_index(store: ChunkStore) -> str:
    """Build the full-text (BM25) index on ``text`` if there is none, else fold unindexed rows into it
    (rows not yet folded in are searched anyway, by a slower scan); returns what was done."""
    t0 = time.perf_counter()
    index = next((i for i in store.list_indices()
                  if list(i.columns) == ["text"] and str(i.index_type).upper() in ("FTS", "INVERTED")), None)
    if index is None:
        store.create_text_index()
        return f"built on {store.count()} rows in {time.perf_counter() - t0:.1f}s"
    unindexed = int(getattr(store.table.index_stats(index.name), "num_unindexed_rows", 0) or 0)
    if not unindexed:
        return "up to date"
    store.optimize()
    return f"folded {unindexed} new rows in {time.perf_counter() - t0:.1f}s"


# --------------------------------------------------------------------------------------------
# tags and cleanup of old versions

#: Tags this job puts on versions: ``index-v<N>`` (the version a run ended on) and ``rollback-v<N>``.
JOB_TAG = re.compile(r"^(index|rollback)-v(\d+)$")


def tag_version(store: ChunkStore, kind: str = "index") -> str | None:
    """Tag the store's current version ``<kind>-v<version>`` unless it already has a tag; returns the new tag.

    Why: every commit is a version, and a run makes one per ``commit_rows``; the one it ended on is
    the complete table worth keeping. :func:`cleanup_index` removes untagged versions and keeps
    tagged ones, so the finished runs stay restorable while the partial commits between them go.
    """
    if kind not in ("index", "rollback"):
        raise ValueError(f"kind must be 'index' or 'rollback', got {kind!r}")
    version = store.version
    if version in store.tags().values():
        return None
    name = f"{kind}-v{version}"
    store.tag(name, version)
    return name


@dataclass(frozen=True)
class CleanupSummary:
    """What :func:`cleanup_index` did."""

    versions_removed: int
    bytes_removed: int
    tags_removed: list[str]
    versions_left: list[int]
    tags: dict[str, int]

    def format(self) -> str:
        dropped = f", dropped tags {', '.join(self.tags_removed)}" if self.tags_removed else ""
        tagged = ", ".join(f"{t}={v}" for t, v in sorted(self.tags.items(), key=lambda kv: kv[1])) or "none"
        return (f"removed {self.versions_removed} versions ({self.bytes_removed / 2**20:.1f} MiB){dropped}; "
                f"{len(self.versions_left)} versions left: {self.versions_left} (tagged: {tagged})")


def cleanup_index(store: ChunkStore, older_than: dt.timedelta, keep_tags: int | None = None) -> CleanupSummary:
    """Remove the table's untagged versions older than ``older_than`` (the latest always stays).

    Tagged versions are kept. With ``keep_tags``, only the newest ``keep_tags`` of this job's tags
    (:data:`JOB_TAG`) are kept and older ones are removed first, so their versions go too: without
    it, storage still grows by one run's changes per run. Tags made by hand are never removed.
    """
    if keep_tags is not None and keep_tags < 0:
        raise ValueError(f"keep_tags must be >= 0, got {keep_tags}")
    removed: list[str] = []
    if keep_tags is not None:
        job_tags = sorted((v, t) for t, v in store.tags().items() if JOB_TAG.match(t))
        for _, name in job_tags[: max(0, len(job_tags) - keep_tags)]:
            store.untag(name)
            removed.append(name)
    report: CleanupReport = store.cleanup_versions(older_than)
    return CleanupSummary(report.versions_removed, report.bytes_removed, removed, report.versions_left, store.tags())


__all__ = [
    "CHUNK_COLUMNS",
    "JOB_TAG",
    "PLAN_SCHEMA",
    "PLAN_STATUSES",
    "RECORD_KINDS",
    "SOURCE_FORMATS",
    "STATUS_FIELDS",
    "ChunkCompressor",
    "ChunkPlanner",
    "ChunkingSettings",
    "CleanupSummary",
    "CompressorInfo",
    "DeletionGuardError",
    "DocumentError",
    "IndexPlan",
    "IndexWriter",
    "WriteStats",
    "check_deletions",
    "chunking_salt",
    "chunks_table",
    "cleanup_index",
    "default_key_dim",
    "doc_key",
    "load_chunk_tokenizer",
    "load_tokenizer",
    "plan_error",
    "plan_index",
    "read_compressor_info",
    "refresh_ann_index",
    "refresh_text_index",
    "scp_chunk",
    "scp_doc_id",
    "scp_documents",
    "source_chunks",
    "store_settings_for",
    "tag_version",
    "work_blocks",
]
