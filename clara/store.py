"""The chunk index: one LanceDB table of compressed chunks, and the one module that owns its schema.

Every row is one chunk: its ids and text, its CLaRa memory tokens (``[n_mem, d]``, stored flat as a
fixed-size list in float32, float16, or int8 with a per-token scale) and a low-dimensional ``key``
(a fixed, seeded random projection of the flattened memory) that the ANN index searches. Search is
two-step: the ANN search on ``key`` proposes candidates, which are re-scored with the exact CLaRa
score (cosine of the flattened memories) on their full memory.

The settings that produced the table (shape, compressor version, storage dtype, key projection)
live in the Arrow schema metadata of the table under ``b"clara"``; opening the table with other
settings raises :class:`IndexMismatchError`.

``lancedb`` is imported lazily, inside the functions that need it; this module never imports ``ray``
or ``torch`` (torch tensors are accepted through duck typing).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clara.corpus import content_hash  # the one formula: rows written here and by the index job compare alike

logger = logging.getLogger(__name__)

METADATA_KEY = b"clara"
FORMAT_VERSION = 1
KEY_SCHEME = "pcg64-box-muller-gaussian-v1"  # bump if key_projection ever changes: old keys would no longer match
DTYPES = ("float32", "float16", "int8")
ANN_KINDS = ("IVF_FLAT", "IVF_SQ", "IVF_PQ", "IVF_RQ", "IVF_HNSW_FLAT", "IVF_HNSW_SQ", "IVF_HNSW_PQ")
METRICS = ("cosine", "dot")
DEFAULT_TABLE = "chunks"

# Fields whose difference makes an existing table unusable with the requested settings.
_IDENTITY_FIELDS = ("n_mem", "d", "compressor_version", "dtype", "key_dim", "key_seed")
_EPS = 1e-12
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_ID_BATCH = 4096  # ids per IN-list when reading rows by id


class IndexMismatchError(ValueError):
    """The table was written with other settings (shape, compressor, dtype, key) than requested."""


class IndexNotFoundError(FileNotFoundError):
    """The table does not exist and ``create=False`` was given."""


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class StoreSettings:
    """What produced an index: the memory shape, the compressor, the storage dtype and the key."""

    n_mem: int
    d: int
    compressor_version: str
    dtype: str = "float16"
    key_dim: int = 128
    key_seed: int = 0
    model: str = ""
    compression_rate: int = 0

    def __post_init__(self) -> None:
        for name in ("n_mem", "d", "key_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"StoreSettings.{name} must be a positive int, got {value!r}")
        for name in ("key_seed", "compression_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"StoreSettings.{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.compressor_version, str) or not self.compressor_version.strip():
            raise ValueError("StoreSettings.compressor_version must be a non-empty string")
        if self.dtype not in DTYPES:
            raise ValueError(f"StoreSettings.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.model, str):
            raise ValueError(f"StoreSettings.model must be a string, got {self.model!r}")
        # normalise numpy ints so that equality and JSON behave
        for name in ("n_mem", "d", "key_dim", "key_seed", "compression_rate"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def flat_dim(self) -> int:
        """Length of the flattened memory, ``n_mem * d``."""
        return self.n_mem * self.d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_metadata(self) -> dict[bytes, bytes]:
        """Arrow schema metadata: ``{b"clara": JSON}``."""
        payload = {"format": FORMAT_VERSION, "key_scheme": KEY_SCHEME, **self.to_dict()}
        return {METADATA_KEY: json.dumps(payload, sort_keys=True).encode("utf-8")}

    @classmethod
    def from_metadata(cls, metadata: Mapping[Any, Any] | None) -> StoreSettings:
        """Read settings back from Arrow schema metadata (bytes or str keys)."""
        raw = None
        for key, value in (metadata or {}).items():
            if (key.decode("utf-8") if isinstance(key, bytes) else key) == METADATA_KEY.decode():
                raw = value
                break
        if raw is None:
            raise IndexMismatchError("the table has no b'clara' schema metadata: not a CLaRa chunk index")
        payload = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        fmt = payload.pop("format", None)
        scheme = payload.pop("key_scheme", None)
        if fmt != FORMAT_VERSION:
            raise IndexMismatchError(f"unsupported index format {fmt!r} (this library reads {FORMAT_VERSION})")
        if scheme != KEY_SCHEME:
            raise IndexMismatchError(f"unsupported key scheme {scheme!r} (this library writes {KEY_SCHEME!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in names})

    def differences(self, other: StoreSettings) -> list[str]:
        """Identity fields (shape, compressor, dtype, key) on which the two settings differ."""
        return [name for name in _IDENTITY_FIELDS if getattr(self, name) != getattr(other, name)]


def index_schema(settings: StoreSettings) -> pa.Schema:
    """The Arrow schema of the chunk table. Vectors are fixed-size lists, never variable lists."""
    if settings.dtype == "int8":
        memory_fields = [
            pa.field("memory", pa.list_(pa.int8(), settings.flat_dim), nullable=False),
            pa.field("memory_scale", pa.list_(pa.float32(), settings.n_mem), nullable=False),
        ]
    else:
        value_type = pa.float16() if settings.dtype == "float16" else pa.float32()
        memory_fields = [pa.field("memory", pa.list_(value_type, settings.flat_dim), nullable=False)]
    fields = [
        pa.field("chunk_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string()),
        pa.field("position", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("content_hash", pa.string()),
        *memory_fields,
        pa.field("key", pa.list_(pa.float32(), settings.key_dim), nullable=False),
        pa.field("compressor_version", pa.string()),
        pa.field("indexed_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(fields, metadata=settings.to_metadata())


# --------------------------------------------------------------------------------------------
# numerics: keys, quantisation, the CLaRa score


def _as_float32(x: Any) -> np.ndarray:
    """numpy float32 view of a numpy array, a torch tensor (any device, bf16 included) or a list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _stable_gaussian(seed: int, count: int) -> np.ndarray:
    """``count`` standard normal float64 draws that do not depend on the numpy version.

    ``Generator.standard_normal`` may change its algorithm between numpy releases (NEP 19), which would
    silently change every key. So only the raw PCG64 stream of ``default_rng(seed)`` is used (a fixed
    algorithm), turned into normals with Box-Muller.
    """
    half = (count + 1) // 2
    raw = np.random.default_rng(seed).bit_generator.random_raw(2 * half)
    uniform = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1), 53-bit
    radius = np.sqrt(-2.0 * np.log(uniform[:half]))
    angle = 2.0 * np.pi * uniform[half:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


@functools.lru_cache(maxsize=8)
def _cached_projection(flat_dim: int, key_dim: int, seed: int) -> np.ndarray:
    matrix = (_stable_gaussian(seed, flat_dim * key_dim) / math.sqrt(key_dim)).astype(np.float32)
    matrix = matrix.reshape(flat_dim, key_dim)
    matrix.setflags(write=False)
    return matrix


def key_projection(n_mem: int, d: int, key_dim: int, seed: int = 0) -> np.ndarray:
    """The fixed, seeded Gaussian random projection ``[n_mem*d, key_dim]`` (scaled ``1/sqrt(key_dim)``).

    Deterministic across machines and numpy versions (the raw PCG64 stream of ``default_rng(seed)``,
    Box-Muller) and cached per (shape, seed); the returned array is read-only.
    """
    if n_mem <= 0 or d <= 0 or key_dim <= 0 or seed < 0:
        raise ValueError(f"bad projection shape/seed: n_mem={n_mem}, d={d}, key_dim={key_dim}, seed={seed}")
    return _cached_projection(int(n_mem) * int(d), int(key_dim), int(seed))


def _rows(x: np.ndarray) -> np.ndarray:
    """``[N, ...]`` -> ``[N, prod(...)]`` (also for N = 0)."""
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, _EPS)


