"""The chunk index on a real LanceDB directory (tmp_path): schema, upserts, versions, deletes, search."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from clara.index.codec import (
    KeyBasis,
    dequantize_int8,
    encode_batch,
    fit_key_basis,
    flat_cosine,
    key_projection,
    project_keys,
    quantize_int8,
)
from clara.index.schema import IndexMismatchError, IndexNotFoundError, StoreSettings, index_schema, key_basis_table
from clara.index.store import SCAN_MAX_PARTITIONS, ChunkStore, default_partitions

N_MEM, D, KEY_DIM = 4, 16, 16


def settings(dtype: str = "float16", **kw) -> StoreSettings:
    base = dict(n_mem=N_MEM, d=D, compressor_version="comp-v1", dtype=dtype, key_dim=KEY_DIM, model="tiny")
    base.update(kw)
    return StoreSettings(**base)


def memories(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, N_MEM, D)).astype(np.float32)


def rows(n: int, seed: int = 0, docs: int | None = None, prefix: str = "c") -> list[dict]:
    mem = memories(n, seed)
    docs = docs or max(1, n // 3)
    return [
        {
            "chunk_id": f"{prefix}{i}",
            "doc_id": f"d{i % docs}",
            "position": i // docs,
            "text": f"text of chunk {i}",
            "content_hash": f"h{i}",
            "memory": mem[i],
        }
        for i in range(n)
    ]


@pytest.fixture
def store(tmp_path) -> ChunkStore:
    return ChunkStore.open(tmp_path / "db", settings())


# ---------------------------------------------------------------- settings and schema


def test_settings_validate_and_round_trip_through_metadata():
    s = settings(dtype="int8", key_seed=3, compression_rate=16)
    meta = s.to_metadata()
    assert list(meta) == [b"clara"]
    assert StoreSettings.from_metadata(meta) == s
    assert StoreSettings.from_metadata({k.decode(): v.decode() for k, v in meta.items()}) == s
    for bad in (dict(n_mem=0), dict(d=-1), dict(dtype="bfloat16"), dict(compressor_version=""), dict(key_seed=-1)):
        with pytest.raises(ValueError):
            settings(**bad)
    with pytest.raises(IndexMismatchError):
        StoreSettings.from_metadata({b"other": b"{}"})


@pytest.mark.parametrize(
    "dtype,value_type", [("float32", pa.float32()), ("float16", pa.float16()), ("int8", pa.int8())]
)
def test_schema_uses_fixed_size_lists_and_carries_settings(tmp_path, dtype, value_type):
    s = settings(dtype)
    schema = index_schema(s)
    mem = schema.field("memory").type
    assert pa.types.is_fixed_size_list(mem) and mem.list_size == N_MEM * D and mem.value_type == value_type
    key = schema.field("key").type
    assert pa.types.is_fixed_size_list(key) and key.list_size == KEY_DIM and key.value_type == pa.float32()
    if dtype == "int8":
        scale = schema.field("memory_scale").type
        assert pa.types.is_fixed_size_list(scale) and scale.list_size == N_MEM and scale.value_type == pa.float32()
    else:
        assert "memory_scale" not in schema.names
    assert not schema.field("chunk_id").nullable
    assert pa.types.is_timestamp(schema.field("indexed_at").type)
    for field in schema:
        assert not pa.types.is_list(field.type) and not pa.types.is_large_list(field.type), field

    st = ChunkStore.open(tmp_path / "db", s)
    on_disk = st.table.schema
    assert on_disk.field("memory").type == mem and on_disk.field("key").type == key
    assert StoreSettings.from_metadata(on_disk.metadata) == s
    # metadata survives writes, and a reopen with no settings reads them back
    st.upsert(rows(3))
    again = ChunkStore.open(tmp_path / "db", None)
    assert again.settings == s and again.count() == 3


def test_open_with_other_compressor_or_shape_raises(tmp_path):
    ChunkStore.open(tmp_path / "db", settings()).upsert(rows(3))
    with pytest.raises(IndexMismatchError, match="compressor_version"):
        ChunkStore.open(tmp_path / "db", settings(compressor_version="comp-v2"))
    with pytest.raises(IndexMismatchError, match=r"n_mem.*dtype|dtype.*n_mem"):
        ChunkStore.open(tmp_path / "db", settings(dtype="int8", n_mem=8))
    with pytest.raises(IndexMismatchError, match="key_dim"):
        ChunkStore.open(tmp_path / "db", settings(key_dim=32))
    # model / compression_rate are descriptive, not identity
    assert ChunkStore.open(tmp_path / "db", settings(model="other")).count() == 3


def test_open_missing_table(tmp_path):
    with pytest.raises(IndexNotFoundError):
        ChunkStore.open(tmp_path / "db", settings(), create=False)
    with pytest.raises(IndexNotFoundError):
        ChunkStore.open(tmp_path / "db", None)
    st = ChunkStore.open(tmp_path / "db", settings(), table="other")
    assert st.count() == 0 and st.name == "other"


# ---------------------------------------------------------------- numerics


def test_key_projection_is_seeded_cached_and_stable():
    p = key_projection(N_MEM, D, KEY_DIM, seed=0)
    assert p.shape == (N_MEM * D, KEY_DIM) and p.dtype == np.float32
    assert key_projection(N_MEM, D, KEY_DIM, seed=0) is p  # cached
    assert not p.flags.writeable
    assert not np.allclose(key_projection(N_MEM, D, KEY_DIM, seed=1), p)
    # Gaussian entries scaled by 1/sqrt(key_dim)
    big = key_projection(64, 64, 128, seed=0)
    assert abs(big.std() * np.sqrt(128) - 1.0) < 0.01 and abs(big.mean()) < 0.005
    # pinned values: the keys of every existing index depend on this exact stream
    np.testing.assert_allclose(
        p[0, :4] * np.sqrt(KEY_DIM), [0.47170803, -0.93202758, 0.02290738, 2.62379146], rtol=1e-5
    )


def test_project_keys_unit_norm_and_approximate_cosine():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((1, 8, 64)).astype(np.float32)  # 512-d flattened -> 128-d keys
    noise = np.linspace(0.05, 3.0, 40, dtype=np.float32)[:, None, None]
    mem = base + noise * rng.standard_normal((40, 8, 64)).astype(np.float32)
    keys = project_keys(mem, key_dim=128, seed=0)
    assert keys.shape == (40, 128) and keys.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    exact = flat_cosine(base, mem)[0]
    approx = keys @ project_keys(base, key_dim=128)[0]
    assert np.corrcoef(exact, approx)[0, 1] > 0.95 and np.abs(exact - approx).max() < 0.25
    assert np.argmax(approx) == np.argmax(exact) == 0
    # single [n_mem, d] input
    np.testing.assert_allclose(project_keys(mem[0], 128), keys[:1], atol=1e-6)


def low_rank_memories(n: int, shape=(8, 32), rank: int = 12, seed: int = 0, shared: float = 0.8,
                      noise: float = 0.25) -> np.ndarray:
    """Memories as measured on real ones: a part every chunk shares, a part that varies in a few directions
    (``rank``), and noise of the chunk's own (the layout of benchmarks/bench_search.py)."""
    rng = np.random.default_rng(seed)
    flat = shape[0] * shape[1]
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    common, w = unit(rng.standard_normal(flat)), rng.standard_normal((rank, flat))
    x = shared * common + 0.45 * unit(rng.standard_normal((n, rank)) @ w) + noise * unit(rng.standard_normal((n, flat)))
    return x.reshape(n, *shape).astype(np.float32)


