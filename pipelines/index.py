"""Index job: compress a corpus into the LanceDB chunk index, incrementally, on Ray Data.

    python -m pipelines.index --corpus docs.jsonl --model runs/model --table-uri ./index
    python -m pipelines.index --format scp --corpus ../shared/data/scp_sample.jsonl --model runs/model \\
        --table-uri ./index --ann-index IVF_HNSW_SQ
    python -m pipelines.index versions --table-uri ./index
    python -m pipelines.index rollback 3 --table-uri ./index
    python -m pipelines.index cleanup --table-uri ./index --older-than-days 7 --keep-tags 30
    python -m pipelines.index manifest publish --table-uri ./index --shards 4   # after parallel --shard jobs
    python -m pipelines.index --corpus docs.jsonl --model runs/model --table-uri ./index --delete-missing \\
        --cleanup-older-than-days 7 --keep-tags 30      # a scheduled reindex that also bounds storage
    ray job submit --working-dir . -- python -m pipelines.index --corpus /mnt/corpus/docs.parquet \\
        --model /mnt/models/stage3 --table-uri s3://bucket/clara/index --actors 8 --num-gpus-per-actor 1
    python -m pipelines.index --corpus s3://bucket/corpus/ --model /mnt/models/stage3 \\
        --table-uri s3://bucket/clara/index --storage-option region=us-east-1   # --reader ray-data

The table may be a local directory or an object-store URI; so may the corpus with ``--reader ray-data``.

(``clara index ...`` is the same command.) One run:

1. plan: read the corpus, chunk it by tokens of the compressor's tokenizer, and diff the chunks'
   ``content_hash`` (salted with the chunking settings and the compressor version) against the table:
   unchanged chunks are skipped. ``--reader driver`` (local paths): on the driver, which holds a hash
   per chunk of the table. ``--reader ray-data`` (object-store URIs, or asked for): Ray Data's readers,
   the chunking and the diff on the workers a batch of documents at a time (each batch asks the table
   for its documents' rows only), the plan kept in Ray's object store; the driver holds 8 bytes per
   document. Bad input fails here, naming file and line (Parquet: file and row or record id) and the
   field, before anything is compressed or written; so does a run that would delete more than
   --max-delete-fraction of the table (a truncated corpus with --delete-missing).
2. Ray Data: the chunks to compress go through ``map_batches`` on a pool of actors, each of which
   loads the model once and returns encoded index rows (memory in the storage dtype, ``key``). A new
   table with a fitted key (``--key-basis pca``, automatic for a first run of >= 10 x --key-fit-rows
   chunks) first compresses a seeded sample of them and fits the key's basis on their memories, on the same
   actors (the other chunks wait at a gate until the basis is posted to them; the sample's rows are written
   with the others, not compressed again); the basis is kept beside the table (``<table>-keybasis``) and
   every later run and search uses it.
3. driver: rows stream back (``iter_batches``) and are upserted on ``chunk_id`` a few thousand per
   commit (appended, when the plan has new chunks and no changed ones: an upsert joins each commit
   against the table and the writer's memory grew with the rows written; the writer checks between
   commits that no other writer has touched the table, and upserts if one has); then stale rows are
   deleted, the B-tree indices on ``chunk_id`` / ``doc_id``, the ANN index and the full-text index are
   built or refreshed, and the version the run ended on is tagged ``index-v<N>``.

Rerunning is always safe: a run that crashes part-way leaves only whole commits, whose chunks the
rerun skips, so the table ends with exactly one row per chunk. The summary reports the table version
the run ended on; ``versions`` lists every version with its tags, ``rollback VERSION`` restores one
(tagged ``rollback-v<N>``), and ``cleanup`` (or ``--cleanup-older-than-days`` on a run) removes old
untagged versions (each commit is a version; LanceDB keeps them all until then).

Errors in the input or the settings print one line, ``clara index: <file>:<line>: field '<f>': <problem>``,
and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from clara.checkpoint import CheckpointError
from clara.data.corpus import DocumentError
from clara.index.build import (
    SOURCE_FORMATS,
    STATUS_FIELDS,
    ChunkCompressor,
    ChunkingSettings,
    ChunkPlanner,
    CleanupSummary,
    DeletionGuardError,
    IndexPlan,
    IndexWriter,
    WriteStats,
    auto_ann_kind,
    check_deletions,
    chunking_salt,
    cleanup_index,
    doc_key,
    load_tokenizer,
    plan_error,
    plan_index,
    read_compressor_info,
    refresh_ann_index,
    refresh_text_index,
    source_chunks,
    store_settings_for,
    tag_version,
    work_blocks,
)
from clara.index.codec import KeyBasis, encode_batch, fit_key_basis
from clara.index.schema import (
    ANN_KINDS,
    DEFAULT_TABLE,
    DTYPES,
    IndexMismatchError,
    IndexNotFoundError,
    shard_of,
    shard_table,
)
from clara.index.shards import (
    ManifestError,
    prune_manifests,
    publish_manifest,
    read_manifests,
    rollback_manifest,
)
from clara.index.store import ChunkStore
from clara.settings import add_config_flags, add_flags, from_args, print_config

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

PROG = "clara index"
#: Errors of the input, the settings or the table that a user fixes: one line and exit status 2, no
#: traceback (that is for ``--debug``). ``FileNotFoundError`` covers a missing corpus or table.
USER_ERRORS = (DocumentError, DeletionGuardError, IndexMismatchError, CheckpointError, FileNotFoundError,
               ManifestError)
DEFAULT_MAX_DELETE_FRACTION = 0.1
READERS = ("auto", "driver", "ray-data")
PUBLISH = ("auto", "always", "never")
#: CPUs of a Ray Data read task of the streamed plan: reading is I/O; a full CPU each would wait behind the
#: planner actors on a small cluster.
READ_CPUS = 0.25
#: Read tasks of the streamed plan, at most (fewer with fewer files). Ray Data would derive the count from the
#: context's target block size, which the job makes small (blocks of a compressor call): pinned instead to
#: Ray's usual minimum, each task streaming its files.
READ_TASKS = 200


class IndexJobError(RuntimeError):
    """The run failed part-way; the ``written`` rows committed so far (up to table ``version``) stay, and a
    rerun of the same settings resumes: it skips them."""

    def __init__(self, message: str, written: int = 0, version: int = 0) -> None:
        super().__init__(message)
        self.written = written
        self.version = version


@dataclass
class IndexSettings:
    """Settings of one index run: the flags of ``python -m pipelines.index`` and the fields of its ``--config``."""

    #: JSONL, Parquet, a .txt file, a directory of such files (one kind) or a glob; with ``--format scp`` a stage-1
    #: JSONL file.
    corpus: str | Path
    #: A CLaRa model directory (``ClaraModel.save_pretrained``); its compressor makes the memory.
    model: str | Path
    #: LanceDB database: a local directory or an object-store URI (``s3://bucket/path``).
    table_uri: str | Path
    #: The chunk table in it.
    table_name: str = DEFAULT_TABLE
    #: ``auto``: by file suffix, one document per record / file; ``scp``: stage-1 records whose ``docs[0]``
    #: are already chunks (not re-split; the document id is derived from the chunk's text, so an edited
    #: chunk is a new document and ``--delete-missing`` drops the old one).
    format: str = field(default="auto", metadata={"choices": SOURCE_FORMATS})
    #: Record field holding the document id.
    id_field: str = "id"
    #: Record field holding the text.
    text_field: str = "text"
    #: Record field with a title, prepended to each chunk's text (``title + "\n" + chunk``); its tokens
    #: count against ``--chunk-tokens`` (the text window is that much shorter).
    title_field: str | None = None
    #: Tokens per chunk (default: the model's ``doc_max_tokens``; longer chunks would be truncated).
    chunk_tokens: int | None = None
    #: Tokens shared by neighbouring chunks.
    overlap: int = 0
    #: Chunks per compressor forward pass (and per Ray Data batch).
    batch_size: int = 32
    #: Size of the actor pool; each actor loads the model once.
    actors: int = 1
    #: CPUs of each actor (fractions allowed).
    num_cpus_per_actor: float = 1.0
    #: GPUs of each actor (1 to give each actor a GPU).
    num_gpus_per_actor: float = 0.0
    #: torch threads per actor (default: ``int(num_cpus_per_actor)``, at least 1).
    threads_per_actor: int | None = None
    #: Device of the actors' model (default: ``cuda`` when actors get GPUs, else ``cpu``; e.g. ``mps``).
    device: str | None = None
    #: Storage of memory: float32, float16 or int8 with a per-token scale (default: the table's, or
    #: float16 for a new table).
    dtype: str | None = field(default=None, metadata={"choices": DTYPES})
    #: Dimension of the ANN key (default: the table's; for a new random key n_mem*d/8 within 128..1024, for a
    #: fitted one 256).
    key_dim: int | None = None
    #: Seed of the key projection (default: the table's, or 0).
    key_seed: int | None = None
    #: The ANN key of a new table: ``random``, a seeded random projection of the memory, or ``pca``, a
    #: basis fitted on the memories of ``--key-fit-rows`` chunks of the corpus (compressed first, then
    #: written with the run's rows) and stored beside the table: the exact top-10 lies within far fewer ANN
    #: candidates (benchmarks/bench_search.py). Default: the table's; for a new table ``pca`` when its first
    #: run compresses at least 10 x --key-fit-rows chunks (then the key has 256 dimensions unless
    #: --key-dim says), else ``random``.
    key_basis: str | None = field(default=None, metadata={"choices": ("random", "pca")})
    #: Chunks (a seeded random sample of the corpus's) to fit the ``pca`` key basis on (at least --key-dim).
    key_fit_rows: int = 4096
    #: Delete the chunks of documents that are no longer in the corpus.
    delete_missing: bool = False
    #: Refuse the run, before anything is written, if it would delete more than this fraction of the
    #: table's rows: a truncated corpus with ``--delete-missing`` would otherwise empty the index that
    #: replicas serve (1: any deletion is allowed).
    max_delete_fraction: float = DEFAULT_MAX_DELETE_FRACTION
    #: After the run, remove untagged versions older than this many days, as the ``cleanup`` subcommand
    #: does (default: keep every version).
    cleanup_older_than_days: float | None = None
    #: With the cleanup, also drop this job's tags (``index-v<N>``, ``rollback-v<N>``) except the newest N,
    #: so that their versions go too and storage stays bounded; tags made by hand are kept (default: keep
    #: every tag).
    keep_tags: int | None = None
    #: Build or refresh an ANN index of this kind on the key at the end (IVF_SQ, IVF_HNSW_SQ, IVF_PQ, ... in
    #: any case; ``none``: none; skipped below ``--ann-min-rows``). ``auto``: the kind already built, else
    #: IVF_SQ once the table holds 100,000 rows (an int8 scan of every key: with a fitted key, recall@10
    #: 0.98-1.00 at ~10x below brute force at 10^6 rows, built in seconds; without an index a query scans
    #: the float keys, 242 ms at 10^6 rows).
    ann_index: str | None = field(default="auto", metadata={"metavar": "KIND"})
    #: Fewer rows than this: no ANN index is built (searches scan, exact).
    ann_min_rows: int = 256
    #: Keep a full-text (BM25) index on the chunk text in the same table, for hybrid retrieval (built when
    #: missing, new rows folded in after each run).
    text_index: bool = True
    #: Split the index into this many tables (``TABLE-00ofNN`` ...) by a hash of the document id; read them
    #: as one with ``shards`` in the Serve app's args or ``Retriever.open(..., shards=N)``.
    shards: int = 1
    #: With ``--shards``: index only this shard (one job per shard, e.g. on different nodes); default: every
    #: shard in turn.
    shard: int | None = None
    #: With ``--shards``: after the run, publish a version manifest (a version of every shard, which the
    #: Retriever and Serve move to at once; see the ``manifest`` subcommand). ``auto``: after a run over every
    #: shard; ``always``: also after a ``--shard`` run (its new version, the other shards as the newest
    #: manifest has them; not with shard jobs running at once: when all have finished, publish once with
    #: ``manifest publish``); ``never``.
    publish: str = field(default="auto", metadata={"choices": PUBLISH})
    #: How the corpus is read and planned. ``driver``: this process reads it with the project's readers
    #: (errors name file and line), chunks it and diffs a hash per chunk against the table: memory grows with
    #: the corpus, fine to ~10^7 chunks of a path the driver sees. ``ray-data``: Ray Data's readers
    #: (``read_binary_files`` for JSONL and .txt, parsed on the workers as the driver parses them,
    #: ``read_parquet``; local paths or object-store URIs, a file or a directory of them) and the chunking and
    #: the diff on the workers, a file of documents at a time (:class:`clara.index.build.ChunkPlanner`); the
    #: driver keeps 8 bytes per document, never the chunks. ``auto``: ``ray-data`` for a URI with a scheme
    #: (``s3://``, ``gs://``), else ``driver``.
    reader: str = field(default="auto", metadata={"choices": READERS})
    #: Index only the first N documents (not with ``--delete-missing``).
    limit: int | None = None
    #: Rows per upsert commit (each commit is one table version).
    commit_rows: int = 8192
    #: Object-store options passed to LanceDB, e.g. ``region=us-east-1``; with an ``s3://`` corpus read by
    #: ``--reader ray-data`` its S3 options too (``aws_access_key_id``, ``aws_secret_access_key``,
    #: ``aws_region``, ``aws_endpoint``; without any, the environment's credentials).
    storage_options: dict[str, str] = field(default_factory=dict, metadata={"flags": ("--storage-option",)})
    #: Ray address (default: the running Ray, $RAY_ADDRESS, or a new local one).
    ray_address: str | None = None

    def __post_init__(self) -> None:
        def positive(name: str, value, kind=int) -> None:
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                raise ValueError(f"IndexSettings.{name} must be a positive {kind.__name__}, got {value!r}")

        self.corpus = str(self.corpus)
        self.model = str(self.model)
        self.table_uri = str(self.table_uri)
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"IndexSettings.format must be one of {SOURCE_FORMATS}, got {self.format!r}")
        if self.publish not in PUBLISH:
            raise ValueError(f"IndexSettings.publish must be one of {PUBLISH}, got {self.publish!r}")
        if self.reader not in READERS:
            raise ValueError(f"IndexSettings.reader must be one of {READERS}, got {self.reader!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"IndexSettings.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.ann_index is not None:
            self.ann_index = self.ann_index.upper()
            if self.ann_index == "NONE":
                self.ann_index = None
            elif self.ann_index != "AUTO" and self.ann_index not in ANN_KINDS:
                raise ValueError(f"IndexSettings.ann_index must be one of {ANN_KINDS}, auto or none, "
                                 f"got {self.ann_index!r}")
        for name in ("batch_size", "actors", "commit_rows", "shards", "key_fit_rows"):
            positive(name, getattr(self, name))
        if self.key_basis is not None and self.key_basis not in ("random", "pca"):
            raise ValueError(f"IndexSettings.key_basis must be random or pca, got {self.key_basis!r}")
        if self.shard is not None and not 0 <= self.shard < self.shards:
            raise ValueError(f"IndexSettings.shard must be in [0, {self.shards}) (--shards), got {self.shard}")
        for name in ("chunk_tokens", "key_dim", "limit", "threads_per_actor"):
            if getattr(self, name) is not None:
                positive(name, getattr(self, name))
        if self.num_cpus_per_actor <= 0 or self.num_gpus_per_actor < 0:
            raise ValueError("IndexSettings.num_cpus_per_actor must be > 0 and num_gpus_per_actor >= 0")
        if self.overlap < 0:
            raise ValueError(f"IndexSettings.overlap must be >= 0, got {self.overlap}")
        if isinstance(self.max_delete_fraction, bool) or not 0.0 <= self.max_delete_fraction <= 1.0:
            raise ValueError(f"IndexSettings.max_delete_fraction must be within [0, 1], "
                             f"got {self.max_delete_fraction!r}")
        for name in ("cleanup_older_than_days", "keep_tags"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not 0 <= value < math.inf):  # nan, inf too
                raise ValueError(f"IndexSettings.{name} must be a finite number >= 0, got {value!r}")
        if self.keep_tags is not None and self.cleanup_older_than_days is None:
            raise ValueError("IndexSettings.keep_tags applies to the cleanup: give cleanup_older_than_days too")
        if self.delete_missing and self.limit is not None:
            raise ValueError("IndexSettings: delete_missing with limit would delete every document past the limit")
        if not self.table_name:
            raise ValueError("IndexSettings.table_name must not be empty")


@dataclass
class IndexSummary:
    """What one run did. ``chunks_per_second`` is chunks compressed (and written) per second of the run."""

    table_uri: str
    table_name: str
    docs: int
    chunks_read: int
    skipped: int
    compressed: int
    new: int
    changed: int
    deleted: int
    rows: int
    bytes_written: int
    commits: int
    seconds: float
    chunks_per_second: float
    #: The table version the run ended on (the one to roll back to later).
    version: int
    #: The version the run started from (roll back to it to undo the run).
    start_version: int
    ann: str = ""
    #: What was done to the full-text index (empty when nothing was).
    text_index: str = ""
    #: The tag put on ``version`` (``index-v<N>``); empty when it was tagged already.
    tag: str = ""
    #: What the cleanup of old versions did (empty without ``cleanup_older_than_days``).
    cleanup: str = ""
    #: The sharded index's manifest published after this run (0: none; see ``IndexSettings.publish``).
    manifest: int = 0

    def format(self) -> str:
        return (
            f"index {self.table_uri}/{self.table_name}: {self.chunks_read} chunks read from {self.docs} documents, "
            f"{self.skipped} skipped (unchanged), {self.compressed} compressed ({self.new} new, {self.changed} "
            f"changed), {self.deleted} deleted; {self.rows} rows; {self.bytes_written / 2**20:.1f} MiB written in "
            f"{self.commits} commits; {self.seconds:.1f}s, {self.chunks_per_second:.1f} chunks/s; "
            f"version {self.start_version} -> {self.version}" + (f" (tagged {self.tag})" if self.tag else "")
            + (f"; ANN: {self.ann}" if self.ann else "")
            + (f"; text index: {self.text_index}" if self.text_index else "")
            + (f"; cleanup: {self.cleanup}" if self.cleanup else "")
            + (f"; published manifest {self.manifest}" if self.manifest else "")
        )


def _open_store(s: IndexSettings, settings=None, create: bool = False, key_basis=None) -> ChunkStore:
    return ChunkStore.open(s.table_uri, settings, table=s.table_name, create=create,
                           storage_options=s.storage_options or None, key_basis=key_basis)


def run_index(s: IndexSettings, progress: Progress | None = None) -> IndexSummary:
    """Run one incremental index pass (see the module docstring); returns its :class:`IndexSummary`.

    Raises :class:`~clara.index.store.IndexMismatchError` (the table was built by another compressor or with
    other storage settings), :class:`~clara.data.corpus.DocumentError` (bad input) and
    :class:`~clara.index.build.DeletionGuardError` (more than ``max_delete_fraction`` of the table would be
    deleted) before writing anything, and :class:`IndexJobError` when compression fails part-way
    (committed rows stay; rerun to resume).
    """
    say = progress or logger.info
    in_shard: Callable[[str], bool] | None = None
    if s.shards > 1:
        if s.shard is None:
            raise ValueError("IndexSettings.shard: run_index writes one shard (run_sharded writes them all)")
        shard, shards = s.shard, s.shards

        def in_shard(doc_id: str) -> bool:
            return shard_of(doc_id, shards) == shard

        s = replace(s, table_name=shard_table(s.table_name, shard, shards), shards=1, shard=None)
        say(f"[index] shard {shard} of {shards}: table {s.table_name}")
    t0 = time.perf_counter()
    info = read_compressor_info(s.model)
    try:
        existing_settings = _open_store(s).settings
    except IndexNotFoundError:
        existing_settings = None
    settings = store_settings_for(info, existing_settings, dtype=s.dtype, key_dim=s.key_dim, key_seed=s.key_seed)
    if existing_settings is not None and s.key_basis and (s.key_basis == "pca") != bool(existing_settings.key_basis):
        raise IndexMismatchError(
            f"the table's keys are {'a fitted basis' if existing_settings.key_basis else 'a random projection'}, "
            f"not --key-basis {s.key_basis}; index into a new table (--table-name) or drop the flag")
    chunking = ChunkingSettings(chunk_tokens=s.chunk_tokens or info.doc_max_tokens, overlap=s.overlap,
                                format=s.format, title_field=s.title_field)
    tokenizer = load_tokenizer(s.model)
    salt = chunking_salt(chunking, info.compressor_version, tokenizer)

    # 1. read, chunk, diff: the whole corpus is validated before the table is created or written
    store = _open_store(s, settings) if existing_settings is not None else None
    if _reader(s) == "ray-data":
        plan, source = _plan_on_workers(s, store, chunking, salt, keep_doc=in_shard)
        table_rows = store.count() if store is not None else 0
    else:
        existing = store.existing_hashes() if store is not None else {}
        chunks = source_chunks(s.corpus, tokenizer, chunking, salt, id_field=s.id_field,
                               text_field=s.text_field, limit=s.limit, keep_doc=in_shard)
        plan = plan_index(chunks, existing, delete_missing=s.delete_missing)
        source, table_rows = plan.to_compress, len(existing)
    check_deletions(plan, table_rows, s.max_delete_fraction)
    fit = None  # a new table's key, fitted by the run's actor pool on a sample that it then writes
    if store is None:
        basis = None
        if new_table_key(s, plan.new + plan.changed, s.key_dim or default_fitted_key_dim(settings.n_mem,
                                                                                         settings.d)) == "pca":
            if s.key_dim is None:
                settings = replace(settings, key_dim=default_fitted_key_dim(settings.n_mem, settings.d))
            fit = _KeyFit(s, settings, source, plan.new + plan.changed)
            try:
                basis = fit.fit(_compressor_class(), say)
            except BaseException:
                fit.close()
                raise
            settings = replace(settings, key_basis=basis.digest)
        store = _open_store(s, settings, create=True, key_basis=basis)
    start_version = store.version
    say(f"[index] {plan.read} chunks from {plan.docs} documents in {time.perf_counter() - t0:.1f}s: "
        f"{plan.skipped} unchanged, {plan.new} new, {plan.changed} changed, {len(plan.stale_chunk_ids)} to delete; "
        f"table {s.table_uri}/{s.table_name} at version {start_version} with {table_rows} rows")

    # 2-3. compress on the actor pool, upsert from here as batches stream back
    t_compress = time.perf_counter()
    total = plan.new + plan.changed

    already = fit.rows if fit is not None else 0  # compressed for the fit: written, not timed here

    def on_commit(w: WriteStats) -> None:
        sec = time.perf_counter() - t_compress
        rate = max(0, w.rows - already) / sec if sec > 0 else 0.0
        eta = (total - w.rows) / rate if rate > 0 else float("nan")
        say(f"[index] {w.rows}/{total} compressed and written ({100 * w.rows / total:.0f}%), {rate:.1f} chunks/s, "
            f"eta {eta:.0f}s, version {w.version}")

    # a plan without changed chunks writes only ids the table lacks: appended, not joined against the table
    # (a table that did not exist when the run was planned must still be empty: another run may have filled it)
    new_only = plan.changed == 0 and (existing_settings is not None or store.count() == 0)
    writer = IndexWriter(store, commit_rows=s.commit_rows, on_commit=on_commit, new_only=new_only)
    if total:
        _compress_and_write(s, settings, source, total, writer, store.key_basis, fit)

    deleted = store.delete_chunks(plan.stale_chunk_ids) if plan.stale_chunk_ids else 0
    if deleted:
        say(f"[index] deleted {deleted} stale rows")
    made = store.create_scalar_indices()
    if made:
        say(f"[index] scalar indices on {', '.join(made)}")
    ann = ""
    ann_kind = auto_ann_kind(store) if s.ann_index == "AUTO" else s.ann_index
    if ann_kind and (total or deleted or not any(list(i.columns) == ["key"] for i in store.list_indices())):
        ann = refresh_ann_index(store, ann_kind, min_rows=s.ann_min_rows)
        say(f"[index] ANN index: {ann}")
    text = ""
    if s.text_index and (total or deleted or not store.has_text_index):
        text = refresh_text_index(store)
        say(f"[index] text index: {text}")
    tag = tag_version(store, "index") or ""
    cleaned = ""
    if s.cleanup_older_than_days is not None:
        cleaned = cleanup_index(store, dt.timedelta(days=s.cleanup_older_than_days), s.keep_tags).format()
        say(f"[index] cleanup: {cleaned}")
    seconds = time.perf_counter() - t0
    summary = IndexSummary(
        table_uri=s.table_uri, table_name=s.table_name, docs=plan.docs, chunks_read=plan.read, skipped=plan.skipped,
        compressed=writer.stats.rows, new=plan.new, changed=plan.changed, deleted=deleted, rows=store.count(),
        bytes_written=writer.stats.bytes, commits=writer.stats.commits, seconds=seconds,
        chunks_per_second=writer.stats.rows / seconds if seconds > 0 else 0.0, version=store.version,
        start_version=start_version, ann=ann, text_index=text, tag=tag, cleanup=cleaned,
    )
    say("[index] " + summary.format())
    return summary


def run_sharded(s: IndexSettings, progress: Progress | None = None) -> list[IndexSummary]:
    """Every shard of ``s.shards`` in turn (or only ``s.shard``), one :func:`run_index` pass each."""
    shards = [s.shard] if s.shard is not None else range(s.shards)
    summaries = [run_index(replace(s, shard=i) if s.shards > 1 else s, progress) for i in shards]
    if s.shards > 1 and (s.publish == "always" or (s.publish == "auto" and s.shard is None)):
        manifest = publish_manifest(
            s.table_uri, s.table_name, s.shards, storage_options=s.storage_options or None,
            updates=None if s.shard is None else {s.shard: summaries[0].version},
            note=f"index run of {'every shard' if s.shard is None else f'shard {s.shard}'}")
        (progress or (lambda line: None))(f"[index] published {manifest.format()}")
        if s.keep_tags is not None:  # bounded storage: the manifests' tags go with the job's own
            prune_manifests(s.table_uri, s.table_name, s.shards, keep=max(1, s.keep_tags),
                            storage_options=s.storage_options or None)
        summaries[-1] = replace(summaries[-1], manifest=manifest.manifest_id)
    return summaries


# --------------------------------------------------------------------------------------------
# the streamed plan (--reader ray-data)


def _reader(s: IndexSettings) -> str:
    if s.reader != "auto":
        return s.reader
    return "ray-data" if "://" in s.corpus else "driver"


def _corpus_filesystem(corpus: str, options: dict[str, str]):
    """``(pyarrow filesystem, path)`` of a corpus URI; an ``s3://`` URI takes the table's S3 storage options
    (``aws_access_key_id``, ``aws_secret_access_key``, ``aws_region``, ``aws_endpoint``, ``allow_http``)."""
    from pyarrow import fs as pafs

    if corpus.startswith("s3://") and options:
        endpoint = options.get("aws_endpoint") or options.get("endpoint")
        scheme = "https"
        if endpoint and "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
        return pafs.S3FileSystem(access_key=options.get("aws_access_key_id"),
                                 secret_key=options.get("aws_secret_access_key"),
                                 region=options.get("aws_region") or options.get("region"),
                                 endpoint_override=endpoint, scheme=scheme), corpus[len("s3://"):]
    return pafs.FileSystem.from_uri(corpus)


def corpus_files(corpus: str, options: dict[str, str] | None = None) -> tuple[object, list[str], str, str]:
    """``(filesystem, files, kind, base)`` of a corpus for Ray Data's readers: a file, a directory or prefix
    (searched recursively for .jsonl / .ndjson, .parquet or .txt files, one kind), or a local glob. ``base``
    is what a text file's document id is relative to. Raises ``FileNotFoundError`` when nothing is found and
    :class:`~clara.data.corpus.DocumentError` for a directory of several kinds."""
    from pyarrow import fs as pafs

    from clara.data.corpus import expand_corpus, file_kind

    if "://" not in corpus:  # as the driver's reader lists it; absolute, since the workers' cwd differs
        pairs = expand_corpus(corpus)
        fs, base = pafs.LocalFileSystem(), os.path.abspath(pairs[0][1])
        files = [os.path.abspath(f) for f, _ in pairs]  # abspath, not resolve: a link keeps its own name (its id)
    else:
        fs, path = _corpus_filesystem(corpus, options or {})
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file or directory: {corpus!r}")
        if info.type == pafs.FileType.Directory:
            files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                           if f.type == pafs.FileType.File and file_kind(f.path))
            base = path
        else:
            files, base = [path], str(Path(path).parent)
    kinds = sorted({file_kind(f) for f in files} - {None})
    if not kinds:
        raise FileNotFoundError(f"no .jsonl, .ndjson, .parquet or .txt files in {corpus!r}")
    if len(kinds) > 1:
        raise DocumentError(corpus, "<corpus>", f"holds files of several kinds ({', '.join(kinds)}): give one kind")
    return fs, [f for f in files if file_kind(f) == kinds[0]], kinds[0], base


def corpus_dataset(s: IndexSettings):
    """``(Ray Dataset of records, kind, base)``: the corpus through Ray Data's readers, as
    :class:`~clara.index.build.ChunkPlanner` takes it (see :data:`~clara.index.build.RECORD_KINDS`)."""
    import ray

    fs, files, kind, base = corpus_files(s.corpus, s.storage_options)
    if s.format == "scp":
        if kind != "jsonl":
            raise DocumentError(s.corpus, "<corpus>", f"--format scp reads stage-1 JSONL files, not {kind} files")
        kind = "scp"
    if kind == "parquet":
        import pyarrow.parquet as pq

        names = set(pq.read_schema(files[0], filesystem=fs).names)
        for name in (s.id_field, s.text_field):
            if name not in names:
                raise DocumentError(files[0], name, f"no such column (columns: {sorted(names)})")
        columns = [s.id_field, s.text_field] + ([s.title_field] if s.title_field and s.title_field in names else [])
        ds = ray.data.read_parquet(files, filesystem=fs, include_paths=True, num_cpus=READ_CPUS,
                                   override_num_blocks=min(len(files), READ_TASKS))
        ds = ds.select_columns([*columns, "path"])
    else:  # a file a row: the planner parses JSONL as the driver's reader does (errors name file and line)
        ds = ray.data.read_binary_files(files, filesystem=fs, include_paths=True, num_cpus=READ_CPUS,
                                        override_num_blocks=min(len(files), READ_TASKS))
    return ds, kind, base


def _plan_on_workers(s: IndexSettings, store: ChunkStore | None, chunking: ChunkingSettings, salt: str,
                     keep_doc: Callable[[str], bool] | None = None):
    """The streamed plan: ``(IndexPlan without to_compress, the Ray Dataset of chunks to compress)``.

    Workers read, validate, chunk and diff (:class:`~clara.index.build.ChunkPlanner`); the plan is
    materialised in Ray's object store (spilled to disk when large), so that bad input and the deletion
    guard fail before anything is written, as with the driver's reader. The driver streams only the small
    columns back: statuses to count, stale ids, and one 8-byte :func:`~clara.index.build.doc_key` per
    document, to find ids seen twice and, with ``delete_missing``, the documents gone from the corpus.
    """
    import numpy as np
    import pyarrow.compute as pc
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy
    from ray.data.expressions import col

    from pipelines import compat

    compat.ensure_ray(s.ray_address)
    records, kind, base = corpus_dataset(s)
    if s.limit is not None:  # the first N records as Ray Data delivers them (with several files: not a fixed N)
        records = records.limit(s.limit)
    if store is not None:  # each batch asks the table for its documents' rows: by index, not by a scan
        store.create_scalar_indices()
    table_uri = s.table_uri if "://" in s.table_uri else os.path.abspath(s.table_uri)  # the workers' cwd differs
    planner = records.map_batches(
        ChunkPlanner,
        batch_size=256 if kind == "parquet" else 1,  # rows, or whole files
        batch_format="pyarrow",
        fn_constructor_args=(s.model, chunking, salt),
        fn_constructor_kwargs={"kind": kind, "table_uri": table_uri, "table_name": s.table_name,
                               "storage_options": s.storage_options or None, "id_field": s.id_field,
                               "text_field": s.text_field, "base": base, "keep_doc": keep_doc,
                               "table_exists": store is not None},
        # from one actor up, at most a CPU each: a fixed pool of full-CPU actors could take every CPU
        compute=ActorPoolStrategy(min_size=1, max_size=s.actors),
        num_cpus=min(1.0, s.num_cpus_per_actor),
    )
    # A planner call returns a whole file's chunks. Ray Data slices a task's output into blocks of
    # target_max_block_size bytes: sized here to about one compressor call (16 batches of chunks with their
    # text), so that one big file is spread over the whole actor pool instead of one actor taking it all.
    # (``records.context`` is this pipeline's copy; materialize() gives the plan a copy of its own, which
    # _compress_and_write sizes for the compressed rows.)
    records.context.target_max_block_size = max(64 << 10, s.batch_size * 16 * max(1024, 6 * chunking.chunk_tokens))
    planned = planner.materialize()
    plan = IndexPlan(to_compress=[])
    keys: list[np.ndarray] = []
    for batch in planned.select_columns(["chunk_id", "status", "position", "doc_key"]).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        status = batch.column("status")
        if pc.any(pc.equal(status, "error")).as_py():
            errors = planned.filter(expr=col("status") == "error").take(1)
            raise plan_error(errors[0]["text"])
        for row in pc.value_counts(status).to_pylist():
            name = STATUS_FIELDS.get(row["values"])
            if name:
                setattr(plan, name, getattr(plan, name) + row["counts"])
        plan.stale_chunk_ids += pc.filter(batch.column("chunk_id"), pc.equal(status, "stale")).to_pylist()
        first = pc.and_(pc.not_equal(status, "stale"), pc.equal(batch.column("position"), 0))
        keys.append(pc.filter(batch.column("doc_key"), first).to_numpy())
    doc_keys = np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    twice = np.unique(doc_keys[1:][doc_keys[1:] == doc_keys[:-1]])
    once = _records_seen_twice(planned, twice, kind, s.id_field, plan) if twice.size else None
    doc_keys = np.unique(doc_keys)
    plan.read, plan.docs = plan.new + plan.changed + plan.skipped, int(doc_keys.size)
    if s.delete_missing and store is not None:
        _missing_documents(store, doc_keys, plan)
    plan.stale_chunk_ids.sort()
    # a light filter: no CPU asked, so that it never waits behind the compressor actors
    # (and few at once: with no CPU asked, Ray would start a worker process for every planned block)
    pending = planned.map_batches(_pending_rows, fn_kwargs={"drop_keys": twice}, batch_format="pyarrow", num_cpus=0,
                                  compute=TaskPoolStrategy(size=max(1, s.actors)))
    if once is not None:
        pending = pending.union(ray.data.from_arrow(_pending_rows(once, twice[:0])))
    return plan, pending


def _records_seen_twice(planned, twice, kind: str, id_field: str, plan: IndexPlan) -> pa.Table:
    """The documents of :func:`~clara.index.build.doc_key` values seen in several records: an id in two
    records is an error naming both, but for ``--format scp``, where the same chunk stands in a record per
    question, each chunk is planned once. Returns the rows to plan, one per document id (a key shared by
    two ids, a hash collision, keeps both), and corrects the counts."""
    import pyarrow.compute as pc

    wanted = pa.array(twice, pa.int64())
    parts = [pc.filter(b, pc.and_(pc.is_in(b.column("doc_key"), wanted), pc.equal(b.column("position"), 0)))
             for b in planned.iter_batches(batch_size=None, batch_format="pyarrow")]
    rows = pa.concat_tables(parts).sort_by([("doc_id", "ascending"), ("where", "ascending")])
    doc_ids, wheres = rows.column("doc_id").to_pylist(), rows.column("where").to_pylist()
    firsts = [i for i in range(len(doc_ids)) if i == 0 or doc_ids[i - 1] != doc_ids[i]]
    if kind != "scp" and len(firsts) < len(doc_ids):
        i = next(i for i in range(1, len(doc_ids)) if doc_ids[i - 1] == doc_ids[i])
        raise DocumentError(wheres[i], id_field, f"duplicate id {doc_ids[i]!r} (first seen at {wheres[i - 1]})")
    keep = set(firsts)
    for i, status in enumerate(rows.column("status").to_pylist()):
        if i not in keep:
            name = STATUS_FIELDS[status]
            setattr(plan, name, getattr(plan, name) - 1)
    return rows.take(firsts)


def _missing_documents(store: ChunkStore, doc_keys, plan: IndexPlan) -> None:
    """Add the rows of the table's documents that the corpus no longer has to ``plan`` (streamed, not held)."""
    import numpy as np

    missing_docs: set[str] = set()
    for batch in store.scan(["chunk_id", "doc_id"]):
        doc_ids = batch.column("doc_id").to_pylist()
        keys = np.fromiter((doc_key(d or "") for d in doc_ids), np.int64, len(doc_ids))
        at = np.minimum(np.searchsorted(doc_keys, keys), max(doc_keys.size - 1, 0))
        gone = np.flatnonzero(doc_keys[at] != keys) if doc_keys.size else np.arange(len(doc_ids))
        chunk_ids = batch.column("chunk_id").to_pylist()
        for i in gone.tolist():
            plan.stale_chunk_ids.append(chunk_ids[i])
            missing_docs.add(doc_ids[i])
        plan.missing_rows += gone.size
    plan.missing_docs = len(missing_docs)


