"""Numerics and row encoding: the key projection, int8 / float16 storage, the CLaRa score, and
memory tensors turned into Arrow rows of the schema (:mod:`clara.index.schema`) and back.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clara.data.corpus import content_hash  # the one formula: rows written here and by the index job compare alike
from clara.index.schema import _EPS, IndexMismatchError, StoreSettings, index_schema, key_basis_schema

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

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


def project_keys(memory: Any, key_dim: int = 128, seed: int = 0, basis: KeyBasis | None = None) -> np.ndarray:
    """ANN keys ``[N, key_dim]`` (float32, unit norm) of memories ``[N, n_mem, d]`` (or one ``[n_mem, d]``).

    The flattened memory is L2-normalised, projected with :func:`key_projection` (or ``basis``, a fitted
    :class:`KeyBasis`) and L2-normalised again, so the dot product of two keys approximates the CLaRa
    cosine of the two memories.
    """
    mem = _as_float32(memory)
    if mem.ndim == 2:
        mem = mem[None]
    if mem.ndim != 3:
        raise ValueError(f"memory must be [N, n_mem, d] or [n_mem, d], got shape {mem.shape}")
    _, n_mem, d = mem.shape
    flat = _l2_normalise(_rows(mem))
    if basis is not None:
        if basis.matrix.shape != (n_mem * d, key_dim):
            raise ValueError(f"key basis {basis.digest} is {list(basis.matrix.shape)}, the keys need "
                             f"[{n_mem * d}, {key_dim}]")
        return _l2_normalise(flat @ basis.matrix).astype(np.float32, copy=False)
    return _l2_normalise(flat @ key_projection(n_mem, d, key_dim, seed)).astype(np.float32, copy=False)


@dataclass(frozen=True, eq=False)
class KeyBasis:
    """A key projection fitted on memories: the top ``key_dim`` right singular vectors of a sample of
    L2-normalised flattened memories (uncentred, so the component every chunk shares is kept as one
    direction and the rest of the key spends its dimensions where memories differ).

    Why: a random projection keeps every direction of the memory alike, while memories vary in few of
    them; a key that spans those directions ranks candidates almost as the exact CLaRa cosine does, so
    the ANN index needs fewer candidates and a smaller beam for the same recall (benchmarks/bench_search.py).
    ``matrix`` is ``[flat_dim, key_dim]`` float32 with orthonormal columns (read-only); ``digest`` names it
    in the table's settings, so keys of two bases are never mixed.
    """

    matrix: np.ndarray
    fitted_rows: int
    #: Fraction of the sample's squared norm that the basis keeps (informative; not stored).
    energy: float = float("nan")

    def __post_init__(self) -> None:
        m = np.ascontiguousarray(self.matrix, dtype=np.float32)
        if m.ndim != 2 or m.shape[0] < m.shape[1] or m.shape[1] <= 0:
            raise ValueError(f"a key basis is [flat_dim, key_dim] with flat_dim >= key_dim > 0, got {m.shape}")
        if not np.isfinite(m).all():
            raise ValueError("key basis contains NaN or inf")
        m.setflags(write=False)
        object.__setattr__(self, "matrix", m)

    @property
    def flat_dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def key_dim(self) -> int:
        return int(self.matrix.shape[1])

    @functools.cached_property
    def digest(self) -> str:
        """16 hex digits of SHA-256 over the shape and the float32 bytes."""
        h = hashlib.sha256(f"keybasis-v1:{self.flat_dim}x{self.key_dim}:".encode())
        h.update(self.matrix.tobytes())
        return h.hexdigest()[:16]

    def to_rows(self) -> pa.Table:
        """The basis as rows of :func:`~clara.index.schema.key_basis_schema` (one per key dimension)."""
        k = self.key_dim
        return pa.Table.from_arrays(
            [pa.array([self.digest] * k, pa.string()), pa.array(np.arange(k, dtype=np.int32)),
             _fixed_list(self.matrix.T, self.flat_dim), pa.array([int(self.fitted_rows)] * k, pa.int64())],
            schema=key_basis_schema(self.flat_dim))

    @classmethod
    def from_rows(cls, table: pa.Table) -> KeyBasis:
        """Read a basis back from :meth:`to_rows`; ``IndexMismatchError`` if the rows are not one whole basis
        (several digests, a missing component) or do not hash to their digest."""
        digests = set(table.column("digest").to_pylist())
        if len(digests) != 1:
            raise IndexMismatchError(f"key basis rows carry {len(digests)} digests ({sorted(digests)[:3]}): "
                                     "expected exactly one")
        comp = table.column("component").to_numpy()
        if sorted(comp.tolist()) != list(range(len(comp))):
            raise IndexMismatchError(f"key basis {next(iter(digests))}: components {sorted(comp.tolist())[:8]}... "
                                     f"are not 0..{len(comp) - 1}")
        flat_dim = table.schema.field("vector").type.list_size
        vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(len(comp), flat_dim)
        basis = cls(np.ascontiguousarray(vectors[np.argsort(comp)].T), int(table.column("fitted_rows")[0].as_py()))
        if basis.digest != next(iter(digests)):
            raise IndexMismatchError(f"key basis rows hash to {basis.digest}, not their digest {next(iter(digests))}")
        return basis

    def __repr__(self) -> str:
        return f"KeyBasis({self.digest}, [{self.flat_dim}, {self.key_dim}], fitted on {self.fitted_rows} memories)"


def fit_key_basis(memory: Any, key_dim: int, *, seed: int = 0, power_iterations: int = 3) -> KeyBasis:
    """Fit a :class:`KeyBasis` of ``key_dim`` dimensions on memories ``[N, n_mem, d]`` (``N >= key_dim``).

    A randomized SVD (range finder with ``power_iterations`` of subspace iteration, seeded, then an exact
    SVD of the small projected matrix) of the L2-normalised flattened memories; each column's sign is
    fixed (its largest entry positive) so that a refit on the same sample gives the same digest.
    """
    mem = _as_float32(memory)
    if mem.ndim != 3:
        raise ValueError(f"memory must be [N, n_mem, d], got shape {mem.shape}")
    n, flat_dim = mem.shape[0], mem.shape[1] * mem.shape[2]
    if not 0 < key_dim <= flat_dim:
        raise ValueError(f"key_dim must be in 1..{flat_dim} (n_mem * d), got {key_dim}")
    if n < key_dim:
        raise ValueError(f"fitting a {key_dim}-d key basis needs at least {key_dim} memories, got {n}")
    if not np.isfinite(mem).all():
        raise ValueError("memory contains NaN or inf")
    x = _l2_normalise(_rows(mem)).astype(np.float32)
    width = min(n, flat_dim, key_dim + max(16, key_dim // 4))
    y = x @ np.random.default_rng(seed).standard_normal((flat_dim, width)).astype(np.float32)
    for _ in range(power_iterations):
        y, _ = np.linalg.qr(y)
        y = x @ (x.T @ y)
    q, _ = np.linalg.qr(y)
    _, sv, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    v = vt[:key_dim].T.astype(np.float64)
    signs = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(key_dim)])
    v = (v * np.where(signs == 0, 1.0, signs)).astype(np.float32)
    energy = float((sv[:key_dim] ** 2).sum() / max(float((x.astype(np.float64) ** 2).sum()), _EPS))
    return KeyBasis(v, n, energy)


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


@functools.lru_cache(maxsize=4)
def _cached_rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(_stable_gaussian(seed + 1_000_003, d * d).reshape(d, d))
    q = (q * np.sign(np.diag(r))).astype(np.float32)  # the Haar-distributed orthogonal matrix of the draw
    q.setflags(write=False)
    return q


def token_rotation(d: int, seed: int = 0) -> np.ndarray:
    """The fixed, seeded orthogonal ``[d, d]`` matrix that int4 storage turns each memory token by.

    Why: last-layer states carry a few very large coordinates; a per-token 4-bit scale set by them would
    round every other coordinate to zero. A random rotation spreads each token's energy over all
    coordinates (near-Gaussian), so 15 levels resolve it. Rotation keeps norms and the CLaRa cosine.
    """
    if d <= 0 or seed < 0:
        raise ValueError(f"bad rotation size/seed: d={d}, seed={seed}")
    return _cached_rotation(int(d), int(seed))


def quantize_int4(memory: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rotated, symmetric per-token int4: ``packed [N, ceil(n_mem*d/2)] uint8`` and ``scale [N, n_mem] float16``.

    Each token ``t`` is rotated (:func:`token_rotation`), then ``t R ~= codes * scale`` with codes in
    [-7, 7] stored offset by 8, two a byte (the first code in the low nibble). An all-zero token gets scale 0.
    """
    mem = _as_float32(memory)
    if mem.ndim != 3:
        raise ValueError(f"memory must be [N, n_mem, d], got shape {mem.shape}")
    if len(mem) == 0:
        return np.zeros((0, (mem.shape[1] * mem.shape[2] + 1) // 2), np.uint8), np.zeros((0, mem.shape[1]), np.float16)
    rotated = mem @ token_rotation(mem.shape[2], seed)
    scale = (np.abs(rotated).max(axis=-1) / 7.0).astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)
    codes = (np.clip(np.rint(rotated / safe[..., None]), -7, 7) + 8).astype(np.uint8).reshape(len(mem), -1)
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.full((len(codes), 1), 8, np.uint8)], axis=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), scale


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, n_mem: int, d: int, seed: int = 0, *,
                    rotated: bool = False) -> np.ndarray:
    """Inverse of :func:`quantize_int4`: ``float32 [N, n_mem, d]``; with ``rotated``, left in the rotated
    space (``t R``): the CLaRa cosine is the same there, so a search scores a query turned once by
    :func:`token_rotation` and turns back only the rows it keeps (``@ R.T``), not every candidate."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.empty((len(packed), packed.shape[1] * 2), np.int8)
    codes[:, 0::2], codes[:, 1::2] = packed & 0x0F, packed >> 4
    values = (codes[:, :n_mem * d].astype(np.float32) - 8.0).reshape(len(packed), n_mem, d)
    values *= np.asarray(scale, dtype=np.float32)[..., None]
    return values if rotated else values @ token_rotation(d, seed).T


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


def check_key_basis(settings: StoreSettings, key_basis: KeyBasis | None) -> None:
    """``IndexMismatchError`` unless ``key_basis`` is the one ``settings`` names (or none for random keys)."""
    if settings.key_basis:
        if key_basis is None:
            raise IndexMismatchError(f"the index's keys use the fitted key basis {settings.key_basis}; pass it "
                                     "(ChunkStore.key_basis of the opened table)")
        if key_basis.digest != settings.key_basis:
            raise IndexMismatchError(f"key basis {key_basis.digest} is not the index's ({settings.key_basis})")
        if key_basis.matrix.shape != (settings.flat_dim, settings.key_dim):
            raise IndexMismatchError(f"key basis {key_basis.digest} is {list(key_basis.matrix.shape)}, the index "
                                     f"needs [{settings.flat_dim}, {settings.key_dim}]")
    elif key_basis is not None:
        raise IndexMismatchError(f"the index's keys are the seeded random projection, not key basis "
                                 f"{key_basis.digest}")


def _fixed_list(values: np.ndarray, size: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), size)


def encode_batch(
    chunks: Any,
    memory: Any,
    settings: StoreSettings,
    *,
    key_basis: KeyBasis | None = None,
    indexed_at: _dt.datetime | None = None,
) -> pa.Table:
    """Build rows of the index table (schema :func:`index_schema`) from chunk metadata and memories.

    ``chunks``: a list of mappings, a dict of columns, or a pyarrow Table with ``chunk_id``, ``doc_id``,
    ``position``, ``text`` and optionally ``content_hash`` (default: :func:`content_hash` of the text).
    ``memory``: ``[N, n_mem, d]`` numpy array or torch tensor, or a list of ``[n_mem, d]`` arrays.
    ``key_basis``: the table's fitted :class:`KeyBasis` (required when ``settings.key_basis`` names one).
    Raises ``ValueError`` naming the chunk on a wrong shape, NaN/inf, all-zero memory or float16 overflow.
    """
    check_key_basis(settings, key_basis)
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
    elif settings.dtype == "int4":
        packed, scale = quantize_int4(mem, settings.key_seed)
        if not np.isfinite(scale).all():
            bad = [c for c, ok in zip(ids, np.isfinite(scale).all(axis=1)) if not ok]
            raise ValueError(f"memory overflows the float16 scale of int4 storage for chunks {_name_ids(bad)}")
        arrays["memory"] = _fixed_list(packed, (settings.flat_dim + 1) // 2)
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
    keys = (project_keys(mem, settings.key_dim, settings.key_seed, key_basis) if n
            else np.zeros((0, settings.key_dim), np.float32))
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


def _decode_memory(batch: pa.Table | pa.RecordBatch, settings: StoreSettings, rotated: bool = False) -> np.ndarray:
    """Dequantised ``float32 [n, n_mem, d]`` from rows read from the table (int4 with ``rotated``: in the
    rotated space, see :func:`dequantize_int4`)."""
    n = batch.num_rows
    col = batch.column("memory")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if settings.dtype in ("int8", "int4"):
        scale = batch.column("memory_scale")
        if isinstance(scale, pa.ChunkedArray):
            scale = scale.combine_chunks()
        scale = scale.flatten().to_numpy(zero_copy_only=False).reshape(n, settings.n_mem)
        if settings.dtype == "int4":
            return dequantize_int4(flat.reshape(n, -1), scale, settings.n_mem, settings.d, settings.key_seed,
                                   rotated=rotated)
        return dequantize_int8(flat.reshape(n, settings.n_mem, settings.d), scale)
    return flat.reshape(n, settings.n_mem, settings.d).astype(np.float32)