def _coverage(keys: np.ndarray, query_keys: np.ndarray, mem: np.ndarray, queries: np.ndarray, c: int) -> float:
    """Mean fraction of each query's exact top-10 (CLaRa cosine) within the top ``c`` by key."""
    exact = flat_cosine(queries, mem)
    return float(np.mean([len(set(np.argsort(-e)[:10]) & set(np.argsort(-(keys @ qk))[:c])) / 10
                          for e, qk in zip(exact, query_keys)]))


def test_a_fitted_key_basis_ranks_candidates_as_the_exact_score_does():
    mem = low_rank_memories(3000)
    queries = low_rank_memories(3040)[3000:]  # memories of other chunks, from the same generator
    basis = fit_key_basis(mem[:1000], 32)
    assert basis.matrix.shape == (256, 32) and basis.fitted_rows == 1000 and basis.energy > 0.85
    np.testing.assert_allclose(basis.matrix.T @ basis.matrix, np.eye(32), atol=1e-4)  # orthonormal
    assert fit_key_basis(mem[:1000], 32).digest == basis.digest  # a refit on the same sample: the same basis
    assert fit_key_basis(mem[1000:2000], 32).digest != basis.digest
    keys = project_keys(mem, 32, basis=basis)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    fitted = _coverage(keys, project_keys(queries, 32, basis=basis), mem, queries, 30)
    rand = _coverage(project_keys(mem, 32), project_keys(queries, 32), mem, queries, 30)
    # the random 32-d key of a 256-d memory loses most of the exact top-10 at 30 candidates; the fitted one not
    assert fitted >= 0.97 and fitted > rand + 0.2, (fitted, rand)
    back = KeyBasis.from_rows(basis.to_rows())
    assert back.digest == basis.digest and back.fitted_rows == 1000
    with pytest.raises(ValueError, match="at least 32 memories"):
        fit_key_basis(mem[:10], 32)
    with pytest.raises(ValueError, match="the keys need \\[256, 16\\]"):
        project_keys(mem, 16, basis=basis)


