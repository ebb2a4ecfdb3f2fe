"""One logical chunk index in several LanceDB tables (shards), read as one.

A document belongs to shard :func:`~clara.index.schema.shard_of` ``(doc_id, n)``, stored in the table
:func:`~clara.index.schema.shard_table` ``(table, i, n)`` (``chunks-00of04`` ...). The index job writes one
shard per run (``--shards N --shard I``; every shard in turn without ``--shard``), so its plan, deletions
and ANN index are per shard and shards can be built on different nodes at once.

:class:`ShardedStore` serves reads across all shards: each search runs on every shard in parallel
(threads: LanceDB releases the GIL) and the per-shard top-k are merged into the global one. The exact
CLaRa cosine is comparable across shards (every shard holds the same compressor's memory), so latent
search merges by score and gives what one table would. BM25 scores depend on per-shard term statistics;
with shards of a hash split they differ little, but :meth:`text_search` merged by score is an
approximation of one table's BM25. Hybrid search fuses the merged latent and BM25 candidate lists once,
globally, as one table does.

**Versions: the manifest.** Each shard has its own LanceDB versions, and shard jobs finish at different
times. A *manifest* is one row of the table :func:`~clara.index.schema.manifest_table` (``chunks-manifest``)
naming a version for every shard; :func:`publish_manifest` appends one (after a run over every shard,
or by hand after parallel shard jobs), tagging each named version ``manifest-<id>`` so that a cleanup
keeps it. :meth:`ShardedStore.open` reads every shard at the newest manifest's versions (LanceDB
``checkout``) and reports the manifest id as its ``version``, so a reader never mixes shards of two runs
and moves to a new run all at once. A rollback is a new manifest naming an older one's versions
(:func:`rollback_manifest`). An index without a manifest table is read at each shard's latest version.

This module never imports ``ray``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clara.index.schema import (
    DEFAULT_TABLE,
    MANIFEST_SCHEMA,
    MEMORY_FIELDS,
    IndexMismatchError,
    manifest_table,
    shard_table,
)
from clara.index.store import ChunkStore, SearchResult, hybrid_search, memory_in_order, merge_results

logger = logging.getLogger(__name__)

_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that made it, the pool)
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One thread pool for every sharded store of the process (a Retriever reopens its store on each refresh:
    a pool per store would leave threads behind); a forked child, which has none of its parent's threads,
    makes its own."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=64, thread_name_prefix="clara-shard"))
        return _POOL[1]


# ---- manifests: one published version of every shard


#: The tag a manifest puts on each shard version it names (kept by cleanups until the manifest is pruned).
MANIFEST_TAG = re.compile(r"^manifest-(\d+)(?:-[0-9a-f]+)?$")


class ManifestError(ValueError):
    """A manifest cannot be written or read as asked (shard count, unknown id or version, a concurrent publish)."""


@dataclass(frozen=True)
class Manifest:
    """One published version of a sharded index: shard ``i`` is read at ``versions[i]``."""

    manifest_id: int
    versions: tuple[int, ...]
    created_at: _dt.datetime
    compressor_version: str = ""
    note: str = ""
    #: The tag on each named shard version (kept by cleanups until :func:`prune_manifests`).
    tag: str = ""

    def format(self) -> str:
        return (f"manifest {self.manifest_id} ({self.created_at:%Y-%m-%d %H:%M:%S} UTC): shard versions "
                f"{list(self.versions)}" + (f", {self.note}" if self.note else ""))


def _connect(uri: Any, storage_options: dict[str, str] | None):
    import lancedb

    return lancedb.connect(str(uri), **({"storage_options": storage_options} if storage_options else {}))


def _manifest_handle(db: Any, table: str, create: bool) -> Any:
    name = manifest_table(table)
    try:
        return db.open_table(name)
    except (FileNotFoundError, ValueError):
        if not create:
            return None
    try:
        return db.create_table(name, schema=MANIFEST_SCHEMA)
    except Exception:  # lost a race with another creator
        return db.open_table(name)


def read_manifests(uri: Any, table: str = DEFAULT_TABLE, *,
                   storage_options: dict[str, str] | None = None) -> list[Manifest]:
    """The index's manifests, oldest first (``[]`` when none was ever published)."""
    handle = _manifest_handle(_connect(uri, storage_options), table, create=False)
    return [] if handle is None else _rows(handle)