def project_keys(memory: Any, key_dim: int = 128, seed: int = 0) -> np.ndarray:
    """ANN keys ``[N, key_dim]`` (float32, unit norm) of memories ``[N, n_mem, d]`` (or one ``[n_mem, d]``).

    The flattened memory is L2-normalised, projected with :func:`key_projection` and L2-normalised
    again, so the dot product of two keys approximates the CLaRa cosine of the two memories.
    """
    mem = _as_float32(memory)
    if mem.ndim == 2:
        mem = mem[None]
    if mem.ndim != 3:
        raise ValueError(f"memory must be [N, n_mem, d] or [n_mem, d], got shape {mem.shape}")
    _, n_mem, d = mem.shape
    flat = _l2_normalise(_rows(mem))
    return _l2_normalise(flat @ key_projection(n_mem, d, key_dim, seed)).astype(np.float32, copy=False)


def quantize_int8(memory: Any) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: ``codes [N, n_mem, d] int8`` and ``scale [N, n_mem] float32``.

    ``memory ~= codes * scale[..., None]``; codes lie in [-127, 127]; an all-zero token gets scale 0.
    """
    mem = _as_float32(memory)
    if mem.ndim != 3:
        raise ValueError(f"memory must be [N, n_mem, d], got shape {mem.shape}")
    scale = (np.abs(mem).max(axis=-1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(mem / safe[..., None]), -127, 127).astype(np.int8)
    return codes, scale


def dequantize_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8`: ``float32 [N, n_mem, d]``."""
    return np.asarray(codes, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[..., None]


def to_float16(memory: Any) -> np.ndarray:
    """Cast memory to float16; raises ``ValueError`` if a value overflows the float16 range."""
    mem = _as_float32(memory)
    with np.errstate(over="ignore"):
        out = mem.astype(np.float16)
    if not np.isfinite(out).all() and np.isfinite(mem).all():
        raise ValueError("memory values overflow float16 (|x| > 65504)")
    return out


def flat_cosine(query: Any, memory: Any) -> np.ndarray:
    """The CLaRa retrieval score: cosine of the flattened query and chunk memories.

    ``query`` is ``[B, n_mem, d]`` or ``[n_mem, d]`` (B = 1), ``memory`` is ``[N, n_mem, d]``;
    returns ``[B, N]`` float32.
    """
    q = _as_float32(query)
    m = _as_float32(memory)
    if q.ndim == 2:
        q = q[None]
    if q.ndim != 3 or m.ndim != 3 or q.shape[1:] != m.shape[1:]:
        raise ValueError(f"query {q.shape} and memory {m.shape} must be [B, n_mem, d] and [N, n_mem, d]")
    qf = _l2_normalise(_rows(q))
    mf = _l2_normalise(_rows(m))
    return (qf @ mf.T).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# encoding rows


_META_COLUMNS = ("chunk_id", "doc_id", "position", "text", "content_hash")


def _name_ids(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _columns_of(chunks: Any) -> dict[str, list]:
    """Chunk metadata as columns: from a pyarrow Table/RecordBatch, a dict of columns or a list of mappings."""
    if isinstance(chunks, (pa.Table, pa.RecordBatch)):
        return {name: chunks.column(name).to_pylist() for name in _META_COLUMNS if name in chunks.column_names}
    if isinstance(chunks, Mapping):
        return {name: list(chunks[name]) for name in _META_COLUMNS if name in chunks}
    rows = list(chunks)
    if not rows:
        return {name: [] for name in _META_COLUMNS}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"chunk {i} is a {type(row).__name__}, expected a mapping")
    return {name: [row.get(name) for row in rows] for name in _META_COLUMNS if any(name in row for row in rows)}


def _validate_meta(cols: dict[str, list]) -> dict[str, list]:
    if "chunk_id" not in cols:
        raise ValueError("chunks need a 'chunk_id'")
    ids = cols["chunk_id"]
    n = len(ids)
    bad = [i for i, c in enumerate(ids) if not isinstance(c, str) or not c]
    if bad:
        raise ValueError(f"chunk_id must be a non-empty string; bad at rows {bad[:5]}: {[ids[i] for i in bad[:5]]!r}")
    seen: set[str] = set()
    dups = sorted({c for c in ids if c in seen or seen.add(c)})
    if dups:
        raise ValueError(f"duplicate chunk_id in one batch: {_name_ids(dups)}")
    for name in ("doc_id", "position", "text"):
        if name not in cols or any(v is None for v in cols[name]):
            missing = ids if name not in cols else [c for c, v in zip(ids, cols[name]) if v is None]
            raise ValueError(f"chunks lack '{name}': {_name_ids(missing)}")
    for name in ("doc_id", "text"):
        bad_ids = [c for c, v in zip(ids, cols[name]) if not isinstance(v, str)]
        if bad_ids:
            raise ValueError(f"'{name}' must be a string for chunks {_name_ids(bad_ids)}")
    bad_ids = [
        c
        for c, v in zip(ids, cols["position"])
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not _INT32_MIN <= v <= _INT32_MAX
    ]
    if bad_ids:
        raise ValueError(f"'position' must be an int32 for chunks {_name_ids(bad_ids)}")
    hashes = cols.get("content_hash") or [None] * n
    cols["content_hash"] = [h if h is not None else content_hash(t) for h, t in zip(hashes, cols["text"])]
    bad_ids = [c for c, h in zip(ids, cols["content_hash"]) if not isinstance(h, str) or not h]
    if bad_ids:
        raise ValueError(f"'content_hash' must be a non-empty string for chunks {_name_ids(bad_ids)}")
    return cols


def _stack_memory(memory: Any, ids: Sequence[str], settings: StoreSettings) -> np.ndarray:
    """``float32 [N, n_mem, d]`` from an array/tensor or a list of per-chunk arrays, shape-checked by chunk."""
    want = (settings.n_mem, settings.d)
    n = len(ids)
    if isinstance(memory, (list, tuple)):
        if len(memory) != n:
            raise ValueError(f"got {len(memory)} memories for {n} chunks")
        out = np.empty((n, *want), dtype=np.float32)
        for i, (cid, m) in enumerate(zip(ids, memory)):
            arr = _as_float32(m)
            if arr.shape == (settings.flat_dim,):  # a flat row, as Arrow list columns hold it
                arr = arr.reshape(want)
            if arr.shape != want:
                raise ValueError(f"chunk {cid!r}: memory has shape {arr.shape}, expected {want} (n_mem, d)")
            out[i] = arr
        return out
    arr = _as_float32(memory)
    if arr.ndim != 3 or arr.shape[0] != n or arr.shape[1:] != want:
        first = f" (first chunk {ids[0]!r})" if n else ""
        raise ValueError(f"memory has shape {arr.shape}, expected ({n}, {want[0]}, {want[1]}){first}")
    return arr


def _check_values(mem: np.ndarray, ids: Sequence[str]) -> None:
    finite = np.isfinite(_rows(mem)).all(axis=1)
    if not finite.all():
        bad = [c for c, ok in zip(ids, finite) if not ok]
        raise ValueError(f"memory contains NaN or inf for chunks {_name_ids(bad)}")
    zero = ~np.any(_rows(mem) != 0, axis=1)
    if zero.any():
        bad = [c for c, z in zip(ids, zero) if z]
        raise ValueError(f"memory is all zeros (cosine undefined) for chunks {_name_ids(bad)}")


def _fixed_list(values: np.ndarray, size: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), size)