def test_ivf_sq_on_a_fitted_key_is_a_scan_of_every_key_that_finds_the_exact_top_10(tmp_path):
    """The search design of bench_search.py: a fitted key, an int8 IVF_SQ index whose default probes reach
    every partition, and few candidates re-scored on the memory give the exact top-10."""
    assert default_partitions("IVF_SQ", 2_000) == 1 and default_partitions("IVF_SQ", 1_000_000) == 4
    assert default_partitions("IVF_SQ", 10**9) == SCAN_MAX_PARTITIONS == 20  # LanceDB's default probes
    assert default_partitions("IVF_PQ", 1_000_000) == 1000 and default_partitions("IVF_HNSW_SQ", 2_500_000) == 3
    mem = low_rank_memories(3000)
    queries = low_rank_memories(3030)[3000:]
    basis = fit_key_basis(mem[:1000], 32)
    st = ChunkStore.open(tmp_path / "db", StoreSettings(n_mem=8, d=32, compressor_version="comp-v1", key_dim=32,
                                                       key_basis=basis.digest), key_basis=basis)
    st.upsert([{"chunk_id": f"c{i}", "doc_id": f"c{i}", "position": 0, "text": "", "memory": m}
               for i, m in enumerate(mem)])
    report = st.create_ann_index("IVF_SQ", scalar=False)
    assert report.created and report.num_partitions == 1
    assert any(list(i.columns) == ["key"] and "Sq" in str(i.index_type) for i in st.list_indices())
    exact = st.exact_search(queries, k=10)
    found = st.search(queries, k=10, candidates=40)
    recall = np.mean([len(set(a.chunk_ids) & set(e.chunk_ids)) / 10 for a, e in zip(found, exact)])
    assert recall >= 0.97, recall
    # several partitions, every one probed by default: the same results
    assert st.create_ann_index("IVF_SQ", num_partitions=4, scalar=False).num_partitions == 4
    again = st.search(queries, k=10, candidates=40)
    assert [r.chunk_ids for r in again] == [r.chunk_ids for r in found]


def test_a_table_keeps_its_key_basis_and_refuses_another(tmp_path):
    mem = low_rank_memories(300)
    basis = fit_key_basis(mem, 16)
    st = StoreSettings(n_mem=8, d=32, compressor_version="comp-v1", key_dim=16, key_basis=basis.digest)
    with pytest.raises(IndexMismatchError, match="pass it"):
        ChunkStore.open(tmp_path / "db", st)  # creating a fitted-key table needs the basis
    with pytest.raises(IndexMismatchError, match="not the index's"):
        ChunkStore.open(tmp_path / "db", st, key_basis=fit_key_basis(mem[::-1][:200], 16))
    store = ChunkStore.open(tmp_path / "db", st, key_basis=basis)
    ids = [f"c{i}" for i in range(300)]
    store.upsert([{"chunk_id": c, "doc_id": c, "position": 0, "text": c, "memory": m} for c, m in zip(ids, mem)])
    again = ChunkStore.open(tmp_path / "db", None, create=False)
    assert again.key_basis is not None and again.key_basis.digest == basis.digest == again.settings.key_basis
    keys = np.stack(again.table.to_arrow().sort_by("chunk_id").column("key").to_numpy(zero_copy_only=False))
    order = np.argsort(ids)
    np.testing.assert_allclose(keys, project_keys(mem[order], 16, basis=basis), atol=1e-5)  # of the float32 memory
    # the query side uses the same basis: a row's own memory finds it first among 20 candidates
    found = again.search(mem[:5], k=1, candidates=20)
    assert [r.chunk_ids[0] for r in found] == ids[:5]
    with pytest.raises(IndexMismatchError, match="seeded random projection"):
        encode_batch({"chunk_id": ["x"], "doc_id": ["x"], "position": [0], "text": ["x"]}, mem[:1],
                     StoreSettings(n_mem=8, d=32, compressor_version="comp-v1", key_dim=16), key_basis=basis)
    with pytest.raises(IndexMismatchError, match="pass it"):
        encode_batch({"chunk_id": ["x"], "doc_id": ["x"], "position": [0], "text": ["x"]}, mem[:1], st)
    # another basis is never written over one that a table may use
    other = fit_key_basis(mem[:100], 16)
    other_st = StoreSettings(**{**st.to_dict(), "key_basis": other.digest})
    again._db.drop_table("chunks")
    with pytest.raises(IndexMismatchError, match="already holds key basis"):
        ChunkStore.open(tmp_path / "db", other_st, key_basis=other)
    assert ChunkStore.open(tmp_path / "db", st, key_basis=basis).key_basis.digest == basis.digest  # same: reused
    # a table whose basis went missing is refused, naming the table that should hold it
    again._db.drop_table(key_basis_table("chunks"))
    with pytest.raises(IndexMismatchError, match="chunks-keybasis' is missing"):
        ChunkStore.open(tmp_path / "db", None, create=False)