def _rows(handle: Any) -> list[Manifest]:
    rows = handle.to_arrow().to_pylist()
    out = [Manifest(int(r["manifest_id"]), tuple(int(v) for v in r["versions"]), r["created_at"],
                    r["compressor_version"] or "", r["note"] or "", r["tag"] or "") for r in rows]
    return sorted(out, key=lambda m: (m.manifest_id, m.created_at))


def latest_manifest(uri: Any, table: str = DEFAULT_TABLE, *,
                    storage_options: dict[str, str] | None = None) -> Manifest | None:
    manifests = read_manifests(uri, table, storage_options=storage_options)
    return manifests[-1] if manifests else None


def _open_shards(uri: Any, table: str, shards: int, storage_options: dict[str, str] | None) -> list[ChunkStore]:
    def one(i: int) -> ChunkStore:
        return ChunkStore.open(uri, None, table=shard_table(table, i, shards), create=False,
                               storage_options=storage_options)

    return list(_pool().map(one, range(shards)))


def publish_manifest(uri: Any, table: str = DEFAULT_TABLE, shards: int = 2, *,
                     updates: Mapping[int, int] | None = None, note: str = "",
                     storage_options: dict[str, str] | None = None) -> Manifest:
    """Append a manifest and return it: readers (:meth:`ShardedStore.open`, the Retriever, Serve) move to it.

    ``updates=None``: every shard at its latest version (call it when every shard's job has finished).
    ``updates={shard: version}``: those shards at those versions, the others as the newest manifest has
    them (at their latest version when there is none), e.g. after a run that rewrote one shard. Each named
    version is tagged ``manifest-<id>-<token>``, so cleanups keep it. Publish from one place at a time: two
    publishes at once both write a row with the same id (each keeps its tags, so neither's versions can
    be cleaned up); the newer row is served and the later check raises :class:`ManifestError`.
    """
    if shards < 2:
        raise ManifestError(f"a manifest is for a sharded index (--shards >= 2), got {shards}")
    last = latest_manifest(uri, table, storage_options=storage_options)
    if last is not None and len(last.versions) != shards:
        raise ManifestError(f"the manifests of {table!r} name {len(last.versions)} shards, not {shards}: a "
                            "different shard count is a new index (another table name)")
    stores = _open_shards(uri, table, shards, storage_options)
    ShardedStore(stores, str(uri), table)  # every shard of the same compressor and storage settings
    if updates is None:
        versions = [s.version for s in stores]
    else:
        versions = list(last.versions) if last is not None else [s.version for s in stores]
        for shard, version in updates.items():
            if not 0 <= int(shard) < shards:
                raise ManifestError(f"shard {shard} is not in [0, {shards})")
            versions[int(shard)] = int(version)
    for store, version in zip(stores, versions):
        known = {int(v["version"]) for v in store.versions()}
        if version not in known:
            raise ManifestError(f"shard table {store.name!r} has no version {version} (removed by a cleanup?)")
    manifest_id = (last.manifest_id + 1) if last is not None else 1
    tag = f"manifest-{manifest_id}-{uuid.uuid4().hex[:8]}"
    for store, version in zip(stores, versions):
        try:
            store.tag(tag, version)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ManifestError(f"could not tag version {version} of {store.name!r}: {str(exc)[:200]}") from exc
    manifest = Manifest(manifest_id, tuple(versions), _dt.datetime.now(_dt.timezone.utc),
                        stores[0].settings.compressor_version, note, tag)
    handle = _manifest_handle(_connect(uri, storage_options), table, create=True)
    handle.add(pa.Table.from_pylist([{
        "manifest_id": manifest.manifest_id, "created_at": manifest.created_at, "versions": list(manifest.versions),
        "compressor_version": manifest.compressor_version, "note": manifest.note, "tag": tag,
    }], schema=MANIFEST_SCHEMA))
    handle.checkout_latest()
    rows = _rows(handle)
    if sum(m.manifest_id == manifest_id for m in rows) > 1:
        raise ManifestError(f"another publish wrote manifest {manifest_id} of {table!r} at the same time; the newer "
                            f"row is served ({rows[-1].format()}): publish again if yours should be")
    return manifest