def _id_hashes(ids: Sequence[str], seed: int) -> np.ndarray:
    """``crc32("<seed>:<id>")`` of each id, as uint64."""
    import zlib

    return np.fromiter((zlib.crc32(f"{seed}:{c}".encode()) for c in ids), np.uint64, len(ids))


def _sample_rows(batch: pa.Table, fraction: float, seed: int, keep: bool = True, mark: bool = False,
                 latch=None) -> pa.Table:
    """The rows whose chunk id, hashed with ``seed``, falls below ``fraction``: a seeded sample of about
    ``fraction`` of the rows that does not depend on how they are split into blocks (``keep=False``: the
    other rows, the sample's complement). ``mark``: with a :data:`FIT_SAMPLE` column; ``latch``: once the key
    has been fitted (the gate of :class:`_KeyFit`)."""
    if latch is not None:
        _after_fit(batch, latch)
    hashes = _id_hashes(batch.column("chunk_id").to_pylist(), seed)
    rows = batch.filter(pa.array((hashes < int(fraction * 2**32)) == keep))
    return rows.append_column(FIT_SAMPLE, pa.array([True] * rows.num_rows)) if mark else rows


def hash_sample(ids: Sequence[str], n: int, seed: int) -> np.ndarray:
    """Positions of the ``n`` ids of smallest seeded hash (ties by id), in id order: with :func:`_sample_rows`
    a bottom-n sample, uniform over the ids and the same however they were split and ordered."""
    hashes = _id_hashes(ids, seed).tolist()
    kept = sorted(range(len(ids)), key=lambda i: (hashes[i], ids[i]))[:n]
    return np.array(sorted(kept, key=lambda i: ids[i]), dtype=np.int64)