def test_flat_cosine_is_cosine_of_flattened_vectors():
    q, m = memories(3, 1), memories(5, 2)
    got = flat_cosine(q, m)
    qf, mf = q.reshape(3, -1).astype(np.float64), m.reshape(5, -1).astype(np.float64)
    want = (qf @ mf.T) / np.linalg.norm(qf, axis=1)[:, None] / np.linalg.norm(mf, axis=1)[None]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert flat_cosine(q[0], m).shape == (1, 5)
    np.testing.assert_allclose(flat_cosine(m, m).diagonal(), 1.0, atol=1e-5)


def test_int8_quantisation_round_trip_is_within_one_percent():
    mem = memories(50) * np.random.default_rng(3).uniform(0.01, 100, size=(50, N_MEM, 1)).astype(np.float32)
    codes, scale = quantize_int8(mem)
    assert codes.dtype == np.int8 and scale.shape == (50, N_MEM) and np.abs(codes).max() <= 127
    back = dequantize_int8(codes, scale)
    rel = np.linalg.norm((back - mem).reshape(50, -1), axis=1) / np.linalg.norm(mem.reshape(50, -1), axis=1)
    assert rel.max() < 0.01
    zero = np.zeros((1, N_MEM, D), np.float32)
    c0, s0 = quantize_int8(zero)
    assert (c0 == 0).all() and (s0 == 0).all() and (dequantize_int8(c0, s0) == 0).all()


