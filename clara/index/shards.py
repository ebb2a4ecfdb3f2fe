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

This module never imports ``ray``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from clara.index.schema import DEFAULT_TABLE, IndexMismatchError, shard_table
from clara.index.store import ChunkStore, SearchResult, hybrid_search, memory_in_order, merge_results

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


class ShardedStore:
    """The shards of one index, read as one table (the read API of :class:`ChunkStore` that retrieval uses)."""

    def __init__(self, shards: Sequence[ChunkStore], uri: str, name: str) -> None:
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        first = shards[0].settings
        for shard in shards[1:]:
            diff = first.differences(shard.settings)
            if diff:
                raise IndexMismatchError(f"shard {shard.name!r} was built with other settings than {shards[0].name!r} "
                                         f"({', '.join(diff)}): rebuild it with the same compressor and storage")
        self.shards = list(shards)
        self.settings = first
        self.uri, self.name = uri, name

    @classmethod
    def open(cls, uri: Any, table: str = DEFAULT_TABLE, shards: int = 2, *,
             storage_options: dict[str, str] | None = None) -> ShardedStore:
        """Open the ``shards`` tables of ``table`` in the LanceDB database at ``uri`` (all must exist), in
        parallel."""
        def one(i: int) -> ChunkStore:
            return ChunkStore.open(uri, None, table=shard_table(table, i, shards), create=False,
                                   storage_options=storage_options)

        return cls(list(_pool().map(one, range(shards))), str(uri), table)

    def __repr__(self) -> str:
        return f"ShardedStore({self.uri!r}, {self.name!r}, shards={len(self.shards)}, {self.settings})"

    def _each(self, call: Callable[[ChunkStore], Any]) -> list[Any]:
        return list(_pool().map(call, self.shards))

    # ---- what retrieval reads

    @property
    def version(self) -> int:
        """The sum of the shards' versions: it changes whenever one shard's version does."""
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
        for s in self.shards:
            s.refresh()
        return self.version


__all__ = ["ShardedStore"]