def _pending_rows(batch: pa.Table, drop_keys) -> pa.Table:
    """The planned rows to compress: new or changed, but not of the documents of ``drop_keys`` (an int64
    array; those are planned once by :func:`_records_seen_twice`)."""
    import pyarrow.compute as pc

    keep = pc.is_in(batch.column("status"), pa.array(["new", "changed"]))
    if len(drop_keys):
        keep = pc.and_(keep, pc.invert(pc.is_in(batch.column("doc_key"), pa.array(drop_keys, pa.int64()))))
    return batch.filter(keep)


def _compressed(s: IndexSettings, settings, source, key_basis=None, actor=None, latch=None):
    """The Ray Dataset of ``source`` (the driver plan's chunks, or the streamed plan's Dataset) compressed
    and encoded on the actor pool. ``latch``: a :class:`_KeyFit` run (``actor`` from :func:`_key_fitting`),
    whose calls are whole blocks: Ray Data would otherwise bundle the sample's last rows with rows that pass
    the gate only after the fit, and wait for them."""
    import ray

    from pipelines import compat

    if isinstance(source, list):
        ds, batch_size = ray.data.from_arrow(work_blocks(source, s.batch_size, s.actors)), s.batch_size
    else:  # in source order: 16 forward passes a call, sorted by length inside (ChunkCompressor) to pad little
        ds, batch_size = source, s.batch_size * 16
    call_size = None if latch is not None else batch_size
    # Ray Data merges a task's outputs into blocks of up to DataContext.target_max_block_size (128 MiB): at
    # ~20 KB a row, thousands of rows that reached the driver in one burst at the end of a task, and that it
    # then held. Blocks of about one call's rows (or half a commit, if smaller) stream to the writer instead.
    # (``ds.context`` is this pipeline's copy of the context, not the process's.)
    ds.context.target_max_block_size = compressed_block_bytes(settings, batch_size, s.batch_size, s.commit_rows)
    device = s.device or ("cuda" if s.num_gpus_per_actor > 0 else "cpu")
    kwargs = {"latch": latch} if latch is not None else {}
    return ds.map_batches(
        actor or ChunkCompressor,
        batch_size=call_size,
        batch_format="pyarrow",
        fn_constructor_args=(s.model, settings),
        fn_constructor_kwargs={
            "device": device,
            "batch_size": s.batch_size,
            "threads": s.threads_per_actor or max(1, int(s.num_cpus_per_actor)),
            "key_basis": key_basis,
            **kwargs,
        },
        **compat.actor_pool(s.actors, num_cpus=s.num_cpus_per_actor, num_gpus=s.num_gpus_per_actor),
    )