def test_int4_storage_is_a_quarter_of_float16_and_survives_outlier_coordinates():
    from clara.index.codec import dequantize_int4, quantize_int4, token_rotation

    rng = np.random.default_rng(0)
    mem = rng.standard_normal((40, 6, 64)).astype(np.float32)
    mem[..., 3] += 40.0  # a few huge coordinates shared by every token, as last-layer states have
    packed, scale = quantize_int4(mem, seed=1)
    assert packed.dtype == np.uint8 and packed.shape == (40, 6 * 64 // 2) and scale.dtype == np.float16
    # half a byte an element plus 2 bytes a token: 1/4 of float16 + 1/d (0.252 of it at d = 576)
    assert packed.nbytes + scale.nbytes == mem.size // 2 + 2 * 40 * 6
    back = dequantize_int4(packed, scale, 6, 64, seed=1)
    centred = mem - mem.mean(axis=(0, 1))
    err = np.linalg.norm(back - mem) / np.linalg.norm(centred)
    plain_scale = np.abs(mem).max(-1, keepdims=True) / 7  # the same 15 levels without the rotation
    plain = np.clip(np.rint(mem / plain_scale), -7, 7) * plain_scale
    assert err < 0.5 * np.linalg.norm(plain - mem) / np.linalg.norm(centred)  # the rotation is what makes 4 bits work
    rot = token_rotation(64, 1)
    np.testing.assert_allclose(rot @ rot.T, np.eye(64), atol=1e-5)
    odd = rng.standard_normal((2, 3, 5)).astype(np.float32)  # an odd n_mem * d pads one nibble
    p_odd, s_odd = quantize_int4(odd)
    assert p_odd.shape == (2, 8)
    assert np.linalg.norm(dequantize_int4(p_odd, s_odd, 3, 5) - odd) / np.linalg.norm(odd) < 0.2
    zero_p, zero_s = quantize_int4(np.zeros((1, 2, 4), np.float32))
    assert (dequantize_int4(zero_p, zero_s, 2, 4) == 0).all()
    none_p, none_s = quantize_int4(np.zeros((0, 6, 64), np.float32))  # no rows: empty arrays, as other dtypes
    assert none_p.shape == (0, 192) and none_s.shape == (0, 6)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4"])
def test_row_bytes_estimates_the_encoded_rows(dtype):
    """``StoreSettings.row_bytes`` (what the index job sizes its Ray Data blocks by) against real encoded rows."""
    s = settings(dtype, n_mem=16, d=256, key_dim=128)
    chunks = [{"chunk_id": f"doc-{i}#0", "doc_id": f"doc-{i}", "position": 0, "text": "w" * 600} for i in range(64)]
    mem = np.random.default_rng(0).standard_normal((64, 16, 256)).astype(np.float32)
    table = encode_batch(chunks, mem, s)
    measured = table.nbytes / table.num_rows
    assert 0.85 * measured <= s.row_bytes(text_bytes=700) <= 1.15 * measured
    if dtype != "float32":
        assert s.row_bytes() < settings("float32", n_mem=16, d=256, key_dim=128).row_bytes()


def test_encode_batch_accepts_torch_and_rejects_bad_rows():
    torch = pytest.importorskip("torch")
    rs = rows(4)
    mem = torch.tensor(np.stack([r["memory"] for r in rs]), dtype=torch.bfloat16)
    table = encode_batch([{k: v for k, v in r.items() if k != "memory"} for r in rs], mem, settings())
    assert table.schema.equals(index_schema(settings()), check_metadata=True)
    assert table.num_rows == 4 and table.column("compressor_version").to_pylist() == ["comp-v1"] * 4
    meta = [{k: v for k, v in r.items() if k != "memory"} for r in rs]
    with pytest.raises(ValueError, match="expected"):
        encode_batch(meta, np.zeros((4, N_MEM, D + 1), np.float32), settings())
    bad = [r["memory"] for r in rs]
    bad[2] = np.ones((N_MEM + 1, D), np.float32)
    with pytest.raises(ValueError, match="'c2'"):
        encode_batch(meta, bad, settings())
    overflow = np.stack([r["memory"] for r in rs])
    overflow[1, 0, 0] = 1e6
    with pytest.raises(ValueError, match="float16.*'c1'"):
        encode_batch(meta, overflow, settings("float16"))
    assert encode_batch(meta, overflow, settings("float32")).num_rows == 4


# ---------------------------------------------------------------- writes and versions


def test_upsert_is_idempotent_and_versioned(store):
    first = store.upsert(rows(6))
    assert (first.inserted, first.updated) == (6, 0) and first.version == store.version
    again = store.upsert(rows(6))
    assert store.count() == 6
    assert (again.inserted, again.updated) == (0, 6) and again.version == first.version + 1
    mixed = store.upsert(rows(8))
    assert (mixed.inserted, mixed.updated) == (2, 6) and store.count() == 8
    assert store.upsert([]).version == mixed.version  # nothing to write, no new version


def test_changed_content_updates_the_row_and_hashes(store):
    store.upsert(rows(5))
    changed = rows(5)[2]
    changed.update(text="new text", content_hash="h-new", memory=memories(1, seed=99)[0])
    res = store.upsert([changed])
    assert (res.inserted, res.updated) == (0, 1) and store.count() == 5
    hashes = store.existing_hashes()
    assert hashes == {f"c{i}": ("h-new" if i == 2 else f"h{i}") for i in range(5)}
    assert store.existing_hashes(["c2", "c4", "missing"]) == {"c2": "h-new", "c4": "h4"}
    np.testing.assert_allclose(store.get_memory(["c2"])[0], changed["memory"], rtol=1e-3, atol=1e-3)
    hit = store.search(changed["memory"], k=1)[0]
    assert hit.chunk_ids == ["c2"] and hit.texts == ["new text"]


def test_default_content_hash_and_arrow_table_input(store):
    rs = rows(3)
    for r in rs:
        del r["content_hash"]
    raw = pa.table(
        {
            "chunk_id": [r["chunk_id"] for r in rs],
            "doc_id": [r["doc_id"] for r in rs],
            "position": pa.array([r["position"] for r in rs], pa.int32()),
            "text": [r["text"] for r in rs],
            "memory": [r["memory"].tolist() for r in rs],  # nested variable lists: converted, shape-checked
        }
    )
    assert store.upsert(raw).inserted == 3
    hashes = store.existing_hashes()
    from clara.data.corpus import content_hash  # one formula for the store's default and the corpus reader's

    assert hashes == {r["chunk_id"]: content_hash(r["text"]) for r in rs} and len(set(hashes.values())) == 3
    encoded = store.encode(rows(5, prefix="e"), np.stack([r["memory"] for r in rows(5)]))
    assert store.upsert(encoded).inserted == 5 and store.count() == 8
    wrong = encode_batch(rows(2, prefix="w"), memories(2), settings(compressor_version="comp-v9"))
    with pytest.raises(IndexMismatchError):
        store.upsert(wrong)


def test_bad_rows_raise_naming_the_chunk_and_write_nothing(store):
    store.upsert(rows(4))
    version, count = store.version, store.count()
    bad_shape = rows(5, seed=1, prefix="n")
    bad_shape[3]["memory"] = np.ones((N_MEM, D - 1), np.float32)
    with pytest.raises(ValueError, match="'n3'"):
        store.upsert(bad_shape)
    with_nan = rows(5, seed=1, prefix="n")
    with_nan[1]["memory"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN.*'n1'"):
        store.upsert(with_nan)
    dup = rows(3, prefix="n") + rows(1, prefix="n")
    with pytest.raises(ValueError, match="duplicate.*'n0'"):
        store.upsert(dup)
    no_doc = rows(2, prefix="n")
    del no_doc[1]["doc_id"]
    with pytest.raises(ValueError, match="doc_id.*'n1'"):
        store.upsert(no_doc)
    assert store.version == version and store.count() == count
    assert not any(c.startswith("n") for c in store.existing_hashes())


def test_delete_and_retain_docs_with_quoted_ids(store):
    rs = rows(9, docs=3)  # d0, d1, d2 with 3 chunks each
    odd = {
        "chunk_id": 'it\'s "odd" \\ id',
        "doc_id": "o'brien's doc",
        "position": 0,
        "text": "x",
        "memory": memories(1, 5)[0],
    }
    store.upsert(rs + [odd])
    assert store.doc_ids() == {"d0", "d1", "d2", "o'brien's doc"}
    assert store.delete_chunks(['it\'s "odd" \\ id']) == 1
    store.upsert([odd])
    assert store.delete_docs(["o'brien's doc", "not-there"]) == 1
    assert store.delete_docs(["d1"]) == 3 and store.count() == 6
    assert store.delete_docs([]) == 0
    version = store.version
    assert store.retain_docs(["d0", "d1", "d-new"]) == 3
    assert store.doc_ids() == {"d0"} and store.count() == 3 and store.version == version + 1
    assert store.retain_docs(["d0"]) == 0
    assert store.delete_chunks(["c0", "c3"]) == 2 and store.existing_hashes().keys() == {"c6"}


def test_rollback_restores_an_old_version(store):
    store.upsert(rows(6, docs=3))  # d0: c0, c3
    good = store.version
    store.delete_docs(["d0"])
    store.upsert(rows(3, seed=7, prefix="x"))
    assert store.count() == 7
    new_version = store.rollback(good)
    assert new_version > good and store.version == new_version
    assert store.count() == 6 and "x0" not in store.existing_hashes()
    assert [v["version"] for v in store.versions()][-1] == new_version
    with pytest.raises(ValueError):
        store.rollback(10_000)
    # history survives optimize unless cleanup is asked for
    store.optimize()
    assert good in {v["version"] for v in store.versions()} and store.count() == 6
    store.upsert(rows(2, prefix="y"))
    assert store.count() == 8


def test_cleanup_removes_old_untagged_versions_and_keeps_tagged_ones_and_the_latest(store):
    for i in range(5):
        store.upsert(rows(3, seed=i, prefix=f"r{i}-"))  # one version per upsert
    versions = [v["version"] for v in store.versions()]
    assert len(versions) == 6
    kept = versions[2]
    store.tag("run-a", kept)
    assert store.tags() == {"run-a": kept}
    young = store.cleanup_versions(dt.timedelta(days=1))  # the retention window holds every version
    assert (young.versions_removed, young.versions_left) == (0, versions)

    report = store.cleanup_versions(dt.timedelta(0))
    assert report.versions_left == [kept, versions[-1]] == [v["version"] for v in store.versions()]
    assert report.versions_removed == 4 and report.bytes_removed > 0
    assert store.count() == 15
    store.rollback(kept)  # the tagged version is still whole
    assert store.count() == 6 and store.existing_hashes().keys() == {f"r{i}-{j}" for i in (0, 1) for j in range(3)}

    # optimize(cleanup=True) goes through the same cleanup (lancedb's own prune refuses once a tag is old)
    store.upsert(rows(2, prefix="late-"))
    store.optimize(cleanup=True, older_than=dt.timedelta(0))
    assert [v["version"] for v in store.versions()] == [kept, store.version]
    store.untag("run-a")
    assert store.tags() == {}
    assert store.cleanup_versions(dt.timedelta(0)).versions_left == [store.version]
    with pytest.raises(ValueError, match="negative"):
        store.cleanup_versions(dt.timedelta(days=-1))


def test_get_memory_order_and_missing_ids(store):
    rs = rows(6)
    store.upsert(rs)
    got = store.get_memory(["c4", "c0", "c4"])
    assert got.shape == (3, N_MEM, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.stack([rs[4]["memory"], rs[0]["memory"], rs[4]["memory"]]), atol=2e-3, rtol=1e-3)
    with pytest.raises(KeyError, match="'nope'"):
        store.get_memory(["c1", "nope"])


# ---------------------------------------------------------------- search


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 1e-3), ("int8", 1e-2), ("int4", 0.15)])
def test_round_trip_and_self_match_per_dtype(tmp_path, dtype, tol):
    st = ChunkStore.open(tmp_path / "db", settings(dtype))
    rs = rows(40, seed=2)
    st.upsert(rs)
    mem = np.stack([r["memory"] for r in rs])
    back = st.get_memory([r["chunk_id"] for r in rs])
    rel = np.linalg.norm((back - mem).reshape(40, -1), axis=1) / np.linalg.norm(mem.reshape(40, -1), axis=1)
    assert rel.max() < tol
    results = st.search(mem[[3, 17, 29]], k=3, candidates=10)
    assert [r.chunk_ids[0] for r in results] == ["c3", "c17", "c29"]
    for r in results:
        assert r.scores[0] > 1 - max(10 * tol, 0.05) and np.all(np.diff(r.scores) <= 0)
        assert r.memory.shape == (3, N_MEM, D) and len(r.doc_ids) == len(r.texts) == 3


