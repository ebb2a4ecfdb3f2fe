"""The table: :class:`ChunkStore` opens, upserts, searches, deletes, versions and cleans up one LanceDB
table of the schema in :mod:`clara.index.schema` (rows encoded by :mod:`clara.index.codec`).

``lancedb`` is imported lazily; this module never imports ``ray`` or ``torch``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clara.data.corpus import content_hash  # the one formula: rows written here and by the index job compare alike
from clara.index.codec import (
    KeyBasis,
    _as_float32,
    _columns_of,
    _decode_memory,
    _memory_column_to_numpy,
    _name_ids,
    _validate_encoded,
    _validate_meta,
    check_key_basis,
    dequantize_int8,
    encode_batch,
    fit_key_basis,
    flat_cosine,
    key_projection,
    project_keys,
    quantize_int8,
    to_float16,
    token_rotation,
)
from clara.index.schema import (
    _ID_BATCH,
    ANN_KINDS,
    DEFAULT_TABLE,
    DTYPES,
    METADATA_KEY,
    METRICS,
    IndexMismatchError,
    IndexNotFoundError,
    StoreSettings,
    TextIndexMissingError,
    index_schema,
    key_basis_table,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# the store


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    updated: int
    version: int


@dataclass
class SearchResult:
    """Top-k chunks for one query, best first."""

    chunk_ids: list[str]
    doc_ids: list[str]
    texts: list[str]
    #: [k] float32, descending: the exact CLaRa cosine (:meth:`ChunkStore.search`), BM25
    #: (:meth:`ChunkStore.text_search`) or the fused rank score (:meth:`ChunkStore.hybrid_search`).
    scores: np.ndarray
    memory: np.ndarray  # [k, n_mem, d] float32 (dequantised)

    def __len__(self) -> int:
        return len(self.chunk_ids)


@dataclass(frozen=True)
class CleanupReport:
    """What :meth:`ChunkStore.cleanup_versions` removed, and the versions left."""

    versions_removed: int
    bytes_removed: int
    versions_left: list[int]


@dataclass(frozen=True)
class IndexReport:
    created: bool
    kind: str
    metric: str
    num_rows: int
    num_partitions: int | None = None
    scalar_columns: tuple[str, ...] = ()
    message: str = ""


#: ``IVF_SQ`` is built as a quantised scan of the key (benchmarks/bench_search.py: on a 128-d fitted key,
#: 10^6 rows, every key scanned in int8 and 20-50 candidates re-scored: recall@10 0.98-1.00 at ~10x less
#: latency than a brute force over the memories in RAM, built in ~10 s): partitions of this many rows ...
SCAN_PARTITION_ROWS = 250_000
#: ... and no more partitions than LanceDB probes by default (its minimum_nprobes, 20), so that a search
#: that sets no ``nprobes`` scans them all. Pass ``num_partitions`` / ``nprobes`` to scan a fraction.
SCAN_MAX_PARTITIONS = 20

#: Columns with a B-tree index: the upserts' key and the index job's lookups of a batch's documents.
SCALAR_COLUMNS = ("chunk_id", "doc_id")


def default_partitions(kind: str, rows: int) -> int:
    """IVF partitions of a ``kind`` index on ``rows`` rows when the caller names none (see
    :meth:`ChunkStore.create_ann_index`)."""
    if "HNSW" in kind:
        return max(1, math.ceil(rows / 1_000_000))
    if kind == "IVF_SQ":
        return min(SCAN_MAX_PARTITIONS, max(1, math.ceil(rows / SCAN_PARTITION_ROWS)))
    return max(1, min(int(math.sqrt(rows)), rows // 256))


def _expr_in(column: str, values: Iterable[str]):
    """``column IN (values)`` as a lancedb expression: the values are literals, never spliced into SQL."""
    from lancedb.expr import col

    return col(column).isin(list(values))


def _ann_config(kind: str, metric: str, num_partitions: int | None, num_sub_vectors: int | None, **extra: Any):
    from lancedb import index as idx

    classes = {
        "IVF_FLAT": idx.IvfFlat,
        "IVF_SQ": idx.IvfSq,
        "IVF_PQ": idx.IvfPq,
        "IVF_RQ": idx.IvfRq,
        "IVF_HNSW_FLAT": idx.HnswFlat,
        "IVF_HNSW_SQ": idx.HnswSq,
        "IVF_HNSW_PQ": idx.HnswPq,
    }
    kwargs: dict[str, Any] = {"distance_type": metric, **extra}
    if num_partitions is not None:
        kwargs["num_partitions"] = num_partitions
    if num_sub_vectors is not None and kind in ("IVF_PQ", "IVF_HNSW_PQ"):
        kwargs["num_sub_vectors"] = num_sub_vectors
    return classes[kind](**kwargs)


def reciprocal_rank_fusion(latent: np.ndarray, text: np.ndarray, text_weight: float = 1.0,
                           rrf_k: int = 60) -> np.ndarray:
    """Fused scores of ``n`` candidates: ``1 / (rrf_k + latent rank) + text_weight / (rrf_k + text rank)``,
    ranks 1-based by descending score (ties by position); a NaN text score (not returned by the text
    search) adds no text term. The one fusion formula of hybrid retrieval, served and evaluated."""
    latent, text = np.asarray(latent, np.float64), np.asarray(text, np.float64)
    if latent.shape != text.shape or latent.ndim != 1:
        raise ValueError(f"latent and text scores must be two [n] arrays, got {latent.shape} and {text.shape}")
    fused = np.zeros(len(latent))
    fused[np.argsort(-latent, kind="stable")] = 1.0 / (rrf_k + np.arange(1, len(latent) + 1))
    hit = np.flatnonzero(~np.isnan(text))
    order = hit[np.argsort(-text[hit], kind="stable")]
    fused[order] += text_weight / (rrf_k + np.arange(1, len(order) + 1))
    return fused


def fuse_candidates(query: np.ndarray, latent: SearchResult, text: SearchResult, k: int, text_weight: float = 1.0,
                    rrf_k: int = 60) -> SearchResult:
    """One question's hybrid top-``k``: the union of its latent and BM25 candidates, re-scored exactly on
    their memories (CLaRa cosine with ``query`` ``[n_mem, d]``) and ranked by :func:`reciprocal_rank_fusion`
    of that cosine and BM25 (no BM25 term for a chunk BM25 did not return)."""
    ids, docs, texts = list(latent.chunk_ids), list(latent.doc_ids), list(latent.texts)
    seen = set(ids)
    extra = [i for i, c in enumerate(text.chunk_ids) if c not in seen]
    ids += [text.chunk_ids[i] for i in extra]
    docs += [text.doc_ids[i] for i in extra]
    texts += [text.texts[i] for i in extra]
    if not ids:
        return SearchResult([], [], [], np.zeros(0, np.float32), np.zeros((0, *query.shape), np.float32))
    memory = np.concatenate([latent.memory.reshape(-1, *query.shape), text.memory[extra].reshape(-1, *query.shape)])
    bm25 = dict(zip(text.chunk_ids, text.scores))
    fused = reciprocal_rank_fusion(flat_cosine(query, memory)[0], np.array([bm25.get(c, np.nan) for c in ids]),
                                   text_weight, rrf_k).astype(np.float32)
    order = np.argsort(-fused, kind="stable")[:k]
    return SearchResult([ids[i] for i in order], [docs[i] for i in order], [texts[i] for i in order], fused[order],
                        memory[order])


def hybrid_search(store: Any, q: np.ndarray, questions: Sequence[str], k: int, candidates: int,
                  text_candidates: int | None, text_weight: float, rrf_k: int, filter: str | None,
                  ann: dict[str, Any]) -> list[SearchResult]:
    """The hybrid search of a store (:class:`ChunkStore` or a sharded one: anything with ``search`` and
    ``text_search``) for query memories ``q`` ``[B, n_mem, d]``: see :meth:`ChunkStore.hybrid_search`."""
    questions = list(questions)
    if len(questions) != len(q):
        raise ValueError(f"{len(q)} query memories but {len(questions)} questions")
    if k <= 0:
        raise ValueError("k must be positive")
    if text_weight < 0 or rrf_k < 0:
        raise ValueError(f"text_weight and rrf_k must be >= 0, got {text_weight}, {rrf_k}")
    pool = max(int(candidates), int(k))
    latent = store.search(q, k=pool, candidates=pool, filter=filter, **ann)
    text = store.text_search(questions, int(text_candidates or pool), filter=filter)
    return [fuse_candidates(q[b], lat, txt, int(k), text_weight, rrf_k) for b, (lat, txt) in
            enumerate(zip(latent, text))]


def memory_in_order(found: dict[str, np.ndarray], chunk_ids: Sequence[str], settings: StoreSettings) -> np.ndarray:
    """``float32 [n, n_mem, d]`` of ``chunk_ids`` in order from ``found`` (``find_memory``'s answer of a table
    or of shards); KeyError names the ids not found."""
    missing = [c for c in dict.fromkeys(chunk_ids) if c not in found]
    if missing:
        raise KeyError(f"chunks not in the index: {_name_ids(missing)}")
    if not chunk_ids:
        return np.zeros((0, settings.n_mem, settings.d), np.float32)
    return np.stack([found[c] for c in chunk_ids])


def merge_results(parts: Sequence[SearchResult], k: int) -> SearchResult:
    """The top-``k`` of several :class:`SearchResult` of one query (shards), by score; each part is sorted."""
    ids = [c for p in parts for c in p.chunk_ids]
    if not ids:
        return parts[0] if parts else SearchResult([], [], [], np.zeros(0, np.float32), np.zeros((0, 0, 0)))
    docs = [d for p in parts for d in p.doc_ids]
    texts = [t for p in parts for t in p.texts]
    scores = np.concatenate([p.scores for p in parts if len(p)])
    memory = np.concatenate([p.memory for p in parts if len(p)])
    order = np.argsort(-scores, kind="stable")[:k]
    return SearchResult([ids[i] for i in order], [docs[i] for i in order], [texts[i] for i in order],
                        scores[order].astype(np.float32), memory[order])


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first."""
    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.argsort(-scores[part], kind="stable")]
    return np.argsort(-scores, kind="stable")


