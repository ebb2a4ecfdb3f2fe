"""Retrieval and reading as served: question -> top-k chunks' memory tokens -> answer.

:class:`Retriever` joins the query reasoner (:meth:`ClaraModel.encode_query`) and the chunk index
(:meth:`ChunkStore.search`, ANN proposal + exact CLaRa re-score). It answers with each chunk's ids,
text, exact score and memory ``[k, n_mem, d]`` as a torch tensor, ready for the generator. It also
follows the index: a new table version written by the index job is picked up by :meth:`Retriever.refresh`,
called by every request at most once per ``refresh_interval_s``.

:func:`generate_answers` is the reading half: a batch of questions, each with its own background
(memory ``[k_i, n_mem, d]`` or a list of chunk texts), answered by a ClaraModel (or anything with its
``generate`` / ``generate_from_text``, such as :class:`clara.vllm_engine.VllmGenerator`) in as few
generator calls as the batch allows.

The Serve deployments (``serve/app.py``) are thin shells over this module; it never imports ``ray``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clara.index.schema import (
    DEFAULT_TABLE,
    IndexMismatchError,
    IndexNotFoundError,
    StoreSettings,
    TextIndexMissingError,
)
from clara.index.shards import ShardedStore, latest_manifest
from clara.index.store import ChunkStore
from clara.model import ClaraModel

logger = logging.getLogger(__name__)


#: How :meth:`Retriever.retrieve` finds chunks (see :class:`Retriever`).
RETRIEVAL_MODES = ("latent", "hybrid")


class IndexUnavailableError(RuntimeError):
    """The index cannot be read now (table dropped, being rebuilt, files missing). Transient: the
    retriever reopens the table on its next refresh, so a restored or rebuilt table is served again."""


class IndexEmptyError(IndexUnavailableError):
    """The index holds no chunks: there is nothing to retrieve (the same in memory and text mode)."""

#: A background for one question: chunk memory ``[k, n_mem, d]`` (compressed RAG) or chunk texts (plain-text RAG).
Background = torch.Tensor | Sequence[str]


@dataclass
class Retrieved:
    """The top-k chunks of one question, best first."""

    chunk_ids: list[str]
    doc_ids: list[str]
    texts: list[str]
    scores: list[float]  # descending: exact CLaRa cosine (latent retrieval) or the fused score (hybrid)
    #: ``[k, n_mem, d]`` (float16 when the index stores float16, which is then exact; else float32),
    #: or ``None`` when memory was not asked for.
    memory: torch.Tensor | None
    index_version: int
    #: Wall time of this question's batch in the retriever (encode + search), in milliseconds.
    seconds: float = 0.0
    batch_size: int = 1
    #: Tokens of the chunks' text (what ``memory`` stands in for in the generator's context).
    text_tokens: int = 0

    def __len__(self) -> int:
        return len(self.chunk_ids)


def check_index(model: ClaraModel, settings: StoreSettings) -> None:
    """Raise :class:`IndexMismatchError` unless ``settings`` (a table's) were written by ``model``'s compressor."""
    problems = []
    if settings.n_mem != model.config.n_mem or settings.d != model.hidden_size:
        problems.append(f"memory shape: index [{settings.n_mem}, {settings.d}], model [{model.config.n_mem}, "
                        f"{model.hidden_size}]")
    version = model.compressor_version()
    if settings.compressor_version != version:
        problems.append(f"compressor_version: index {settings.compressor_version!r}, model {version!r}")
    if problems:
        raise IndexMismatchError("the index was built by another compressor than the served model's ("
                                 + "; ".join(problems) + "); rebuild it with this model (the index job)")


def _shard_count(store: ChunkStore | ShardedStore) -> int:
    return len(store.shards) if isinstance(store, ShardedStore) else 1


def _shard_versions(store: ChunkStore | ShardedStore) -> dict[str, Any]:
    """For a sharded index: the version read of each shard and whether a manifest pinned them."""
    if not isinstance(store, ShardedStore):
        return {}
    return {"shard_versions": list(store.versions_by_shard.values()), "manifest": store.manifest is not None}


def _same_manifest(store: ChunkStore | ShardedStore) -> bool:
    """Whether ``store`` is pinned to a manifest that is still the newest (one small read instead of
    reopening every shard)."""
    if not isinstance(store, ShardedStore) or store.manifest is None:
        return False
    try:
        return latest_manifest(store.uri, store.name, storage_options=store.storage_options) == store.manifest
    except Exception:  # unreadable: let the reopen find out and report it
        return False


def _opener(uri: Any, table: str, shards: int,
            storage_options: dict[str, str] | None = None) -> Callable[[], ChunkStore | ShardedStore]:
    """Opens the index afresh: one table, or the ``shards`` tables of a sharded one."""
    def reopen() -> ChunkStore | ShardedStore:
        if shards > 1:
            return ShardedStore.open(uri, table, shards, storage_options=storage_options)
        return ChunkStore.open(uri, None, table=table, create=False, storage_options=storage_options)

    return reopen


def _version_id(store: ChunkStore | ShardedStore) -> Any:
    """What tells two versions of the served index apart: the table's version, or the manifest and each shard's
    (a sum of shard versions could stay equal when one shard is rebuilt while another moves on)."""
    if isinstance(store, ShardedStore):
        return store.version if store.manifest is not None else None, tuple(store.versions_by_shard.values())
    return store.version


class Retriever:
    """Query reasoner + chunk index. Thread-safe: model and table calls are serialised by a lock.

    ``candidates``: rows the ANN search proposes per question before the exact re-score (at least k).
    ``refresh_interval_s``: the table is moved to its latest version at most this often, on the next
    call (``0``: every call; ``None``: only by :meth:`refresh` with ``force=True``). Raises
    :class:`IndexMismatchError` when the index was not built by ``model``'s compressor.

    A refresh opens the table afresh (``reopen``; default: the same uri and table name) rather than
    moving the open handle: a table that was dropped and rebuilt (re-indexing with a new compressor)
    is a new dataset the old handle cannot follow. The fresh handle replaces the served one when its
    version differs (or on a forced refresh, or after a failed read), so the ANN index caches survive
    quiet refreshes and health checks. While the table cannot be read, calls raise
    :class:`IndexUnavailableError` and every refresh tries again: a restored table is served without a
    restart. :meth:`health` probes all of it for readiness checks.

    ``retrieval``: ``latent`` (the query reasoner's memory against the chunks' memories) or ``hybrid``
    (:meth:`ChunkStore.hybrid_search`: latent and BM25 candidates fused by reciprocal rank, BM25's term
    weighted by ``text_weight``; needs the table's full-text index).
    """

    def __init__(self, model: ClaraModel, store: ChunkStore | ShardedStore, *, candidates: int = 50,
                 refresh_interval_s: float | None = 5.0, clock: Callable[[], float] = time.monotonic,
                 reopen: Callable[[], ChunkStore | ShardedStore] | None = None, retrieval: str = "latent",
                 text_weight: float = 1.0) -> None:
        if candidates <= 0:
            raise ValueError(f"candidates must be positive, got {candidates}")
        self.set_retrieval(retrieval, text_weight, store)
        if refresh_interval_s is not None and refresh_interval_s < 0:
            raise ValueError(f"refresh_interval_s must be >= 0 or None, got {refresh_interval_s}")
        check_index(model, store.settings)
        self.model = model
        self.store = store
        self.candidates = int(candidates)
        self.refresh_interval_s = refresh_interval_s
        self.clock = clock
        # the location only, not the handle: old handles (and their caches) are not kept alive
        self._reopen = reopen or _opener(store.uri, store.name, _shard_count(store))
        self._lock = threading.RLock()
        self._checked_at = clock()
        self._broken: Exception | None = None  # why the table cannot be read, until a refresh succeeds

    def __repr__(self) -> str:
        return (f"Retriever(store={self.store!r}, candidates={self.candidates}, retrieval={self.retrieval!r}, "
                f"refresh_interval_s={self.refresh_interval_s})")

    def set_retrieval(self, retrieval: str, text_weight: float = 1.0,
                      store: ChunkStore | ShardedStore | None = None) -> None:
        """Switch between ``latent`` and ``hybrid`` retrieval (live: Serve's ``reconfigure`` calls it).
        Raises :class:`TextIndexMissingError` for hybrid on a table without a full-text index."""
        if retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, got {retrieval!r}")
        if text_weight < 0:
            raise ValueError(f"text_weight must be >= 0, got {text_weight}")
        store = self.store if store is None else store
        if retrieval == "hybrid" and not store.has_text_index:
            raise TextIndexMissingError(f"hybrid retrieval needs a full-text index on the chunk table {store.name!r}: "
                                        "run the index job (it builds one unless --no-text-index)")
        self.retrieval, self.text_weight = retrieval, float(text_weight)

    @classmethod
    def open(cls, model: str | Path | ClaraModel, index_uri: str | Path, table: str = DEFAULT_TABLE, *,
             device: str | None = None, storage_options: dict[str, str] | None = None, shards: int = 1,
             **kwargs: Any) -> Retriever:
        """Load the model (a directory, or an already loaded :class:`ClaraModel`) and open its index
        (``shards`` > 1: the tables of a sharded index, read as one by :class:`ShardedStore`).

        Raises :class:`~clara.index.store.IndexNotFoundError` when the table does not exist and
        :class:`IndexMismatchError` when another compressor built it.
        """
        if not isinstance(model, ClaraModel):
            model = ClaraModel.from_pretrained(model, device=device)
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        reopen = _opener(index_uri, table, shards, storage_options)
        return cls(model, reopen(), reopen=reopen, **kwargs)

    # -- the index's version ------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.store.version

    def refresh(self, force: bool = False) -> int:
        """Move to the table's latest version if ``force`` or the refresh interval has passed; returns
        the version now read. A table rewritten by another compressor raises :class:`IndexMismatchError`,
        one that cannot be opened :class:`IndexUnavailableError` (both until a refresh succeeds)."""
        with self._lock:
            now = self.clock()
            due = self.refresh_interval_s is not None and now - self._checked_at >= self.refresh_interval_s
            if force or due:
                self._checked_at = now
                self._reload(swap=force)
            if self._broken is not None:
                raise self._broken
            return self.store.version

    def _reload(self, swap: bool) -> None:
        """Open the table afresh; serve the new handle if ``swap``, if the version moved, or after a failure
        (a table rebuilt to the same version number is only told apart by reads failing: ``_read``)."""
        if not swap and self._broken is None and _same_manifest(self.store):
            return  # a pinned sharded index whose manifest has not moved: nothing to reopen
        try:
            fresh = self._reopen()
            check_index(self.model, fresh.settings)
        except IndexMismatchError as exc:
            self._broken = exc
        except (IndexNotFoundError, OSError, RuntimeError, ValueError) as exc:  # lance reports I/O as these
            self._broken = IndexUnavailableError(f"the index table {self.store.name!r} cannot be opened "
                                                 f"({type(exc).__name__}: {str(exc)[:200]})")
        else:
            if swap or self._broken is not None or _version_id(fresh) != _version_id(self.store):
                self.store = fresh
            if self._broken is not None:
                logger.info("the index table %r can be read again (version %d)", self.store.name, fresh.version)
            self._broken = None
            return
        logger.warning("index table %r unusable: %s", self.store.name, self._broken)

    def _read(self, op: Callable[[], Any]) -> Any:
        """Run a table read; a read error reopens the table once (it may have been rebuilt) and retries."""
        self.refresh()
        try:
            return op()
        except (KeyError, IndexMismatchError, TextIndexMissingError):
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            logger.warning("index read failed (%s: %s); reopening the table", type(exc).__name__, str(exc)[:200])
            self.refresh(force=True)
            return op()

    def health(self) -> dict[str, Any]:
        """Probe the index as served: it opens, its compressor is the model's, it has rows. Raises
        :class:`IndexMismatchError` / :class:`IndexUnavailableError` / :class:`IndexEmptyError`, else
        returns :meth:`describe`. Serve's ``check_health`` and ``/readyz`` call it."""
        with self._lock:
            # a probe, not a forced refresh: the served handle (and its ANN caches) stays unless the
            # version moved, since Serve calls this every few seconds on every replica
            self._checked_at = self.clock()
            self._reload(swap=False)
            if self._broken is not None:
                raise self._broken
            if self.store.count() == 0:
                raise IndexEmptyError(f"the index table {self.store.name!r} holds no chunks")
            if self.retrieval == "hybrid" and not self.store.has_text_index:
                raise TextIndexMissingError(f"hybrid retrieval, but the index table {self.store.name!r} has no "
                                            "full-text index (rebuilt without one?)")
            return self.describe()

    # -- retrieval -------------------------------------------------------------------------------
    def _memory_out(self, memory: np.ndarray) -> torch.Tensor:
        out = torch.from_numpy(np.ascontiguousarray(memory))  # (k, M, D) float32
        # float16 storage round-trips exactly through float16: half the bytes to the generator.
        return out.half() if self.store.settings.dtype == "float16" else out

    def retrieve(self, questions: Sequence[str], k: int | Sequence[int] = 5, candidates: int | None = None,
                 with_memory: bool | Sequence[bool] = True) -> list[Retrieved]:
        """Top-``k`` chunks for each question (``k`` and ``with_memory`` may differ per question).

        One query-reasoner pass for the batch, then one two-step search; returns one :class:`Retrieved`
        per question, in order. Fewer than ``k`` chunks come back only when the index holds fewer.
        """
        questions = list(questions)
        n = len(questions)
        ks = [int(k)] * n if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        mems = [bool(with_memory)] * n if isinstance(with_memory, bool) else [bool(x) for x in with_memory]
        if len(ks) != n or len(mems) != n:
            raise ValueError("k and with_memory must have one value per question")
        if any(x <= 0 for x in ks):
            raise ValueError(f"k must be positive, got {ks}")
        t0 = time.perf_counter()
        with self._lock:
            query = self.model.encode_query(questions)  # (B, M, D)
            limit = max(ks)
            pool = max(candidates or self.candidates, limit)
            if self.retrieval == "hybrid":
                results = self._read(lambda: self.store.hybrid_search(query, questions, k=limit, candidates=pool,
                                                                      text_weight=self.text_weight))
            else:
                results = self._read(lambda: self.store.search(query, k=limit, candidates=pool))
            version = self.store.version
            if results and not len(results[0].chunk_ids):
                raise IndexEmptyError(f"the index table {self.store.name!r} holds no chunks")
            # under the lock: a fast tokenizer shared between threads can fail ("Already borrowed")
            counts = self._token_counts([t for res, kk in zip(results, ks) for t in res.texts[:kk]])
        seconds = time.perf_counter() - t0
        out = []
        for res, kk, mem in zip(results, ks, mems):
            out.append(Retrieved(
                chunk_ids=res.chunk_ids[:kk], doc_ids=res.doc_ids[:kk], texts=res.texts[:kk],
                scores=[float(s) for s in res.scores[:kk]],
                memory=self._memory_out(res.memory[:kk]) if mem else None,
                index_version=version, seconds=seconds, batch_size=n,
                text_tokens=sum(counts[:len(res.texts[:kk])]),
            ))
            counts = counts[len(res.texts[:kk]):]
        return out

    def _token_counts(self, texts: list[str]) -> list[int]:
        limit = self.model.config.doc_max_tokens  # what the compressor read of each chunk
        if not texts:
            return []
        ids = self.model.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [min(len(x), limit) for x in ids]

    def memory_of(self, chunk_ids: Sequence[str]) -> torch.Tensor:
        """Stored memory ``[n, n_mem, d]`` of these chunks (KeyError names the missing ones)."""
        with self._lock:
            return self._memory_out(self._read(lambda: self.store.get_memory(list(chunk_ids))))

    def compress(self, texts: Sequence[str]) -> torch.Tensor:
        """Chunks -> memory ``[n, n_mem, d]`` with the index's compressor (what indexing them would store,
        before storage rounding)."""
        with self._lock:
            return self.model.compress(list(texts))

    def describe(self) -> dict[str, Any]:
        """Identity of what is served: memory shape, compressor version, index version and size."""
        with self._lock:
            s = self.store.settings
            return {"n_mem": s.n_mem, "d": s.d, "compressor_version": s.compressor_version, "dtype": s.dtype,
                    "index_uri": self.store.uri, "table": self.store.name, "index_version": self.store.version,
                    "rows": self.store.count(), "retrieval": self.retrieval,
                    "shards": _shard_count(self.store), **_shard_versions(self.store)}


def generate_answers(generator: Any, questions: Sequence[str], backgrounds: Sequence[Background],
                     max_new_tokens: int | None = None) -> list[str]:
    """Answer each question from its own background, in as few generator calls as possible.

    ``backgrounds[i]``: memory ``[k_i, n_mem, d]`` (questions with the same k share one
    ``generator.generate`` call on ``[B, k, n_mem, d]``) or a list of chunk texts (all of them share one
    ``generator.generate_from_text`` call). ``generator``: a :class:`ClaraModel` or anything with the same
    two methods. Answers come back in the order of ``questions``.
    """
    if len(questions) != len(backgrounds):
        raise ValueError(f"{len(questions)} questions but {len(backgrounds)} backgrounds")
    answers: list[str | None] = [None] * len(questions)
    by_k: dict[int, list[int]] = {}
    text_rows: list[int] = []
    for i, bg in enumerate(backgrounds):
        if isinstance(bg, (torch.Tensor, np.ndarray)):
            mem = torch.as_tensor(bg)
            if mem.dim() != 3:
                raise ValueError(f"memory of question {i} must be [k, n_mem, d], got {tuple(mem.shape)}")
            by_k.setdefault(int(mem.shape[0]), []).append(i)
        else:
            text_rows.append(i)
    device = getattr(generator, "device", None)
    for rows in by_k.values():
        memory = torch.stack([torch.as_tensor(backgrounds[i]) for i in rows])  # (B, k, M, D)
        if device is not None:
            memory = memory.to(device)
        for i, a in zip(rows, generator.generate([questions[i] for i in rows], memory, max_new_tokens=max_new_tokens)):
            answers[i] = a
    if text_rows:
        chunks = [list(backgrounds[i]) for i in text_rows]
        for i, a in zip(text_rows, generator.generate_from_text([questions[i] for i in text_rows], chunks,
                                                                max_new_tokens=max_new_tokens)):
            answers[i] = a
    return [a if a is not None else "" for a in answers]


__all__ = ["RETRIEVAL_MODES", "Background", "IndexEmptyError", "IndexUnavailableError", "Retrieved", "Retriever",
           "check_index", "generate_answers"]