def test_exact_search_matches_numpy_brute_force(tmp_path):
    st = ChunkStore.open(tmp_path / "db", settings("float32"))
    rs = rows(300, seed=4)
    st.upsert(rs)
    mem = np.stack([r["memory"] for r in rs])
    queries = memories(4, seed=11)
    truth = flat_cosine(queries, mem)
    results = st.exact_search(queries, k=7, batch_size=64)  # several scan batches
    for b, res in enumerate(results):
        order = np.argsort(-truth[b])[:7]
        assert res.chunk_ids == [f"c{i}" for i in order]
        np.testing.assert_allclose(res.scores, truth[b, order], atol=1e-5)
        np.testing.assert_allclose(res.memory, mem[order], atol=1e-6)
    # the two-step search with all rows as candidates is exact too
    two_step = st.search(queries, k=7, candidates=300)
    assert [r.chunk_ids for r in two_step] == [r.chunk_ids for r in results]
    # filters restrict both
    only = st.exact_search(queries[0], k=3, filter="doc_id = 'd5'")[0]
    assert set(only.doc_ids) == {"d5"}
    assert set(st.search(queries[0], k=3, filter="doc_id = 'd5'")[0].doc_ids) == {"d5"}


def test_int4_search_scores_in_the_rotated_space_as_on_the_decoded_memory(tmp_path):
    """int4 rows are scored against the query turned once, not each row turned back: the same scores and order
    as the plain cosine on the decoded memories, and the rows kept come back decoded (turned back)."""
    st = ChunkStore.open(tmp_path / "db", settings("int4"))
    rs = rows(120, seed=6)
    st.upsert(rs)
    ids = [r["chunk_id"] for r in rs]
    decoded = st.get_memory(ids)  # the fully decoded memories
    queries = memories(3, seed=13)
    truth = flat_cosine(queries, decoded)
    for results in (st.exact_search(queries, k=6, batch_size=50), st.search(queries, k=6, candidates=120)):
        for b, res in enumerate(results):
            order = np.argsort(-truth[b], kind="stable")[:6]
            assert res.chunk_ids == [ids[i] for i in order]
            np.testing.assert_allclose(res.scores, truth[b, order], atol=1e-5)
            np.testing.assert_allclose(res.memory, decoded[order], atol=1e-5)


