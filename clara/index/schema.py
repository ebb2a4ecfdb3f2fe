"""The chunk index: one LanceDB table of compressed chunks, and the one module that owns its schema.

Every row is one chunk: its ids and text, its CLaRa memory tokens (``[n_mem, d]``, stored flat as a
fixed-size list in float32, float16, int8 with a per-token scale, or int4: two 4-bit codes a byte of
each token turned by a fixed seeded rotation, with a float16 per-token scale) and a low-dimensional ``key``
(a projection of the flattened memory: a fixed, seeded random one, or a basis fitted on a sample of the
table's memories, :class:`clara.index.codec.KeyBasis`, kept in a table beside it) that the ANN index searches. Search is
two-step: the ANN search on ``key`` proposes candidates, which are re-scored with the exact CLaRa
score (cosine of the flattened memories) on their full memory.

The settings that produced the table (shape, compressor version, storage dtype, key projection)
live in the Arrow schema metadata of the table under ``b"clara"``; opening the table with other
settings raises :class:`IndexMismatchError`.

``lancedb`` is imported lazily, inside the functions that need it; this module never imports ``ray``
or ``torch`` (torch tensors are accepted through duck typing).

This module holds the schema: the settings a table is made with, its Arrow schema and metadata,
and the errors of a table that does not match. :mod:`clara.index.codec` turns memory into rows and
back; :mod:`clara.index.store` is the table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

METADATA_KEY = b"clara"
FORMAT_VERSION = 1
KEY_SCHEME = "pcg64-box-muller-gaussian-v1"  # bump if key_projection ever changes: old keys would no longer match
DTYPES = ("float32", "float16", "int8", "int4")
ANN_KINDS = ("IVF_FLAT", "IVF_SQ", "IVF_PQ", "IVF_RQ", "IVF_HNSW_FLAT", "IVF_HNSW_SQ", "IVF_HNSW_PQ")
METRICS = ("cosine", "dot")
DEFAULT_TABLE = "chunks"

# Fields whose difference makes an existing table unusable with the requested settings.
_IDENTITY_FIELDS = ("n_mem", "d", "compressor_version", "dtype", "key_dim", "key_seed", "key_basis")
# What the shards of one index must share: their memories are scored and merged together; each shard projects a
# query with its own key (random or fitted), so the key fields may differ between shards.
MEMORY_FIELDS = ("n_mem", "d", "compressor_version", "dtype")
_EPS = 1e-12

_ID_BATCH = 4096  # ids per IN-list when reading rows by id


# --------------------------------------------------------------------------------------------
# shards: one logical index in several tables


def shard_of(doc_id: str, shards: int) -> int:
    """The shard of a document: the first 8 bytes of SHA-256 of its id, modulo ``shards``. A document's
    chunks, their updates and their deletion all land in one shard, so the index job's plan (diff,
    deletes, ``--delete-missing``) is per shard."""
    if shards <= 0:
        raise ValueError(f"shards must be positive, got {shards}")
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % shards


def shard_table(table: str, shard: int, shards: int) -> str:
    """The table name of one shard: ``chunks-00of04`` ... ``chunks-03of04``; one shard is the table itself."""
    if shards <= 0 or not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, {shards}), got {shard}")
    return table if shards == 1 else f"{table}-{shard:02d}of{shards:02d}"


def manifest_table(table: str) -> str:
    """The table of a sharded index's version manifests: ``chunks-manifest`` (no shard table ends so)."""
    return f"{table}-manifest"


#: One row a published version of a sharded index: shard ``i`` is read at ``versions[i]``. Rows are only
#: appended; the highest ``manifest_id`` is the served one (see :mod:`clara.index.shards`).
MANIFEST_SCHEMA = pa.schema([
    pa.field("manifest_id", pa.int64(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("versions", pa.list_(pa.int64()), nullable=False),
    pa.field("compressor_version", pa.string()),
    pa.field("note", pa.string()),
    #: The tag put on each named shard version (``manifest-<id>-<token>``: unique, so concurrent publishes
    #: never move each other's tags).
    pa.field("tag", pa.string()),
])


class IndexMismatchError(ValueError):
    """The table was written with other settings (shape, compressor, dtype, key) than requested."""


class IndexNotFoundError(FileNotFoundError):
    """The table does not exist and ``create=False`` was given."""


class TextIndexMissingError(ValueError):
    """Hybrid or BM25 retrieval was asked of a table without a full-text index on ``text`` (the index job
    builds it unless ``--no-text-index``; :meth:`ChunkStore.create_text_index` builds it by hand)."""


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
    #: ``""``: keys are the seeded random projection; else the digest of the fitted
    #: :class:`~clara.index.codec.KeyBasis` that projects them (stored in ``<table>-keybasis``).
    key_basis: str = ""

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
        if not isinstance(self.key_basis, str):
            raise ValueError(f"StoreSettings.key_basis must be a string (a basis digest or ''), got {self.key_basis!r}")
        # normalise numpy ints so that equality and JSON behave
        for name in ("n_mem", "d", "key_dim", "key_seed", "compression_rate"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def flat_dim(self) -> int:
        """Length of the flattened memory, ``n_mem * d``."""
        return self.n_mem * self.d

    def row_bytes(self, text_bytes: int = 1024) -> int:
        """About how many bytes one row of the table takes in Arrow: memory (in the storage dtype) and
        its scales, the key, and ``text_bytes`` for the text, ids and hash. Used to size blocks and batches."""
        memory = {"float32": 4 * self.flat_dim, "float16": 2 * self.flat_dim,
                  "int8": self.flat_dim + 4 * self.n_mem, "int4": (self.flat_dim + 1) // 2 + 2 * self.n_mem}
        return memory[self.dtype] + 4 * self.key_dim + text_bytes

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

    def differences(self, other: StoreSettings, fields: tuple[str, ...] = _IDENTITY_FIELDS) -> list[str]:
        """Identity fields (shape, compressor, dtype, key; or only ``fields``) on which the two settings differ."""
        return [name for name in fields if getattr(self, name) != getattr(other, name)]


def key_basis_table(table: str) -> str:
    """The name of the table that holds ``table``'s fitted key basis (one row per key dimension)."""
    return f"{table}-keybasis"


def key_basis_schema(flat_dim: int) -> pa.Schema:
    """A fitted key basis as rows: ``component`` i holds column i of the ``[flat_dim, key_dim]`` projection;
    every row carries the basis ``digest`` and the number of memories it was fitted on."""
    return pa.schema([
        pa.field("digest", pa.string(), nullable=False),
        pa.field("component", pa.int32(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), flat_dim), nullable=False),
        pa.field("fitted_rows", pa.int64(), nullable=False),
    ])


def index_schema(settings: StoreSettings) -> pa.Schema:
    """The Arrow schema of the chunk table. Vectors are fixed-size lists, never variable lists."""
    if settings.dtype == "int8":
        memory_fields = [
            pa.field("memory", pa.list_(pa.int8(), settings.flat_dim), nullable=False),
            pa.field("memory_scale", pa.list_(pa.float32(), settings.n_mem), nullable=False),
        ]
    elif settings.dtype == "int4":  # two 4-bit codes a byte, of the rotated tokens (clara.index.codec)
        memory_fields = [
            pa.field("memory", pa.list_(pa.uint8(), (settings.flat_dim + 1) // 2), nullable=False),
            pa.field("memory_scale", pa.list_(pa.float16(), settings.n_mem), nullable=False),
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