#: ``--key-basis`` unset: a new table's first run fits a pca key when it compresses at least this many times
#: ``--key-fit-rows`` chunks (the sample is compressed by the run's own actors and written with the rest, so the
#: fit costs the SVD and a pause of the pool while the driver fits, not a second compression nor a second pool).
AUTO_PCA_FACTOR = 10


def new_table_key(s: IndexSettings, total: int, key_dim: int) -> str:
    """The key of a new table whose first run compresses ``total`` chunks: ``--key-basis`` if given, else
    ``pca`` for a corpus of at least ``AUTO_PCA_FACTOR x --key-fit-rows`` chunks (the scale where the ANN
    index matters and the fit is cheap beside the run) when the sample can fit a ``key_dim``-d key, else
    ``random``. Each shard of a sharded index decides (and fits) on its own; its searches use its own key."""
    if s.key_basis:
        return s.key_basis
    return "pca" if total >= AUTO_PCA_FACTOR * s.key_fit_rows and s.key_fit_rows >= key_dim else "random"


def default_fitted_key_dim(n_mem: int, d: int) -> int:
    """Dimensions of a fitted key: 256 (or ``n_mem * d / 8`` if less). On real memories of the SmolLM2
    compressor (benchmarks/bench_keys.py) a 256-d fitted key holds the exact top-10 within 100 candidates,
    a 128-d one 0.99 of it, the 1024-d random key 0.98."""
    return max(1, min(256, n_mem * d // 8))


#: The column that carries a key-fit sample's float32 memory from the compressor actors to the driver (null in
#: every other row; never written), and the one that marks the sample's rows on their way in.
FIT_MEMORY = "fit_memory"
FIT_SAMPLE = "fit_sample"


class _KeyFit:
    """A new table's key, fitted on the way by the actors that compress the run (one pool, one model load).

    A seeded random sample of ``key_fit_rows`` of the chunks to index goes first: the actors return its
    memory in float32 (:data:`FIT_MEMORY`) and the driver fits the basis on it
    (:func:`~clara.index.codec.fit_key_basis`). The other chunks wait at a gate, a CPU-less step before the
    actors that opens when the driver posts the basis to a small latch actor; the actors then encode them with
    the fitted key, and the sample's rows are encoded on the driver from the float32 memory it already has:
    no chunk is compressed twice, and the actor pool starts once (before, the fit ran on a pool of its own:
    a second process start, torch import and model load: ~10 s on 2 cores with a small model, more with a large one).
    The sample's blocks pass the actors one at a time, never bundled with the gated rows, so the fit never
    waits for rows that wait for it. The memory is the compressor's own output (float32 holds a float32 or
    bfloat16 model's values exactly): the rows encoded from it are those a second compression would make, up
    to the few-ulp noise of another batch composition.
    """

    def __init__(self, s: IndexSettings, settings, source, total: int) -> None:
        self.n = min(s.key_fit_rows, total)
        if self.n < settings.key_dim:
            raise ValueError(f"--key-basis pca fits a {settings.key_dim}-d key on the chunks to index, but there "
                             f"are {total} (--key-fit-rows {s.key_fit_rows}); use --key-basis random or a smaller "
                             "--key-dim")
        self.s, self.settings, self.source, self.total = s, settings, source, total
        self.fitted: list[tuple[pa.Table, np.ndarray]] = []
        self.rows = 0  # chunks compressed for the fit (the sample, and the few more a hash filter let through)
        self._latch = None
        self._batches = None

    def fit(self, actor: type, say: Progress) -> KeyBasis:
        """Start the actor pool on the sample, then the gated rest; return the basis fitted on the sample."""
        import random

        import ray
        from ray.data import TaskPoolStrategy

        from pipelines import compat

        s, seed, t = self.s, self.s.key_seed or 0, time.perf_counter()
        compat.ensure_ray(s.ray_address)
        self._latch = _latch()
        if isinstance(self.source, list):
            picked = set(random.Random(seed).sample(range(len(self.source)), self.n))
            sample = ray.data.from_arrow([b.append_column(FIT_SAMPLE, pa.array([True] * b.num_rows))
                                          for b in work_blocks([self.source[i] for i in sorted(picked)],
                                                               s.batch_size, s.actors)])
            expected = self.n
            rest = [c for i, c in enumerate(self.source) if i not in picked]
            rest = ray.data.from_arrow(work_blocks(rest, s.batch_size, s.actors)) if rest else None
            if rest is not None:  # the gate, a step of its own
                rest = rest.map_batches(_after_fit, fn_kwargs={"latch": self._latch}, batch_size=None,
                                        batch_format="pyarrow", num_cpus=0,
                                        compute=TaskPoolStrategy(size=max(1, s.actors)))
        else:  # a hash sample on the workers (n plus four standard deviations, then the n of smallest hash); the
            # rest is the same filter's complement. The sample's planned rows are materialised: a few thousand
            # chunks' text, counted before the actors start.
            fraction = min(1.0, (self.n + 4 * math.sqrt(self.n) + 16) / self.total)
            sample = self.source.map_batches(
                _sample_rows, fn_kwargs={"fraction": fraction, "seed": seed, "keep": True, "mark": True},
                batch_format="pyarrow", num_cpus=0, compute=TaskPoolStrategy(size=max(1, s.actors))).materialize()
            expected = sample.count()
            rest = None if fraction >= 1.0 else self.source.map_batches(
                _sample_rows, fn_kwargs={"fraction": fraction, "seed": seed, "keep": False, "latch": self._latch},
                batch_format="pyarrow", num_cpus=0, compute=TaskPoolStrategy(size=max(1, s.actors)))
        ds = sample.union(rest) if rest is not None else sample
        compressed = _compressed(self.s, self.settings, ds, actor=_key_fitting(actor), latch=self._latch)
        # no prefetch: Ray Data's iterator yields a block once the next ones it prefetches have come, and the
        # sample's last blocks would wait for rows that wait at the gate for the fit
        self._batches = iter(compressed.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
        while self.rows < expected:
            batch = next(self._batches, None)
            if batch is None:
                raise RuntimeError(f"the key fit's sample came back with {self.rows} of {expected} rows")
            rows, memory = _split_fit_rows(batch, self.settings)
            if memory is None:  # encoded with a key not yet fitted: the gate failed, write nothing
                raise RuntimeError("a chunk outside the key's sample came back before the key was fitted")
            self.fitted.append((rows, memory))
            self.rows += rows.num_rows
        ids = [c for rows, _ in self.fitted for c in rows.column("chunk_id").to_pylist()]
        # the n of smallest hash (a uniform sample of exactly n, whatever the blocks), in chunk-id order (the pool
        # returns batches in any order, and the fit should not depend on it)
        memory = np.concatenate([m for _, m in self.fitted])[hash_sample(ids, self.n, seed)]
        basis = fit_key_basis(memory, self.settings.key_dim, seed=seed)
        ray.get(self._latch.post.remote(basis))  # the gate opens, the actors encode with the fitted key
        say(f"[index] key basis {basis.digest}: {self.settings.key_dim} dimensions fitted on {len(memory)} chunks "
            f"({100 * basis.energy:.1f}% of their memories' energy) in {time.perf_counter() - t:.1f}s; "
            f"the {self.rows} chunks compressed for it are written with the run")
        return basis

    def batches(self, settings, key_basis: KeyBasis):
        """The run's encoded rows: the sample's (encoded here), then the rest as the actors return them."""
        try:
            while self.fitted:
                rows, memory = self.fitted.pop(0)
                yield encode_batch(rows, memory, settings, key_basis=key_basis)
            for batch in self._batches:
                rows, memory = _split_fit_rows(batch, self.settings)
                yield rows if memory is None else encode_batch(rows, memory, settings, key_basis=key_basis)
        finally:
            self.close()

    def close(self) -> None:
        """Release the latch (a gate still waiting fails, and with it the pipeline being torn down)."""
        import ray

        if self._latch is not None:
            ray.kill(self._latch)
            self._latch = None


def _latch():
    """A CPU-less actor that holds one value: ``wait()`` returns it once ``post(value)`` has been called."""
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class Latch:
        def __init__(self) -> None:
            self.value, self.posted = None, None

        async def post(self, value) -> None:
            self.value = value
            self._event().set()

        async def wait(self):
            await self._event().wait()
            return self.value

        def _event(self) -> asyncio.Event:  # made in the actor's event loop
            if self.posted is None:
                self.posted = asyncio.Event()
            return self.posted

    return Latch.remote()


def _after_fit(batch: pa.Table, latch) -> pa.Table:
    """The gate: ``batch``, once the key's basis has been fitted (posted to ``latch``)."""
    import ray

    ray.get(latch.wait.remote())
    return batch


def _split_fit_rows(batch: pa.Table, settings) -> tuple[pa.Table, np.ndarray | None]:
    """``(index rows without FIT_MEMORY, the float32 memory of a fit sample's rows or None)``."""
    column = batch.column(FIT_MEMORY)
    rows = batch.drop_columns([FIT_MEMORY])
    if column.null_count == batch.num_rows:
        return rows, None
    memory = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return rows, memory.reshape(batch.num_rows, settings.n_mem, settings.d).astype(np.float32, copy=False)


def _key_fitting(cls: type) -> type:
    """The compressor class ``cls`` (:class:`~clara.index.build.ChunkCompressor`, or a subclass a test or a
    fault injects) as a :class:`_KeyFit` run's actor: a block of the sample (:data:`FIT_SAMPLE` rows) comes
    back with its float32 memory in :data:`FIT_MEMORY` (the index columns provisional, with a random key: the
    driver encodes these rows again once the basis is fitted); any other block, which passed the gate, with
    the fitted key (the basis read from the latch once)."""
    from dataclasses import replace as _replace

    class KeyFitting(cls):
        def __init__(self, model_dir, settings, *, latch, key_basis=None, **kwargs) -> None:
            super().__init__(model_dir, _replace(settings, key_basis=""), key_basis=None, **kwargs)
            self.latch, self.fitted_settings, self.fitted_basis = latch, None, None

        def __call__(self, batch):
            if isinstance(batch, pa.RecordBatch):
                batch = pa.Table.from_batches([batch])
            flat = pa.list_(pa.float32(), self.settings.flat_dim)
            if FIT_SAMPLE in batch.column_names:
                rows, memory = self.compress_rows(batch)
                if hasattr(memory, "detach"):  # a torch tensor, on whichever device
                    memory = memory.detach().float().cpu().numpy()
                memory = np.asarray(memory, np.float32)
                out = encode_batch(rows, memory, self.settings)
                values = pa.array(memory.reshape(-1), pa.float32())
                return out.append_column(FIT_MEMORY, pa.FixedSizeListArray.from_arrays(values, self.settings.flat_dim)
                                         ).replace_schema_metadata(None)
            if self.fitted_basis is None:
                import ray

                self.fitted_basis = ray.get(self.latch.wait.remote())
                self.fitted_settings = _replace(self.settings, key_basis=self.fitted_basis.digest)
            self.settings, self.key_basis = self.fitted_settings, self.fitted_basis
            out = super().__call__(batch)
            return out.append_column(FIT_MEMORY, pa.nulls(out.num_rows, flat)).replace_schema_metadata(None)

    KeyFitting.__name__ = KeyFitting.__qualname__ = f"{cls.__name__}KeyFitting"
    return KeyFitting


def _compress_and_write(s: IndexSettings, settings, source, total: int, writer: IndexWriter,
                        key_basis=None, fit: _KeyFit | None = None) -> None:
    """Write the run's rows as they come back from the actor pool: ``fit``'s (a run that fitted the key on
    its pool: the sample's rows, then the rest), else ``source`` compressed (the chunks of the driver's plan,
    or the streamed plan's Ray Dataset)."""
    from pipelines import faults

    fault = faults.injected("index")
    if fit is not None:
        batches = fit.batches(settings, key_basis)
    else:
        ds = _compressed(s, settings, source, key_basis, _compressor_class())
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    try:
        for batch in batches:
            writer.add(batch)
            if writer.stats.commits >= fault.get("crash_after_commits", 1 << 62):
                raise faults.InjectedFault(
                    f"injected crash after {writer.stats.commits} commits (index.crash_after_commits)")
        writer.flush()
    except Exception as exc:
        # What was committed is whole (each commit is one merge_insert); a rerun skips it.
        raise IndexJobError(
            f"the index run failed after {writer.stats.rows} of {total} chunks were written "
            f"(table version {writer.stats.version}); rerun the same command to resume: {exc}",
            written=writer.stats.rows, version=writer.stats.version,
        ) from exc
    finally:
        if fit is not None:
            fit.close()


def _compressor_class() -> type:
    """The compressor actors' class: :class:`~clara.index.build.ChunkCompressor`, or one that fails after a
    few batches when a test injects the fault."""
    from pipelines import faults

    fault = faults.injected("index")
    if "fail_after_batches" in fault:
        return faults.failing_after(ChunkCompressor, fault["fail_after_batches"])
    return ChunkCompressor


# --------------------------------------------------------------------------------------------
# versions and rollback


def compressed_block_bytes(settings, call_rows: int, batch_size: int, commit_rows: int) -> int:
    """The Ray Data block size for compressed rows: one compressor call's rows, or half a commit if that
    is less (so that commits stream), never under one batch (nor 64 KiB)."""
    rows = max(batch_size, min(call_rows, max(1, commit_rows // 2)))
    # 3/4: Ray Data emits a block once its buffer is *over* the target, so a call whose rows are a little
    # smaller than the estimate would wait for the next call's rows
    return max(64 << 10, rows * settings.row_bytes() * 3 // 4)


def _existing_store(table_uri: str, table_name: str, storage_options: dict | None) -> ChunkStore:
    return ChunkStore.open(table_uri, None, table=table_name, create=False, storage_options=storage_options)


def list_versions(table_uri: str, table_name: str = DEFAULT_TABLE, storage_options: dict | None = None) -> list[dict]:
    """The table's versions, oldest first (``version``, ``timestamp``, ``metadata``, ``tags``: a sorted list)."""
    store = _existing_store(table_uri, table_name, storage_options)
    tags: dict[int, list[str]] = {}
    for name, version in store.tags().items():
        tags.setdefault(version, []).append(name)
    return [{**v, "tags": sorted(tags.get(int(v["version"]), []))} for v in store.versions()]


def rollback(table_uri: str, version: int, table_name: str = DEFAULT_TABLE, storage_options: dict | None = None) -> int:
    """Restore the table's content to ``version`` (as a new version, returned and tagged ``rollback-v<N>``);
    history is kept."""
    store = _existing_store(table_uri, table_name, storage_options)
    new = store.rollback(version)
    tag_version(store, "rollback")
    return new


def cleanup(table_uri: str, older_than: dt.timedelta, keep_tags: int | None = None, table_name: str = DEFAULT_TABLE,
            storage_options: dict | None = None) -> CleanupSummary:
    """Remove the table's untagged versions older than ``older_than`` (see :func:`clara.index.build.cleanup_index`)."""
    return cleanup_index(_existing_store(table_uri, table_name, storage_options), older_than, keep_tags)


# --------------------------------------------------------------------------------------------
# command line


def _storage_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _non_negative(kind: type) -> Callable[[str], float | int]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a non-negative {kind.__name__}, got {text!r}") from None
        if not 0 <= value < math.inf:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"expected a finite, non-negative {kind.__name__}, got {text!r}")
        return value

    return parse


def _table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table-uri", required=True, help="LanceDB database: a local directory or an object-store URI")
    p.add_argument("--table-name", default=DEFAULT_TABLE, help="the chunk table in it")
    p.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE",
                   help="object-store option passed to LanceDB (repeatable), e.g. region=us-east-1")


def _debug_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help="on an error in the input or settings, show the full traceback instead of one line")


#: Fields the command line (or ``--config``) must give.
REQUIRED = ("corpus", "model", "table_uri")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.index",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Subcommands: `versions --table-uri URI` lists the table's versions and their tags; "
               "`rollback VERSION --table-uri URI` restores one (as a new version); "
               "`cleanup --table-uri URI [--older-than-days D] [--keep-tags N]` removes old untagged versions; "
               "`manifest list|publish|rollback ID|prune --table-uri URI --shards N`: a sharded index's version "
               "manifests. Each has its own --help.",
    )
    add_config_flags(p)
    groups = {
        "corpus": ("corpus", "format", "id_field", "text_field", "title_field", "chunk_tokens", "overlap", "limit",
                   "delete_missing", "max_delete_fraction"),
        "compression (Ray Data actor pool)": ("model", "batch_size", "actors", "num_cpus_per_actor",
                                              "num_gpus_per_actor", "threads_per_actor", "device", "ray_address"),
    }
    for title, names in groups.items():
        add_flags(p.add_argument_group(title), IndexSettings, only=names, required=REQUIRED)
    add_flags(p.add_argument_group("table"), IndexSettings, required=REQUIRED,
                       exclude=[n for names in groups.values() for n in names])
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON (one line per shard with --shards and no --shard)")
    _debug_arg(p)
    return p


def _versions_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.index versions",
                                description="List the table's versions: version, time, tags, metadata.")
    _table_args(p)
    _debug_arg(p)
    return p


def _rollback_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.index rollback",
                                description="Restore the table's content to VERSION; this writes a new version "
                                            "(tagged rollback-v<N>), so the rollback itself can be undone.")
    p.add_argument("version", type=int)
    _table_args(p)
    _debug_arg(p)
    return p


def _cleanup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.index cleanup",
        description="Remove old untagged versions of the table and the files only they use. Every commit of a "
                    "run is a version and LanceDB keeps them all, so storage grows with every run until this is "
                    "run. The version each run ended on is tagged (index-v<N>, rollback-v<N>) and is kept, and so "
                    "are the latest version and every version a sharded index's manifest names "
                    "(manifest-<id>-...). A removed version can no longer be rolled back to, and a reader "
                    "still on it fails: keep --older-than-days above the longest time a reader holds a version.",
    )
    _table_args(p)
    p.add_argument("--older-than-days", type=_non_negative(float), default=7.0, metavar="DAYS",
                   help="retention: remove untagged versions older than this many days (default: 7)")
    _keep_tags_arg(p)
    _debug_arg(p)
    return p