def test_ann_index_on_600_rows_still_finds_self_matches(tmp_path):
    st = ChunkStore.open(tmp_path / "db", settings("int8"))
    small = st.create_ann_index()
    assert not small.created and "at least" in small.message
    rs = rows(600, seed=5)
    st.upsert(rs)
    report = st.create_ann_index("IVF_PQ", metric="cosine")
    assert report.created and report.num_partitions == 2 and report.scalar_columns == ("chunk_id", "doc_id")
    indexed = {tuple(i.columns) for i in st.list_indices()}
    assert {("key",), ("chunk_id",), ("doc_id",)} <= indexed
    mem = np.stack([r["memory"] for r in rs])
    picks = list(range(0, 600, 37))
    results = st.search(mem[picks], k=5, candidates=40, nprobes=2, refine_factor=5)
    assert [r.chunk_ids[0] for r in results] == [f"c{i}" for i in picks]
    # new rows after the index are searchable before optimize, and after it
    extra = rows(3, seed=123, prefix="late")
    st.upsert(extra)
    assert st.search(extra[1]["memory"], k=1)[0].chunk_ids == ["late1"]
    st.optimize()
    assert st.search(extra[2]["memory"], k=1)[0].chunk_ids == ["late2"]
    hnsw = st.create_ann_index("IVF_HNSW_SQ", metric="dot", scalar=False)
    assert hnsw.created
    reopened = ChunkStore.open(tmp_path / "db", None)
    results = reopened.search(mem[picks[:5]], k=1, candidates=20)
    assert [r.chunk_ids[0] for r in results] == [f"c{i}" for i in picks[:5]]
    with pytest.raises(ValueError):
        st.create_ann_index("LSH")


def test_search_on_empty_table_and_bad_query(store):
    assert [len(r) for r in store.search(memories(2), k=3)] == [0, 0]
    assert len(store.exact_search(memories(1)[0], k=3)[0]) == 0
    with pytest.raises(ValueError, match="shape"):
        store.search(np.zeros((N_MEM + 1, D), np.float32))


# ---------------------------------------------------------------- full text and hybrid


WORDS = ("granite quarry basalt harbour lighthouse orchard glacier monsoon violin cathedral falcon "
         "copper tundra lagoon meteor saffron").split()