def encode_batch(
    chunks: Any,
    memory: Any,
    settings: StoreSettings,
    *,
    indexed_at: _dt.datetime | None = None,
) -> pa.Table:
    """Build rows of the index table (schema :func:`index_schema`) from chunk metadata and memories.

    ``chunks``: a list of mappings, a dict of columns, or a pyarrow Table with ``chunk_id``, ``doc_id``,
    ``position``, ``text`` and optionally ``content_hash`` (default: :func:`content_hash` of the text).
    ``memory``: ``[N, n_mem, d]`` numpy array or torch tensor, or a list of ``[n_mem, d]`` arrays.
    Raises ``ValueError`` naming the chunk on a wrong shape, NaN/inf, all-zero memory or float16 overflow.
    """
    cols = _validate_meta(_columns_of(chunks))
    ids = cols["chunk_id"]
    n = len(ids)
    mem = _stack_memory(memory, ids, settings)
    _check_values(mem, ids)
    arrays: dict[str, pa.Array] = {}
    if settings.dtype == "int8":
        codes, scale = quantize_int8(mem)
        arrays["memory"] = _fixed_list(codes, settings.flat_dim)
        arrays["memory_scale"] = _fixed_list(scale, settings.n_mem)
    elif settings.dtype == "float16":
        with np.errstate(over="ignore"):
            half = mem.astype(np.float16)
        over = ~np.isfinite(_rows(half)).all(axis=1)
        if over.any():
            bad = [c for c, o in zip(ids, over) if o]
            raise ValueError(f"memory overflows float16 (|x| > 65504) for chunks {_name_ids(bad)}")
        arrays["memory"] = _fixed_list(half, settings.flat_dim)
    else:
        arrays["memory"] = _fixed_list(mem, settings.flat_dim)
    keys = project_keys(mem, settings.key_dim, settings.key_seed) if n else np.zeros((0, settings.key_dim), np.float32)
    when = indexed_at or _dt.datetime.now(_dt.timezone.utc)
    schema = index_schema(settings)
    columns = {
        "chunk_id": pa.array(ids, pa.string()),
        "doc_id": pa.array(cols["doc_id"], pa.string()),
        "position": pa.array([int(p) for p in cols["position"]], pa.int32()),
        "text": pa.array(cols["text"], pa.string()),
        "content_hash": pa.array(cols["content_hash"], pa.string()),
        **arrays,
        "key": _fixed_list(keys, settings.key_dim),
        "compressor_version": pa.array([settings.compressor_version] * n, pa.string()),
        "indexed_at": pa.array([when] * n, pa.timestamp("us", tz="UTC")),
    }
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _memory_column_to_numpy(column: Any, ids: Sequence[str], settings: StoreSettings) -> list[np.ndarray] | np.ndarray:
    """Memory from an Arrow column of any list layout (flat fixed, nested, variable); per-row shape-checked."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    if pa.types.is_fixed_size_list(t) and not pa.types.is_nested(t.value_type) and column.null_count == 0:
        if t.list_size != settings.flat_dim:
            raise ValueError(f"memory column is a list of {t.list_size}, expected n_mem*d = {settings.flat_dim}")
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return values.reshape(len(ids), settings.n_mem, settings.d)
    return [None if v is None else np.asarray(v, dtype=np.float32) for v in column.to_pylist()]


def _validate_encoded(table: pa.Table, settings: StoreSettings) -> pa.Table:
    """Check a table that is already in index layout (e.g. built by :func:`encode_batch` in a worker)."""
    schema = index_schema(settings)
    if set(table.column_names) != set(schema.names):
        raise ValueError(f"encoded table columns {table.column_names} differ from the index schema {schema.names}")
    table = table.select(schema.names)
    for field in schema:
        if not table.schema.field(field.name).type.equals(field.type):
            raise IndexMismatchError(
                f"column {field.name!r} is {table.schema.field(field.name).type}, the index stores {field.type}"
            )
    ids = table.column("chunk_id").to_pylist()
    _validate_meta({name: table.column(name).to_pylist() for name in _META_COLUMNS})
    versions = set(table.column("compressor_version").to_pylist())
    if versions - {settings.compressor_version}:
        raise IndexMismatchError(
            f"rows carry compressor_version {sorted(map(str, versions))}, the index holds "
            f"{settings.compressor_version!r}"
        )
    for name in ("memory", "key", "memory_scale"):
        if name not in schema.names:
            continue
        col = table.column(name)
        if col.null_count:
            raise ValueError(f"column {name!r} has nulls")
        if pa.types.is_integer(schema.field(name).type.value_type):
            continue
        width = schema.field(name).type.list_size
        vals = col.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(ids), width)
        finite = np.isfinite(vals).all(axis=1)
        if not finite.all():
            bad = [c for c, ok in zip(ids, finite) if not ok]
            raise ValueError(f"{name} contains NaN or inf for chunks {_name_ids(bad)}")
    return table.cast(schema)


def _decode_memory(batch: pa.Table | pa.RecordBatch, settings: StoreSettings) -> np.ndarray:
    """Dequantised ``float32 [n, n_mem, d]`` from rows read from the table."""
    n = batch.num_rows
    col = batch.column("memory")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    mem = col.flatten().to_numpy(zero_copy_only=False).reshape(n, settings.n_mem, settings.d)
    if settings.dtype == "int8":
        scale = batch.column("memory_scale")
        if isinstance(scale, pa.ChunkedArray):
            scale = scale.combine_chunks()
        return dequantize_int8(mem, scale.flatten().to_numpy(zero_copy_only=False).reshape(n, settings.n_mem))
    return mem.astype(np.float32)


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
    scores: np.ndarray  # [k] float32, the exact CLaRa cosine
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


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first."""
    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.argsort(-scores[part], kind="stable")]
    return np.argsort(-scores, kind="stable")