def _keep_tags_arg(p) -> None:
    p.add_argument("--keep-tags", type=_non_negative(int), metavar="N",
                   help="with the cleanup, also drop this job's tags (index-v<N>, rollback-v<N>) except the newest "
                        "N, so that their versions go too and storage stays bounded; tags made by hand are kept "
                        "(default: keep every tag)")


def _run(a: argparse.Namespace) -> int:
    try:
        s = from_args(IndexSettings, a, required=REQUIRED)
    except ValueError as exc:
        return _user_error(exc)
    if a.print_config:
        print_config(s)
        return 0
    for summary in run_sharded(s, progress=lambda line: print(line, file=sys.stderr, flush=True)):
        print(json.dumps(asdict(summary)) if a.json else summary.format())
    return 0


def _versions(a: argparse.Namespace) -> int:
    for v in list_versions(a.table_uri, a.table_name, dict(a.storage_option) or None):
        tags = ",".join(v["tags"]) or "-"
        print(f"{v['version']:>6}  {v['timestamp']}  {tags}  {json.dumps(v.get('metadata') or {})}")
    return 0


def _rollback(a: argparse.Namespace) -> int:
    try:
        new = rollback(a.table_uri, a.version, a.table_name, dict(a.storage_option) or None)
    except ValueError as exc:  # a version not in the table's history (or a table of other settings)
        if a.debug:
            raise
        return _user_error(exc)
    print(f"restored version {a.version} of {a.table_uri}/{a.table_name} as version {new} (tagged rollback-v{new})")
    return 0