def worded_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows whose text names two rare words each (row i: words i and i+1 of WORDS, cycled)."""
    out = rows(n, seed)
    for i, r in enumerate(out):
        r["text"] = f"a note on the {WORDS[i % len(WORDS)]} and the {WORDS[(i + 1) % len(WORDS)]} of row {i}"
    return out


def test_text_search_is_bm25_on_the_text_index_and_follows_writes(store):
    store.upsert(worded_rows(12))
    with pytest.raises(ValueError, match="no full-text index"):
        store.text_search(["granite"])
    store.create_text_index()
    assert store.has_text_index
    (hit,) = store.text_search(["Where is the lighthouse?"], k=5)
    assert set(hit.chunk_ids) == {"c3", "c4"}  # "lighthouse" is word 4: rows 3 and 4, no other row
    assert np.all(np.diff(hit.scores) <= 0) and hit.memory.shape == (2, N_MEM, D)
    np.testing.assert_allclose(hit.memory, store.get_memory(hit.chunk_ids))
    # a later write is searched before the index is rebuilt; a delete leaves the results at once
    extra = worded_rows(1, seed=5)[0] | {"chunk_id": "new", "text": "lighthouse lighthouse lighthouse keeper"}
    store.upsert([extra])
    assert store.text_search(["lighthouse"], k=5)[0].chunk_ids[0] == "new"
    store.delete_chunks(["new", "c3"])
    assert store.text_search(["lighthouse"], k=5)[0].chunk_ids == ["c4"]
    empty, none = store.text_search(["   ", "zeppelin"], k=3)
    assert len(empty) == 0 and len(none) == 0
    # a question is words, never query syntax: quotes (a phrase query needs positions), AND, a colon
    for question in ('"Where is the lighthouse?"', "lighthouse AND", "text: lighthouse", "((("):
        (hit,) = store.text_search([question], k=5)
        assert hit.chunk_ids[:1] == (["c4"] if "lighthouse" in question else []), question


def test_hybrid_search_fuses_bm25_and_latent_ranks_over_the_exact_union(store):
    data = worded_rows(30)
    store.upsert(data)
    store.create_text_index()
    mem = np.stack([r["memory"] for r in data])
    words = WORDS[5]  # 16 words cycled over 30 rows: word 5 is in rows 4, 5, 20 and 21 only
    bm25_ids = store.text_search([words], k=10)[0].chunk_ids
    assert set(bm25_ids) == {"c4", "c5", "c20", "c21"}
    (latent,) = store.search(mem[7], k=5, candidates=30)  # the query's memory is row 7's
    assert latent.chunk_ids[0] == "c7"
    (only_latent,) = store.hybrid_search(mem[7], [words], k=5, candidates=30, text_weight=0.0)
    assert only_latent.chunk_ids == latent.chunk_ids  # weight 0: the latent ranking of the union
    (fused,) = store.hybrid_search(mem[7], [words], k=3, candidates=3)
    latent_ids = store.search(mem[7], k=3, candidates=3)[0].chunk_ids
    # BM25's hits outside the 3 latent candidates enter the top 3
    assert (set(fused.chunk_ids) - set(latent_ids)) & set(bm25_ids)
    assert np.all(np.diff(fused.scores) <= 0)
    np.testing.assert_allclose(fused.memory, store.get_memory(fused.chunk_ids))
    # by hand: exact cosine ranks over the union of 3 + 3 candidates, plus BM25 ranks (ties in union order)
    (top3,) = store.text_search([words], k=3)
    union = list(latent_ids) + [c for c in top3.chunk_ids if c not in latent_ids]
    cos = flat_cosine(mem[7], store.get_memory(union))[0]
    expect = {c: 1 / (60 + r) for r, c in enumerate(np.array(union)[np.argsort(-cos, kind="stable")], 1)}
    bm25 = dict(zip(top3.chunk_ids, top3.scores))
    by_bm25 = sorted((c for c in union if c in bm25), key=lambda c: (-bm25[c], union.index(c)))
    for r, c in enumerate(by_bm25, 1):
        expect[c] += 1 / (60 + r)
    assert len(fused) == 3
    for c, s in zip(fused.chunk_ids, fused.scores):
        assert s == pytest.approx(expect[c], rel=1e-5)
    with pytest.raises(ValueError, match="questions"):
        store.hybrid_search(mem[:2], [words], k=5)


def test_reciprocal_rank_fusion():
    from clara.index.store import reciprocal_rank_fusion

    fused = reciprocal_rank_fusion([0.9, 0.1, 0.5], [np.nan, 3.0, 1.0], text_weight=2.0, rrf_k=0)
    np.testing.assert_allclose(fused, [1 / 1, 1 / 3 + 2 / 1, 1 / 2 + 2 / 2])
    np.testing.assert_allclose(reciprocal_rank_fusion([0.2, 0.4], [np.nan, np.nan]), [1 / 62, 1 / 61])
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([1.0], [1.0, 2.0])