def rollback_manifest(uri: Any, table: str = DEFAULT_TABLE, shards: int = 2, manifest_id: int = 0, *,
                      storage_options: dict[str, str] | None = None) -> Manifest:
    """Serve the shard versions of manifest ``manifest_id`` again, as a new manifest (history is kept)."""
    old = next((m for m in read_manifests(uri, table, storage_options=storage_options)
                if m.manifest_id == manifest_id), None)
    if old is None:
        raise ManifestError(f"{table!r} has no manifest {manifest_id}")
    return publish_manifest(uri, table, shards, updates=dict(enumerate(old.versions)),
                            note=f"rollback to manifest {manifest_id}", storage_options=storage_options)


def prune_manifests(uri: Any, table: str = DEFAULT_TABLE, shards: int = 2, keep: int = 10, *,
                    storage_options: dict[str, str] | None = None) -> list[int]:
    """Delete all but the newest ``keep`` (>= 1) manifests and their shard tags, so that a later cleanup
    may remove the versions only they named; returns the ids removed."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest manifest is the one served), got {keep}")
    if shards < 2:
        raise ManifestError(f"a manifest is for a sharded index (--shards >= 2), got {shards}")
    db = _connect(uri, storage_options)
    handle = _manifest_handle(db, table, create=False)
    if handle is None:
        return []
    gone = sorted({m.manifest_id for m in _rows(handle)})[:-keep]
    if not gone:
        return []
    dropped = set(gone)
    for store in _open_shards(uri, table, shards, storage_options):
        for name in store.tags():
            match = MANIFEST_TAG.match(name)
            if match and int(match.group(1)) in dropped:
                store.untag(name)
    handle.delete(f"manifest_id <= {gone[-1]}")
    return gone


class ShardedStore:
    """The shards of one index, read as one table (the read API of :class:`ChunkStore` that retrieval uses)."""

    def __init__(self, shards: Sequence[ChunkStore], uri: str, name: str, manifest: Manifest | None = None,
                 storage_options: dict[str, str] | None = None, *, pinned: bool = False) -> None:
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        first = shards[0].settings
        for shard in shards[1:]:  # the key may differ: each shard's search projects the query with its own
            diff = first.differences(shard.settings, MEMORY_FIELDS)
            if diff:
                raise IndexMismatchError(f"shard {shard.name!r} was built with other settings than {shards[0].name!r} "
                                         f"({', '.join(diff)}): rebuild it with the same compressor and storage")
        self.shards = list(shards)
        self.settings = first
        self.uri, self.name = uri, name
        self.manifest: Manifest | None = None
        self.storage_options = storage_options
        self._pinned = pinned or manifest is not None  # follow manifests on refresh (one may come later)
        if manifest is not None:
            self._pin(manifest)

    @classmethod
    def open(cls, uri: Any, table: str = DEFAULT_TABLE, shards: int = 2, *,
             storage_options: dict[str, str] | None = None, pinned: bool = True) -> ShardedStore:
        """Open the ``shards`` tables of ``table`` in the LanceDB database at ``uri`` (all must exist), in
        parallel, each at the newest manifest's version (``pinned=False``, or no manifest: the latest)."""
        stores = _open_shards(uri, table, shards, storage_options)
        manifest = latest_manifest(uri, table, storage_options=storage_options) if pinned else None
        return cls(stores, str(uri), table, manifest, storage_options, pinned=pinned)

    def _pin(self, manifest: Manifest) -> None:
        """Check every shard out at the manifest's version: all or none (a failure puts back what was read)."""
        if len(manifest.versions) != len(self.shards):
            raise IndexMismatchError(f"manifest {manifest.manifest_id} of {self.name!r} names "
                                     f"{len(manifest.versions)} shards, the index is opened with {len(self.shards)}")
        if manifest.compressor_version and manifest.compressor_version != self.settings.compressor_version:
            raise IndexMismatchError(f"manifest {manifest.manifest_id} of {self.name!r} was published for compressor "
                                     f"{manifest.compressor_version!r}, the shards hold "
                                     f"{self.settings.compressor_version!r}")
        try:
            list(_pool().map(lambda sv: sv[0].checkout(sv[1]), zip(self.shards, manifest.versions)))
        except Exception:
            for i, shard in enumerate(self.shards):
                try:
                    if self.manifest is not None:
                        shard.checkout(self.manifest.versions[i])
                    else:
                        shard.refresh()
                except Exception as exc:  # the first error is the one raised
                    logger.warning("could not put shard %r back after a failed pin: %s", shard.name, exc)
            raise
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"ShardedStore({self.uri!r}, {self.name!r}, shards={len(self.shards)}, {self.settings})"

    def _each(self, call: Callable[[ChunkStore], Any]) -> list[Any]:
        return list(_pool().map(call, self.shards))

    # ---- what retrieval reads

    @property
    def version(self) -> int:
        """The manifest's id; without a manifest, the sum of the shards' versions (it changes whenever one
        shard's version does)."""
        if self.manifest is not None:
            return self.manifest.manifest_id
        return sum(s.version for s in self.shards)

    @property
    def versions_by_shard(self) -> dict[str, int]:
        return {s.name: s.version for s in self.shards}

    def count(self, filter: str | None = None) -> int:
        return sum(self._each(lambda s: s.count(filter)))

    def __len__(self) -> int:
        return self.count()

    @property
    def has_text_index(self) -> bool:
        return all(s.has_text_index for s in self.shards)

    def list_indices(self) -> list[Any]:
        return [i for s in self.shards for i in s.list_indices()]

    def search(self, query_memory: Any, k: int = 5, candidates: int = 50, **kwargs: Any) -> list[SearchResult]:
        """:meth:`ChunkStore.search` on every shard (each proposes ``candidates`` and re-scores them exactly),
        merged to the global top-``k`` by the exact cosine."""
        parts = self._each(lambda s: s.search(query_memory, k=k, candidates=candidates, **kwargs))
        return [merge_results([p[b] for p in parts], k) for b in range(len(parts[0]))]

    def exact_search(self, query_memory: Any, k: int = 5, **kwargs: Any) -> list[SearchResult]:
        parts = self._each(lambda s: s.exact_search(query_memory, k=k, **kwargs))
        return [merge_results([p[b] for p in parts], k) for b in range(len(parts[0]))]

    def text_search(self, questions: Sequence[str], k: int = 50, **kwargs: Any) -> list[SearchResult]:
        """BM25 on every shard, merged by score (per-shard term statistics: see the module docstring)."""
        questions = list(questions)
        parts = self._each(lambda s: s.text_search(questions, k=k, **kwargs))
        return [merge_results([p[b] for p in parts], k) for b in range(len(questions))]

    def hybrid_search(self, query_memory: Any, questions: Sequence[str], k: int = 5, candidates: int = 50, *,
                      text_candidates: int | None = None, text_weight: float = 1.0, rrf_k: int = 60,
                      filter: str | None = None, **ann: Any) -> list[SearchResult]:
        """As :meth:`ChunkStore.hybrid_search`, over the merged latent and BM25 candidates of all shards."""
        return hybrid_search(self, self.shards[0]._queries(query_memory), questions, k, candidates, text_candidates,
                             text_weight, rrf_k, filter, ann)

    def find_memory(self, chunk_ids: Iterable[str]) -> dict[str, np.ndarray]:
        wanted = sorted({str(c) for c in chunk_ids})
        found: dict[str, np.ndarray] = {}
        for part in self._each(lambda s: s.find_memory(wanted)):
            found.update(part)
        return found

    def get_memory(self, chunk_ids: Sequence[str]) -> np.ndarray:
        """Memories ``float32 [n, n_mem, d]`` in the order of ``chunk_ids`` from whichever shard holds each
        (a chunk id does not name its shard); KeyError names missing ids."""
        chunk_ids = [str(c) for c in chunk_ids]
        return memory_in_order(self.find_memory(chunk_ids), chunk_ids, self.settings)

    def refresh(self) -> int:
        """Move to the newest manifest (pinned) or to every shard's latest version; returns :attr:`version`."""
        if self._pinned:
            newest = latest_manifest(self.uri, self.name, storage_options=self.storage_options)
            if newest is not None:
                if newest != self.manifest:
                    self._pin(newest)
                return self.version
        for s in self.shards:
            s.refresh()
        return self.version


__all__ = [
    "MANIFEST_TAG",
    "Manifest",
    "ManifestError",
    "ShardedStore",
    "latest_manifest",
    "prune_manifests",
    "publish_manifest",
    "read_manifests",
    "rollback_manifest",
]