class ChunkStore:
    """One LanceDB table of compressed chunks. Create with :meth:`ChunkStore.open`."""

    def __init__(self, db: Any, table: Any, settings: StoreSettings, uri: str, name: str) -> None:
        self._db = db
        self._table = table
        self.settings = settings
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
    ) -> ChunkStore:
        """Open (or create) the chunk table ``table`` in the LanceDB database at ``uri``.

        An existing table's settings come from its schema metadata; if ``settings`` is given and differs
        in shape, compressor version, dtype or key, :class:`IndexMismatchError` names the fields.
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
        return cls(db, tbl, stored, uri, table)

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
        return encode_batch(chunks, memory, self.settings, indexed_at=indexed_at)

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
            return encode_batch(rows, memory, self.settings)
        rows = list(rows)
        cols = _validate_meta(_columns_of(rows))
        missing = [c for c, r in zip(cols["chunk_id"], rows) if r.get("memory") is None]
        if missing:
            raise ValueError(f"rows lack 'memory': {_name_ids(missing)}")
        return encode_batch(cols, [r["memory"] for r in rows], self.settings)

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
        out: dict[str, str] = {}
        if chunk_ids is None:
            groups: list[Any] = [None]
        else:
            ids = sorted({str(c) for c in chunk_ids})
            groups = [_expr_in("chunk_id", ids[i : i + _ID_BATCH]) for i in range(0, len(ids), _ID_BATCH)]
        for where in groups:
            for batch in self._scan(["chunk_id", "content_hash"], where):
                out.update(zip(batch.column("chunk_id").to_pylist(), batch.column("content_hash").to_pylist()))
        return out

    def doc_ids(self) -> set[str]:
        out: set[str] = set()
        for batch in self._scan(["doc_id"]):
            out.update(v for v in batch.column("doc_id").to_pylist() if v is not None)
        return out

    @property
    def _memory_columns(self) -> list[str]:
        return ["memory", "memory_scale"] if self.settings.dtype == "int8" else ["memory"]

    def get_memory(self, chunk_ids: Sequence[str]) -> np.ndarray:
        """Dequantised memories ``float32 [n, n_mem, d]`` in the order of ``chunk_ids``; KeyError names missing ids."""
        chunk_ids = [str(c) for c in chunk_ids]
        wanted = sorted(set(chunk_ids))
        found: dict[str, np.ndarray] = {}
        for i in range(0, len(wanted), _ID_BATCH):
            where = _expr_in("chunk_id", wanted[i : i + _ID_BATCH])
            for batch in self._scan(["chunk_id", *self._memory_columns], where):
                mem = _decode_memory(batch, self.settings)
                found.update(zip(batch.column("chunk_id").to_pylist(), mem))
        missing = [c for c in wanted if c not in found]
        if missing:
            raise KeyError(f"chunks not in the index: {_name_ids(missing)}")
        if not chunk_ids:
            return np.zeros((0, self.settings.n_mem, self.settings.d), np.float32)
        return np.stack([found[c] for c in chunk_ids])

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
        ~256 training rows (HNSW kinds: one partition per million rows). With fewer than ``min_rows`` rows
        (256 is what PQ codebooks need) nothing is built and the report says why. ``extra`` goes to the
        lancedb index config (e.g. ``m``, ``ef_construction``, ``num_bits``).
        """
        from lancedb.index import BTree

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
            if "HNSW" in kind:
                num_partitions = max(1, math.ceil(n / 1_000_000))
            else:
                num_partitions = max(1, min(int(math.sqrt(n)), n // 256))
        config = _ann_config(kind, metric, num_partitions, num_sub_vectors, **extra)
        self._table.create_index("key", config=config, replace=replace)
        self._metric = metric
        scalars: tuple[str, ...] = ()
        if scalar:
            for column in ("chunk_id", "doc_id"):
                self._table.create_index(column, config=BTree(), replace=replace)
            scalars = ("chunk_id", "doc_id")
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

    def _result(self, rows: pa.Table, memory: np.ndarray, scores: np.ndarray, k: int) -> SearchResult:
        order = np.argsort(-scores, kind="stable")[:k]
        ids = rows.column("chunk_id").to_pylist()
        docs = rows.column("doc_id").to_pylist()
        texts = rows.column("text").to_pylist()
        return SearchResult(
            chunk_ids=[ids[i] for i in order],
            doc_ids=[docs[i] for i in order],
            texts=[texts[i] for i in order],
            scores=scores[order].astype(np.float32),
            memory=memory[order],
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
        keys = project_keys(q, self.settings.key_dim, self.settings.key_seed)
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
        memory = _decode_memory(rows, self.settings) if rows.num_rows else None
        results = []
        for b in range(len(q)):
            sel = np.flatnonzero(qidx == b)
            if len(sel) == 0:
                results.append(self._empty_result())
                continue
            sub = rows.take(pa.array(sel))
            mem = memory[sel]
            results.append(self._result(sub, mem, flat_cosine(q[b], mem)[0], k))
        return results

    def exact_search(
        self, query_memory: Any, k: int = 5, *, filter: str | None = None, batch_size: int = 2048
    ) -> list[SearchResult]:
        """Brute-force exact CLaRa cosine over the whole table (scanned in batches): the recall ground truth."""
        q = self._queries(query_memory)
        if k <= 0:
            raise ValueError("k must be positive")
        pools: list[tuple[pa.Table, np.ndarray, np.ndarray] | None] = [None] * len(q)
        columns = ["chunk_id", "doc_id", "text", *self._memory_columns]
        for batch in self._scan(columns, filter or None, batch_size=batch_size):
            if batch.num_rows == 0:
                continue
            rows = pa.Table.from_batches([batch]).select(["chunk_id", "doc_id", "text"])
            mem = _decode_memory(batch, self.settings)
            scores = flat_cosine(q, mem)
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
        return [self._empty_result() if p is None else self._result(p[0], p[1], p[2], k) for p in pools]


__all__ = [
    "ANN_KINDS",
    "DTYPES",
    "METADATA_KEY",
    "ChunkStore",
    "CleanupReport",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexReport",
    "SearchResult",
    "StoreSettings",
    "UpsertResult",
    "content_hash",
    "dequantize_int8",
    "encode_batch",
    "flat_cosine",
    "index_schema",
    "key_projection",
    "project_keys",
    "quantize_int8",
    "to_float16",
]