class ChunkStore:
    """One LanceDB table of compressed chunks. Create with :meth:`ChunkStore.open`."""

    def __init__(self, db: Any, table: Any, settings: StoreSettings, uri: str, name: str,
                 key_basis: KeyBasis | None = None) -> None:
        check_key_basis(settings, key_basis)
        self._db = db
        self._table = table
        self.settings = settings
        #: The fitted key projection when ``settings.key_basis`` names one (else None: random keys).
        self.key_basis = key_basis
        self.uri = uri
        self.name = name
        self._metric = self._detect_metric()

    # ---- opening

    @classmethod
    def open(
        cls,
        uri: Any,
        settings: StoreSettings | None = None,
        table: str = DEFAULT_TABLE,
        create: bool = True,
        *,
        read_consistency_interval: _dt.timedelta | None = None,
        storage_options: dict[str, str] | None = None,
        key_basis: KeyBasis | None = None,
    ) -> ChunkStore:
        """Open (or create) the chunk table ``table`` in the LanceDB database at ``uri``.

        An existing table's settings come from its schema metadata; if ``settings`` is given and differs
        in shape, compressor version, dtype or key, :class:`IndexMismatchError` names the fields.

        A table whose keys use a fitted :class:`~clara.index.codec.KeyBasis` (``settings.key_basis``, a
        digest) keeps it in the table ``<table>-keybasis``: creating one needs ``key_basis`` (written
        before the chunk table, so that a chunk table never exists without its basis); opening one reads
        it back and checks its digest.
        """
        import lancedb

        uri = str(uri)
        kwargs: dict[str, Any] = {}
        if read_consistency_interval is not None:
            kwargs["read_consistency_interval"] = read_consistency_interval
        if storage_options:
            kwargs["storage_options"] = storage_options
        db = lancedb.connect(uri, **kwargs)
        tbl = cls._try_open(db, table)
        if tbl is None:
            if not create:
                raise IndexNotFoundError(f"no chunk table {table!r} in {uri} (and create=False)")
            if settings is None:
                raise IndexNotFoundError(f"no chunk table {table!r} in {uri}; pass settings to create it")
            check_key_basis(settings, key_basis)
            if key_basis is not None:
                cls._write_key_basis(db, table, key_basis)
            try:
                tbl = db.create_table(table, schema=index_schema(settings))
                logger.info("created chunk table %r in %s (%s)", table, uri, settings)
            except Exception:  # lost a race with another creator: open theirs, then check it below
                tbl = cls._try_open(db, table)
                if tbl is None:
                    raise
        stored = StoreSettings.from_metadata(tbl.schema.metadata)
        if settings is not None:
            diff = settings.differences(stored)
            if diff:
                detail = ", ".join(
                    f"{f}: table {getattr(stored, f)!r} != requested {getattr(settings, f)!r}" for f in diff
                )
                raise IndexMismatchError(f"chunk table {table!r} in {uri} was built with other settings ({detail})")
        expected = index_schema(stored)
        actual = tbl.schema
        if actual.names != expected.names or any(not actual.field(f.name).type.equals(f.type) for f in expected):
            raise IndexMismatchError(f"chunk table {table!r} has schema {actual}, expected {expected}")
        basis = cls._read_key_basis(db, table, stored) if stored.key_basis else None
        if key_basis is not None and (basis is None or basis.digest != key_basis.digest):
            raise IndexMismatchError(f"chunk table {table!r} in {uri} has "
                                     f"{'key basis ' + basis.digest if basis else 'random keys'}, not key basis "
                                     f"{key_basis.digest}")
        return cls(db, tbl, stored, uri, table, basis)

    @classmethod
    def _write_key_basis(cls, db: Any, table: str, basis: KeyBasis) -> None:
        name = key_basis_table(table)
        existing = cls._try_open(db, name)
        if existing is not None:  # a run that stopped between the two tables (a refit of its sample gives the
            # same basis), another creator at the same moment, or a chunk table dropped without its basis
            digests = set(existing.to_arrow().column("digest").to_pylist())
            if digests == {basis.digest}:
                return
            raise IndexMismatchError(
                f"{name!r} already holds key basis {sorted(digests)}, not {basis.digest}: another job is creating "
                f"{table!r} with its own basis, or a dropped table left it; if no chunk table {table!r} uses it, "
                f"drop {name!r} and rerun")
        db.create_table(name, data=basis.to_rows())
        logger.info("wrote key basis %s to table %r", basis.digest, name)

    @classmethod
    def _read_key_basis(cls, db: Any, table: str, settings: StoreSettings) -> KeyBasis:
        tbl = cls._try_open(db, key_basis_table(table))
        if tbl is None:
            raise IndexMismatchError(f"chunk table {table!r} uses key basis {settings.key_basis}, but its table "
                                     f"{key_basis_table(table)!r} is missing")
        basis = KeyBasis.from_rows(tbl.to_arrow())
        if basis.digest != settings.key_basis:
            raise IndexMismatchError(f"{key_basis_table(table)!r} holds key basis {basis.digest}, the chunk table "
                                     f"{table!r} was built with {settings.key_basis}")
        return basis

    @staticmethod
    def _try_open(db: Any, name: str) -> Any:
        try:
            return db.open_table(name)
        except ValueError as exc:  # lancedb: "Table 'x' was not found"
            if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
                return None
            raise
        except FileNotFoundError:
            return None

    @property
    def table(self) -> Any:
        """The underlying lancedb table (for callers that need an API this class does not wrap)."""
        return self._table

    def __repr__(self) -> str:
        return f"ChunkStore(uri={self.uri!r}, table={self.name!r}, settings={self.settings!r})"

    def __len__(self) -> int:
        return self.count()

    # ---- writing

    def encode(self, chunks: Any, memory: Any, *, indexed_at: _dt.datetime | None = None) -> pa.Table:
        """:func:`encode_batch` with this store's settings."""
        return encode_batch(chunks, memory, self.settings, key_basis=self.key_basis, indexed_at=indexed_at)

    def _prepare(self, rows: Any) -> pa.Table:
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        if isinstance(rows, pa.Table):
            if "key" in rows.column_names:
                return _validate_encoded(rows, self.settings)
            if "memory" not in rows.column_names:
                raise ValueError("rows need a 'memory' column")
            ids = rows.column("chunk_id").to_pylist() if "chunk_id" in rows.column_names else []
            _validate_meta(_columns_of(rows))
            memory = _memory_column_to_numpy(rows.column("memory"), ids, self.settings)
            return encode_batch(rows, memory, self.settings, key_basis=self.key_basis)
        rows = list(rows)
        cols = _validate_meta(_columns_of(rows))
        missing = [c for c, r in zip(cols["chunk_id"], rows) if r.get("memory") is None]
        if missing:
            raise ValueError(f"rows lack 'memory': {_name_ids(missing)}")
        return encode_batch(cols, [r["memory"] for r in rows], self.settings, key_basis=self.key_basis)

    def upsert(self, rows: Any) -> UpsertResult:
        """Insert or replace rows keyed on ``chunk_id``, in one transaction (one new table version).

        ``rows``: a list of mappings with ``chunk_id, doc_id, position, text, [content_hash,] memory``, a
        pyarrow Table with those columns (memory as any list layout), or an already encoded Table from
        :func:`encode_batch`. Everything is validated before anything is written.
        """
        data = self._prepare(rows)
        if data.num_rows == 0:
            return UpsertResult(0, 0, self.version)
        result = (
            self._table.merge_insert("chunk_id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        )
        version = int(getattr(result, "version", 0) or self.version)
        return UpsertResult(int(result.num_inserted_rows), int(result.num_updated_rows), version)

    def append(self, rows: Any) -> UpsertResult:
        """Add rows whose ``chunk_id`` the table does not hold, in one transaction, without looking them up.

        The caller vouches for the ids (an id already in the table would then be held twice): the index job
        appends the chunks its plan found new. :meth:`upsert` joins every call against the table's
        ``chunk_id`` column, and a writer's memory grows with the rows written (measured: 10^5 rows appended
        by upserts of 8,192 grew the writer by ~200 MB, appends by ~20 MB; benchmarks/bench_index.py).
        ``rows`` as for :meth:`upsert`; validated before anything is written (an id twice in ``rows`` too).
        """
        data = self._prepare(rows)
        if data.num_rows == 0:
            return UpsertResult(0, 0, self.version)
        result = self._table.add(data)
        return UpsertResult(data.num_rows, 0, int(getattr(result, "version", 0) or self.version))

    def latest_version(self) -> int:
        """The table's latest version, whoever wrote it (this handle moves to it)."""
        self._table.checkout_latest()
        return self.version

    def _delete(self, column: str, values: Iterable[str]) -> int:
        values = sorted({str(v) for v in values})
        if not values:
            return 0
        result = self._table.delete(_expr_in(column, values))
        return int(result.num_deleted_rows)

    def delete_chunks(self, chunk_ids: Iterable[str]) -> int:
        """Delete these chunks; returns the number of rows deleted (one new version, none if nothing to do)."""
        return self._delete("chunk_id", chunk_ids)

    def delete_docs(self, doc_ids: Iterable[str]) -> int:
        """Delete every chunk of these documents; returns the number of rows deleted."""
        return self._delete("doc_id", doc_ids)

    def retain_docs(self, doc_ids: Iterable[str]) -> int:
        """Delete every chunk whose document is not in ``doc_ids`` (documents gone from the source)."""
        keep = {str(d) for d in doc_ids}
        gone = self.doc_ids() - keep
        return self._delete("doc_id", gone)

    # ---- reading

    def _scan(self, columns: list[str], where: Any = None, batch_size: int | None = None) -> Iterable[pa.RecordBatch]:
        query = self._table.search().select(columns)
        if where is not None:
            query = query.where(where)
        yield from query.to_batches(batch_size=batch_size)

    def count(self, filter: str | None = None) -> int:
        return int(self._table.count_rows(filter))

    def existing_hashes(self, chunk_ids: Iterable[str] | None = None) -> dict[str, str]:
        """``{chunk_id: content_hash}`` for all chunks, or for those of ``chunk_ids`` that exist."""
        if chunk_ids is None:
            return self._hashes_where([None])
        return self._hashes_where(self._in_groups("chunk_id", chunk_ids))

    def hashes_of_docs(self, doc_ids: Iterable[str]) -> dict[str, str]:
        """``{chunk_id: content_hash}`` of every row of the documents ``doc_ids`` (one filtered read a few
        thousand ids at a time; fast with the scalar index of :meth:`create_scalar_indices`)."""
        return self._hashes_where(self._in_groups("doc_id", doc_ids))

    @staticmethod
    def _in_groups(column: str, values: Iterable[str]) -> list[Any]:
        ids = sorted({str(v) for v in values})
        return [_expr_in(column, ids[i : i + _ID_BATCH]) for i in range(0, len(ids), _ID_BATCH)]

    def _hashes_where(self, groups: list[Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for where in groups:
            for batch in self._scan(["chunk_id", "content_hash"], where):
                out.update(zip(batch.column("chunk_id").to_pylist(), batch.column("content_hash").to_pylist()))
        return out

    def scan(self, columns: Sequence[str], batch_size: int | None = None) -> Iterable[pa.RecordBatch]:
        """The table's ``columns``, streamed in record batches (the whole table never in memory)."""
        return self._scan(list(columns), batch_size=batch_size)

    def create_scalar_indices(self, columns: Sequence[str] = SCALAR_COLUMNS) -> list[str]:
        """B-tree indices on ``columns`` where there is none yet (returns the columns indexed now): the
        index job's lookups of a batch's documents and the upserts on ``chunk_id`` then read the index
        instead of scanning every row. Rows added later are found by a scan until :meth:`optimize`."""
        from lancedb.index import BTree

        have = {tuple(i.columns) for i in self.list_indices()}
        made = []
        for column in columns:
            if (column,) not in have:
                self._table.create_index(column, config=BTree(), replace=True)
                made.append(column)
        return made

    def doc_ids(self) -> set[str]:
        out: set[str] = set()
        for batch in self._scan(["doc_id"]):
            out.update(v for v in batch.column("doc_id").to_pylist() if v is not None)
        return out

    @property
    def _memory_columns(self) -> list[str]:
        return ["memory", "memory_scale"] if self.settings.dtype in ("int8", "int4") else ["memory"]

    def find_memory(self, chunk_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """``{chunk_id: float32 [n_mem, d]}`` of those of ``chunk_ids`` that are in the table."""
        found: dict[str, np.ndarray] = {}
        for where in self._in_groups("chunk_id", chunk_ids):
            for batch in self._scan(["chunk_id", *self._memory_columns], where):
                mem = _decode_memory(batch, self.settings)
                found.update(zip(batch.column("chunk_id").to_pylist(), mem))
        return found

    def get_memory(self, chunk_ids: Sequence[str]) -> np.ndarray:
        """Dequantised memories ``float32 [n, n_mem, d]`` in the order of ``chunk_ids``; KeyError names missing ids."""
        chunk_ids = [str(c) for c in chunk_ids]
        return memory_in_order(self.find_memory(chunk_ids), chunk_ids, self.settings)

    # ---- versions and maintenance

    @property
    def version(self) -> int:
        return int(self._table.version)

    def versions(self) -> list[dict[str, Any]]:
        """The table's versions, oldest first: dicts with ``version``, ``timestamp``, ``metadata``."""
        return list(self._table.list_versions())

    def refresh(self) -> int:
        """Move this handle to the latest version (to see writes made through other handles)."""
        self._table.checkout_latest()
        self._metric = self._detect_metric()
        return self.version

    def checkout(self, version: int) -> int:
        """Read the table as it was at ``version`` (read-only until :meth:`refresh`): how a sharded index's
        manifest pins each shard. Raises ValueError for a version not in the table's history."""
        try:
            self._table.checkout(int(version))
        except Exception as exc:  # lance reports an unknown or cleaned-up version in several ways
            raise ValueError(f"chunk table {self.name!r} has no version {version} (removed by a cleanup?): "
                             f"{str(exc)[:200]}") from exc
        self._metric = self._detect_metric()
        return self.version

    def rollback(self, version: int) -> int:
        """Restore the table's content to ``version``; this makes a new version, returned."""
        known = {int(v["version"]) for v in self.versions()}
        if int(version) not in known:
            raise ValueError(f"version {version} is not in the table's history {sorted(known)}")
        self._table.restore(int(version))
        self._metric = self._detect_metric()
        return self.version

    def optimize(self, cleanup: bool = False, older_than: _dt.timedelta = _dt.timedelta(days=7)) -> int:
        """Compact files and fold new rows into the indices; returns the version afterwards.

        Versions are kept (so :meth:`rollback` keeps working) unless ``cleanup=True``, which then runs
        :meth:`cleanup_versions` with ``older_than``.
        """
        keep_all = _dt.timedelta(days=365 * 100)  # lancedb would otherwise prune versions older than 7 days
        self._table.optimize(cleanup_older_than=keep_all)
        if cleanup:
            self.cleanup_versions(older_than)
        return self.version

    # ---- tags: versions that cleanup keeps

    def tags(self) -> dict[str, int]:
        """``{tag: version}`` of the table's tags."""
        return {name: int(info["version"]) for name, info in self._table.tags.list().items()}

    def tag(self, name: str, version: int | None = None) -> None:
        """Tag ``version`` (default: the current one) as ``name``: a tagged version survives
        :meth:`cleanup_versions` until the tag is removed. Names are letters, digits, ``.``, ``-``, ``_``."""
        self._table.tags.create(name, int(self.version if version is None else version))

    def untag(self, name: str) -> None:
        """Remove a tag (its version becomes eligible for :meth:`cleanup_versions`)."""
        self._table.tags.delete(name)

    def cleanup_versions(self, older_than: _dt.timedelta) -> CleanupReport:
        """Remove versions older than ``older_than`` and the files only they use; tagged versions and the
        latest are kept, whatever their age.

        Why not ``optimize(cleanup_older_than=...)``: lancedb's optimize refuses to run at all once a
        tagged version is older than the window. A version that is removed can no longer be rolled back
        to, and a reader pinned to it fails: keep ``older_than`` longer than any reader holds a version.
        """
        if older_than < _dt.timedelta(0):
            raise ValueError(f"older_than must not be negative, got {older_than}")
        self.refresh()  # the latest version is what cleanup keeps: see other handles' commits first
        stats = self._table.to_lance().cleanup_old_versions(older_than, error_if_tagged_old_versions=False)
        self.refresh()
        return CleanupReport(versions_removed=int(stats.old_versions), bytes_removed=int(stats.bytes_removed),
                             versions_left=[int(v["version"]) for v in self.versions()])

    # ---- indices

    def _detect_metric(self) -> str:
        try:
            for cfg in self._table.list_indices():
                if list(cfg.columns) == ["key"]:
                    stats = self._table.index_stats(cfg.name)
                    metric = getattr(stats, "distance_type", None)
                    if metric in METRICS:
                        return metric
        except Exception as exc:  # listing indices is an optimisation, never fatal
            logger.debug("could not read index metric: %s", exc)
        return "cosine"

    def create_ann_index(
        self,
        kind: str = "IVF_PQ",
        metric: str = "cosine",
        num_partitions: int | None = None,
        num_sub_vectors: int | None = None,
        *,
        min_rows: int = 256,
        scalar: bool = True,
        replace: bool = True,
        **extra: Any,
    ) -> IndexReport:
        """Build the ANN index on ``key`` (and, with ``scalar``, BTree indices on ``chunk_id`` and ``doc_id``).

        ``kind``: one of :data:`ANN_KINDS`; ``metric``: ``cosine`` or ``dot`` (keys are unit vectors, so
        both rank alike). ``num_partitions`` defaults to ``sqrt(rows)`` capped so that each partition has
        ~256 training rows (HNSW kinds: one partition per million rows; ``IVF_SQ``: one per
        :data:`SCAN_PARTITION_ROWS`, at most :data:`SCAN_MAX_PARTITIONS`, so that a search's default probes
        scan every int8 key: exact on the key). With fewer than ``min_rows`` rows
        (256 is what PQ codebooks need) nothing is built and the report says why. ``extra`` goes to the
        lancedb index config (e.g. ``m``, ``ef_construction``, ``num_bits``).
        """
        kind = kind.upper()
        if kind not in ANN_KINDS:
            raise ValueError(f"kind must be one of {ANN_KINDS}, got {kind!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        n = self.count()
        if n < max(min_rows, 1):
            message = f"not building {kind} on {n} rows: training needs at least {min_rows}; searches stay exact scans"
            logger.warning(message)
            return IndexReport(False, kind, metric, n, message=message)
        if num_partitions is None:
            num_partitions = default_partitions(kind, n)
        config = _ann_config(kind, metric, num_partitions, num_sub_vectors, **extra)
        self._table.create_index("key", config=config, replace=replace)
        self._metric = metric
        scalars: tuple[str, ...] = ()
        if scalar:  # where missing (built once, kept up to date by optimize)
            self.create_scalar_indices(SCALAR_COLUMNS)
            scalars = SCALAR_COLUMNS
        message = f"built {kind} ({metric}, {num_partitions} partitions) on {n} rows"
        logger.info(message)
        return IndexReport(True, kind, metric, n, num_partitions, scalars, message)

    def list_indices(self) -> list[Any]:
        return list(self._table.list_indices())

    # ---- search

    def _queries(self, query_memory: Any) -> np.ndarray:
        q = _as_float32(query_memory)
        if q.ndim == 2:
            q = q[None]
        want = (self.settings.n_mem, self.settings.d)
        if q.ndim != 3 or q.shape[1:] != want:
            raise ValueError(f"query memory has shape {q.shape}, expected [B, {want[0]}, {want[1]}] or {list(want)}")
        if not np.isfinite(q).all():
            raise ValueError("query memory contains NaN or inf")
        return q

    @property
    def _scores_rotated(self) -> bool:
        """int4 rows are scored in their rotated space (see :func:`~clara.index.codec.dequantize_int4`)."""
        return self.settings.dtype == "int4"

    def _turn(self, memory: np.ndarray, back: bool = False) -> np.ndarray:
        """``memory`` into int4's rotated space (a query), or ``back`` out of it (the rows kept)."""
        r = token_rotation(self.settings.d, self.settings.key_seed)
        return memory @ (r.T if back else r)

    def _result(self, rows: pa.Table, memory: np.ndarray, scores: np.ndarray, k: int,
                rotated: bool = False) -> SearchResult:
        order = np.argsort(-scores, kind="stable")[:k]
        kept = memory[order]
        ids = rows.column("chunk_id").to_pylist()
        docs = rows.column("doc_id").to_pylist()
        texts = rows.column("text").to_pylist()
        return SearchResult(
            chunk_ids=[ids[i] for i in order],
            doc_ids=[docs[i] for i in order],
            texts=[texts[i] for i in order],
            scores=scores[order].astype(np.float32),
            memory=self._turn(kept, back=True) if rotated else kept,
        )

    def _empty_result(self) -> SearchResult:
        empty = np.zeros((0, self.settings.n_mem, self.settings.d), np.float32)
        return SearchResult([], [], [], np.zeros(0, np.float32), empty)

    def search(
        self,
        query_memory: Any,
        k: int = 5,
        candidates: int = 50,
        *,
        nprobes: int | None = None,
        refine_factor: int | None = None,
        ef: int | None = None,
        filter: str | None = None,
    ) -> list[SearchResult]:
        """Two-step search, one :class:`SearchResult` per query.

        1. vector search on ``key`` (ANN if indexed, else a flat scan) with the projected query keys for
           ``candidates`` rows per query; 2. re-score those with :func:`flat_cosine` on their full memory
           and keep the top ``k``. ``filter`` is a SQL predicate applied before the vector search.
        """
        q = self._queries(query_memory)
        if k <= 0:
            raise ValueError("k must be positive")
        limit = max(int(candidates), int(k))
        keys = project_keys(q, self.settings.key_dim, self.settings.key_seed, self.key_basis)
        query = (
            self._table.search(keys if len(keys) > 1 else keys[0], vector_column_name="key")
            .distance_type(self._metric)
            .limit(limit)
            .select(["chunk_id", "doc_id", "text", *self._memory_columns, "_distance"])
        )
        if filter:
            query = query.where(filter, prefilter=True)
        if nprobes is not None:
            query = query.nprobes(int(nprobes))
        if refine_factor is not None:
            query = query.refine_factor(int(refine_factor))
        if ef is not None:
            query = query.ef(int(ef))
        rows = query.to_arrow()
        if "query_index" in rows.column_names:
            qidx = rows.column("query_index").to_numpy()
        else:
            qidx = np.zeros(rows.num_rows, dtype=np.int64)
        rotated = self._scores_rotated
        memory = _decode_memory(rows, self.settings, rotated) if rows.num_rows else None
        scored = self._turn(q) if rotated else q
        results = []
        for b in range(len(q)):
            sel = np.flatnonzero(qidx == b)
            if len(sel) == 0:
                results.append(self._empty_result())
                continue
            sub = rows.take(pa.array(sel))
            mem = memory[sel]
            results.append(self._result(sub, mem, flat_cosine(scored[b], mem)[0], k, rotated))
        return results

    # ---- full text (BM25) and hybrid

    def create_text_index(self, replace: bool = True) -> None:
        """Build LanceDB's full-text (BM25) index on ``text``. Rows added later are searched before they
        are folded in (:meth:`optimize` folds them); deleted rows leave the results at once."""
        from lancedb.index import FTS

        self._table.create_index("text", config=FTS(with_position=False), replace=replace)
        self._text_index = True

    @property
    def has_text_index(self) -> bool:
        """The table has a full-text index on ``text`` (once seen, remembered by this handle: an index goes
        away only with a rebuilt table, which a reader reopens)."""
        if not getattr(self, "_text_index", False):
            self._text_index = any(list(i.columns) == ["text"] and str(i.index_type).upper() in ("FTS", "INVERTED")
                                   for i in self.list_indices())
        return self._text_index

    def text_search(self, questions: Sequence[str], k: int = 50, *, filter: str | None = None) -> list[SearchResult]:
        """BM25 over the chunks' text with the table's full-text index: one :class:`SearchResult` per question,
        scores are BM25 scores. Raises :class:`TextIndexMissingError` when the table has no text index."""
        if k <= 0:
            raise ValueError("k must be positive")
        from lancedb.query import MatchQuery

        if not self.has_text_index:
            raise TextIndexMissingError(f"chunk table {self.name!r} has no full-text index on 'text': run the index "
                                        "job (it builds one unless --no-text-index) or ChunkStore.create_text_index()")
        out = []
        for question in questions:
            if not isinstance(question, str):
                raise ValueError(f"questions must be strings, got {type(question).__name__}")
            if not question.strip():
                out.append(self._empty_result())
                continue
            # a match query: the question's words, never parsed as query syntax (quotes, AND, ':')
            query = (self._table.search(MatchQuery(question, "text"), query_type="fts").limit(int(k))
                     .select(["chunk_id", "doc_id", "text", *self._memory_columns, "_score"]))
            if filter:
                query = query.where(filter, prefilter=True)
            rows = query.to_arrow()
            if rows.num_rows == 0:
                out.append(self._empty_result())
                continue
            scores = rows.column("_score").to_numpy().astype(np.float32)
            out.append(self._result(rows, _decode_memory(rows, self.settings), scores, int(k)))
        return out

    def hybrid_search(
        self,
        query_memory: Any,
        questions: Sequence[str],
        k: int = 5,
        candidates: int = 50,
        *,
        text_candidates: int | None = None,
        text_weight: float = 1.0,
        rrf_k: int = 60,
        filter: str | None = None,
        **ann: Any,
    ) -> list[SearchResult]:
        """Latent and BM25 candidates fused: the union of :meth:`search`'s ``candidates`` (ANN proposal on
        the key) and :meth:`text_search`'s ``text_candidates`` (default: as many) is re-scored exactly on the
        memories (CLaRa cosine), then ranked by reciprocal rank fusion,
        ``1 / (rrf_k + cosine rank) + text_weight / (rrf_k + BM25 rank)`` (no BM25 term for a chunk BM25 did
        not return). ``text_weight`` 0 is the latent ranking over the union; scores are the fused values.
        ``ann``: ``nprobes`` / ``refine_factor`` / ``ef`` for the vector half.
        """
        return hybrid_search(self, self._queries(query_memory), questions, k, candidates, text_candidates,
                             text_weight, rrf_k, filter, ann)

    def exact_search(
        self, query_memory: Any, k: int = 5, *, filter: str | None = None, batch_size: int = 2048
    ) -> list[SearchResult]:
        """Brute-force exact CLaRa cosine over the whole table (scanned in batches): the recall ground truth."""
        q = self._queries(query_memory)
        if k <= 0:
            raise ValueError("k must be positive")
        pools: list[tuple[pa.Table, np.ndarray, np.ndarray] | None] = [None] * len(q)
        columns = ["chunk_id", "doc_id", "text", *self._memory_columns]
        rotated = self._scores_rotated
        scored = self._turn(q) if rotated else q
        for batch in self._scan(columns, filter or None, batch_size=batch_size):
            if batch.num_rows == 0:
                continue
            rows = pa.Table.from_batches([batch]).select(["chunk_id", "doc_id", "text"])
            mem = _decode_memory(batch, self.settings, rotated)
            scores = flat_cosine(scored, mem)
            for b in range(len(q)):
                top = _top_k(scores[b], k)
                cand = (rows.take(pa.array(top)), mem[top], scores[b, top])
                if pools[b] is not None:
                    prev = pools[b]
                    cand = (
                        pa.concat_tables([prev[0], cand[0]]),
                        np.concatenate([prev[1], cand[1]]),
                        np.concatenate([prev[2], cand[2]]),
                    )
                    keep = np.argsort(-cand[2], kind="stable")[:k]
                    cand = (cand[0].take(pa.array(keep)), cand[1][keep], cand[2][keep])
                pools[b] = cand
        return [self._empty_result() if p is None else self._result(p[0], p[1], p[2], k, rotated) for p in pools]


__all__ = [
    "ANN_KINDS",
    "DTYPES",
    "METADATA_KEY",
    "ChunkStore",
    "CleanupReport",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexReport",
    "KeyBasis",
    "SearchResult",
    "StoreSettings",
    "TextIndexMissingError",
    "UpsertResult",
    "content_hash",
    "dequantize_int8",
    "encode_batch",
    "fit_key_basis",
    "flat_cosine",
    "fuse_candidates",
    "merge_results",
    "index_schema",
    "key_projection",
    "project_keys",
    "quantize_int8",
    "reciprocal_rank_fusion",
    "to_float16",
]