def _cleanup(a: argparse.Namespace) -> int:
    summary = cleanup(a.table_uri, dt.timedelta(days=a.older_than_days), a.keep_tags, a.table_name,
                      dict(a.storage_option) or None)
    print(f"cleanup {a.table_uri}/{a.table_name}: {summary.format()}")
    return 0


def _manifest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.index manifest",
        description="The version manifests of a sharded index (--shards N). A manifest names one version of every "
                    "shard; the Retriever and Serve read the newest one's versions, so they move to a new run all "
                    "at once and never mix shards of two runs. A run over every shard publishes one (--publish "
                    "auto); after parallel --shard jobs, `publish` when all have finished. `list` shows them, "
                    "`rollback ID` publishes manifest ID's versions again, `prune --keep N` drops all but the "
                    "newest N (and their tags, so that a cleanup may remove versions only they kept).",
    )
    p.add_argument("action", choices=("list", "publish", "rollback", "prune"))
    p.add_argument("manifest_id", nargs="?", type=int, help="with rollback: the manifest to serve again")
    _table_args(p)
    p.add_argument("--shards", type=int, help="the index's shard count (>= 2; not needed by list)")
    p.add_argument("--keep", type=int, default=10, help="with prune: manifests kept, newest first (default 10)")
    p.add_argument("--note", default="", help="with publish: a note stored on the manifest")
    _debug_arg(p)
    return p


