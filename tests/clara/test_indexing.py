"""The library half of the index job, without Ray: plan, chunk, compress, write, ANN refresh."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clara.corpus import Chunk, load_scp_chunks
from clara.indexing import (
    ChunkCompressor,
    ChunkingSettings,
    IndexWriter,
    chunking_salt,
    load_tokenizer,
    plan_index,
    read_compressor_info,
    refresh_ann_index,
    scp_doc_id,
    source_chunks,
    store_settings_for,
    work_blocks,
)
from clara.store import ChunkStore, IndexMismatchError, StoreSettings, encode_batch


@pytest.fixture
def model_dir(make_model, tmp_path):
    model = make_model()
    return model.save_pretrained(tmp_path / "model"), model


def _chunk(doc: str, pos: int, h: str, text: str = "some text") -> Chunk:
    return Chunk(f"{doc}::{pos}", doc, pos, text, h)


def test_compressor_info_from_the_manifest_and_store_settings(model_dir):
    path, model = model_dir
    info = read_compressor_info(path)
    assert (info.n_mem, info.d, info.compressor_version) == (16, 128, model.compressor_version())
    assert (info.compression_rate, info.doc_max_tokens) == (4, 64)
    s = store_settings_for(info)
    assert (s.dtype, s.key_dim, s.key_seed, s.model) == ("float16", 256, 0, str(path))
    existing = StoreSettings(n_mem=16, d=128, compressor_version=info.compressor_version, dtype="int8", key_dim=64)
    inherited = store_settings_for(info, existing)
    assert (inherited.dtype, inherited.key_dim) == ("int8", 64)  # a rerun need not repeat the storage flags
    with pytest.raises(IndexMismatchError, match=r"dtype: table has 'int8'.*gives 'float32'"):
        store_settings_for(info, existing, dtype="float32")
    other = StoreSettings(n_mem=8, d=128, compressor_version="something-else")
    with pytest.raises(IndexMismatchError, match="n_mem.*compressor_version"):
        store_settings_for(info, other)
    with pytest.raises(Exception, match="clara.json"):
        read_compressor_info(path.parent)


def test_scp_chunks_ids_and_salted_hashes(scp_sample_path, model_dir):
    path, _ = model_dir
    chunking = ChunkingSettings(chunk_tokens=64, format="scp")
    salt = chunking_salt(chunking, "v1")
    chunks = list(source_chunks(scp_sample_path, None, chunking, salt))
    texts = load_scp_chunks(scp_sample_path)
    assert [c.text for c in chunks] == texts and len(chunks) == 900
    assert all(c.chunk_id == f"{scp_doc_id(c.text)}::0" and c.position == 0 for c in chunks)
    again = list(source_chunks(scp_sample_path, None, chunking, salt))
    assert again == chunks  # stable across runs
    other = list(source_chunks(scp_sample_path, None, chunking, chunking_salt(chunking, "v2"), limit=3))
    assert [c.chunk_id for c in other] == [c.chunk_id for c in chunks[:3]]
    assert all(a.content_hash != b.content_hash for a, b in zip(other, chunks))  # new compressor: recompress


def test_text_corpus_chunking_titles_limit_and_salt(tmp_path, model_dir):
    path, _ = model_dir
    tok = load_tokenizer(path)
    corpus = tmp_path / "docs.jsonl"
    words = " ".join(f"word{i}" for i in range(200))
    corpus.write_text("".join(json.dumps({"key": f"d{i}", "body": words, "name": f"Title {i}"}) + "\n"
                              for i in range(4)))
    chunking = ChunkingSettings(chunk_tokens=32, overlap=4, title_field="name")
    salt = chunking_salt(chunking, "v1", tok)
    chunks = list(source_chunks(corpus, tok, chunking, salt, id_field="key", text_field="body", limit=2))
    assert {c.doc_id for c in chunks} == {"d0", "d1"}
    assert all(c.text.startswith(f"Title {c.doc_id[1:]}\n") for c in chunks)
    assert [c.position for c in chunks if c.doc_id == "d0"] == list(range(len(chunks) // 2))
    wider = ChunkingSettings(chunk_tokens=48, overlap=4, title_field="name")
    assert chunking_salt(wider, "v1", tok) != salt
    with pytest.raises(ValueError, match="overlap"):
        ChunkingSettings(chunk_tokens=8, overlap=8)


def test_plan_skips_unchanged_and_lists_stale_rows():
    existing = {"a::0": "h0", "a::1": "h1", "a::2": "h2", "b::0": "hb", "gone::0": "hg", "odd-id": "x"}
    source = [_chunk("a", 0, "h0"), _chunk("a", 1, "h1-new"), _chunk("b", 0, "hb"), _chunk("c", 0, "hc")]
    plan = plan_index(source, existing)
    assert [c.chunk_id for c in plan.to_compress] == ["a::1", "c::0"]
    assert (plan.read, plan.docs, plan.new, plan.changed, plan.skipped) == (4, 3, 1, 1, 2)
    assert plan.stale_chunk_ids == ["a::2"]  # a shrank; 'gone' and the foreign id stay without delete_missing
    full = plan_index(source, existing, delete_missing=True)
    assert full.stale_chunk_ids == ["a::2", "gone::0", "odd-id"]
    with pytest.raises(ValueError, match="'a::0'.*twice"):
        plan_index([_chunk("a", 0, "h"), _chunk("a", 0, "h")], {})


def test_work_blocks_sort_by_length_in_whole_batches():
    chunks = [_chunk(f"d{i}", 0, "h", "x" * ((i * 37) % 101 + 1)) for i in range(1000)]
    blocks = work_blocks(chunks, batch_size=16, workers=2)
    assert sum(b.num_rows for b in blocks) == 1000
    assert all(b.num_rows % 16 == 0 for b in blocks[:-1]) and len(blocks) >= 8
    lengths = [len(t) for b in blocks for t in b.column("text").to_pylist()]
    assert lengths == sorted(lengths)
    ids = [c for b in blocks for c in b.column("chunk_id").to_pylist()]
    assert sorted(ids) == sorted(c.chunk_id for c in chunks)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_compress_and_write_round_trip_per_dtype(model_dir, scp_sample_path, tmp_path, dtype):
    path, model = model_dir
    info = read_compressor_info(path)
    settings = store_settings_for(info, dtype=dtype)
    texts = load_scp_chunks(scp_sample_path)[:64]
    chunking = ChunkingSettings(chunk_tokens=64, format="scp")
    chunks = list(source_chunks(scp_sample_path, None, chunking, chunking_salt(chunking, info.compressor_version),
                                limit=64))
    compressor = ChunkCompressor(path, settings, device="cpu", batch_size=16)
    store = ChunkStore.open(tmp_path / "db", settings)
    commits = []
    writer = IndexWriter(store, commit_rows=40, on_commit=lambda w: commits.append(w.rows))
    for block in work_blocks(chunks, batch_size=16, workers=1):
        writer.add(compressor(block))
    writer.flush()
    assert commits == [48, 64] and writer.stats.inserted == 64 and writer.stats.version == store.version
    ids = [c.chunk_id for c in chunks]
    ref = model.compress(texts).numpy()  # (64, 16, 128) float32, same model in this process
    got = store.get_memory(ids)
    tok_max = np.abs(ref).max(-1, keepdims=True)
    err = np.abs(got - ref)
    # Documented bounds (plus float32 noise from other batch padding: 1e-5 of the token's max):
    noise = 1e-5 * tok_max
    if dtype == "float32":
        assert np.all(err <= noise)
    elif dtype == "float16":
        assert np.all(err <= 2.0**-11 * np.abs(ref) + noise + 2.0**-24)
    else:
        assert np.all(err <= tok_max / 254 + noise)
    # retrieval is unaffected at this precision: every chunk's memory finds itself first
    hits = store.exact_search(ref[:8], k=1)
    assert [h.chunk_ids[0] for h in hits] == ids[:8]


def test_compressor_refuses_an_index_of_another_compressor(model_dir):
    path, _ = model_dir
    wrong = StoreSettings(n_mem=16, d=128, compressor_version="not-this-one")
    with pytest.raises(IndexMismatchError, match="does not match the index"):
        ChunkCompressor(path, wrong, device="cpu")


def test_refresh_ann_index_builds_folds_and_retrains(tmp_path):
    settings = StoreSettings(n_mem=4, d=16, compressor_version="v", key_dim=8)
    store = ChunkStore.open(tmp_path / "db", settings)
    rng = np.random.default_rng(0)

    def add(lo: int, hi: int) -> None:
        ids = [f"d{i}::0" for i in range(lo, hi)]
        meta = {"chunk_id": ids, "doc_id": [i[:-3] for i in ids], "position": [0] * len(ids), "text": ids}
        store.upsert(encode_batch(meta, rng.standard_normal((hi - lo, 4, 16)).astype(np.float32), settings))

    add(0, 100)
    assert "not building" in refresh_ann_index(store, "IVF_FLAT", min_rows=256)
    add(100, 400)
    assert refresh_ann_index(store, "ivf_flat", min_rows=256).startswith("built IVF_FLAT")
    add(400, 500)
    assert refresh_ann_index(store, "IVF_FLAT").startswith("folded")
    assert refresh_ann_index(store, "IVF_HNSW_SQ").startswith("replaced IVF_FLAT")
    add(500, 1100)
    assert refresh_ann_index(store, "IVF_HNSW_SQ").startswith("retrained")
    with pytest.raises(ValueError, match="ANN index kind"):
        refresh_ann_index(store, "KDTREE")