def _manifest(a: argparse.Namespace) -> int:
    where = (a.table_uri, a.table_name, a.shards)
    options = dict(a.storage_option) or None
    if a.action == "list":
        manifests = read_manifests(a.table_uri, a.table_name, storage_options=options)
        for m in manifests:
            print(m.format())
        if not manifests:
            print(f"no manifest published for {a.table_uri}/{a.table_name}: readers see every shard's latest version")
        return 0
    if a.shards is None or a.shards < 2:
        return _user_error(ValueError(f"manifest {a.action}: give --shards, the index's shard count (>= 2)"))
    if a.action == "rollback":
        if a.manifest_id is None:
            return _user_error(ValueError("manifest rollback: give the manifest id to serve again"))
        print(f"published {rollback_manifest(*where, a.manifest_id, storage_options=options).format()}")
    elif a.action == "publish":
        print(f"published {publish_manifest(*where, note=a.note, storage_options=options).format()}")
    else:
        if a.keep < 1:
            return _user_error(ValueError(f"manifest prune: --keep must be >= 1 (the newest is served), got {a.keep}"))
        gone = prune_manifests(*where, keep=a.keep, storage_options=options)
        print(f"pruned manifests {gone}" if gone else "nothing to prune")
    return 0


def _user_error(exc: BaseException) -> int:
    """One line on stderr, ``clara index: <message>``, and exit status 2 (the traceback is for ``--debug``)."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


_SUBCOMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "versions": (_versions_parser, _versions),
    "rollback": (_rollback_parser, _rollback),
    "cleanup": (_cleanup_parser, _cleanup),
    "manifest": (_manifest_parser, _manifest),
    "run": (build_parser, _run),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.index [run|versions|rollback|cleanup|manifest] ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in _SUBCOMMANDS else "run"
    if argv and argv[0] == name:
        argv = argv[1:]
    make_parser, command = _SUBCOMMANDS[name]
    args = make_parser().parse_args(argv)
    try:
        return command(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        return _user_error(exc)


if __name__ == "__main__":
    sys.exit(main())
