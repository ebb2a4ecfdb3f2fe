"""The library half of the index job, without Ray: plan, chunk, compress, write, ANN refresh."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest

from clara.data.corpus import Chunk, load_scp_chunks
from clara.index.build import (
    ChunkCompressor,
    ChunkingSettings,
    DeletionGuardError,
    IndexWriter,
    auto_ann_kind,
    check_deletions,
    chunking_salt,
    cleanup_index,
    load_tokenizer,
    plan_index,
    read_compressor_info,
    refresh_ann_index,
    scp_doc_id,
    source_chunks,
    store_settings_for,
    tag_version,
    work_blocks,
)
from clara.index.codec import encode_batch
from clara.index.schema import IndexMismatchError, StoreSettings
from clara.index.store import ChunkStore


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


def test_deletion_guard_refuses_a_plan_that_empties_the_table():
    """11,447 of 11,450 rows went when a truncated corpus met --delete-missing; at 100 rows, 97 of them."""
    existing = {f"d{i:03d}::{p}": "h" for i in range(50) for p in range(2)}  # 100 rows of 50 documents
    truncated = [_chunk("d000", 0, "h"), _chunk("d000", 1, "h"), _chunk("d001", 0, "h")]
    plan = plan_index(truncated, existing, delete_missing=True)
    assert (len(plan.stale_chunk_ids), plan.missing_rows, plan.missing_docs) == (97, 96, 48)
    with pytest.raises(DeletionGuardError) as refused:
        check_deletions(plan, len(existing), 0.1)
    msg = str(refused.value)
    assert "refusing to delete 97 of the table's 100 rows (97.00%)" in msg
    assert "--max-delete-fraction 0.1 allows" in msg and "rerun with --max-delete-fraction 0.97 (or 1)" in msg
    assert "96 rows of 48 documents that are not in the corpus" in msg and "1 rows past the new end" in msg
    assert (refused.value.deleting, refused.value.rows) == (97, 100)
    check_deletions(plan, len(existing), 0.97)  # the override the message names is enough
    check_deletions(plan, len(existing), 1.0)
    # at the limit is allowed, one row past it is not; no deletion never trips the guard
    ten = plan_index([c for i in range(45) for c in (_chunk(f"d{i:03d}", 0, "h"), _chunk(f"d{i:03d}", 1, "h"))],
                     existing, delete_missing=True)
    assert len(ten.stale_chunk_ids) == 10
    check_deletions(ten, len(existing), 0.1)
    with pytest.raises(DeletionGuardError, match="11 of the table's 100 rows"):
        check_deletions(_shortened(11, existing), len(existing), 0.1)
    without = plan_index(truncated, existing)  # without --delete-missing only d001::1 (d001 shrank) goes
    assert without.stale_chunk_ids == ["d001::1"]
    check_deletions(without, len(existing), 0.01)
    with pytest.raises(ValueError, match="within"):
        check_deletions(plan, 100, 1.5)


def _shortened(n: int, existing: dict[str, str]):
    """A plan over ``existing`` in which ``n`` documents lost their second chunk (deleted even without
    --delete-missing, and guarded all the same)."""
    drop = set(sorted(c for c in existing if c.endswith("::1"))[:n])
    source = [_chunk(doc, int(pos), "h") for doc, pos in (c.split("::") for c in existing if c not in drop)]
    return plan_index(source, existing)


def test_runs_are_tagged_and_cleanup_keeps_tags_and_the_latest(tmp_path):
    settings = StoreSettings(n_mem=4, d=16, compressor_version="v", key_dim=8)
    store = ChunkStore.open(tmp_path / "db", settings)
    rng = np.random.default_rng(0)

    def commit(i: int) -> None:
        meta = {"chunk_id": [f"d{i}::0"], "doc_id": [f"d{i}"], "position": [0], "text": [f"text {i}"]}
        store.upsert(encode_batch(meta, rng.standard_normal((1, 4, 16)).astype(np.float32), settings))

    runs = []
    for run in range(3):  # each run: two commits, then its last version is tagged
        commit(2 * run)
        commit(2 * run + 1)
        runs.append(store.version)
        assert tag_version(store) == f"index-v{store.version}"
        assert tag_version(store) is None  # already tagged: a rerun that wrote nothing adds no tag
    store.tag("golden", runs[0])  # a tag made by hand
    commit(99)  # a partial run: its version is untagged but the latest
    before = [v["version"] for v in store.versions()]
    assert before == list(range(1, runs[-1] + 2))

    kept = cleanup_index(store, dt.timedelta(days=7))
    assert kept.versions_removed == 0 and kept.versions_left == before
    summary = cleanup_index(store, dt.timedelta(0))
    assert summary.versions_left == [*runs, store.version] == [v["version"] for v in store.versions()]
    assert summary.tags_removed == [] and summary.tags == {"index-v3": 3, "index-v5": 5, "index-v7": 7, "golden": 3}
    assert summary.format().startswith("removed 4 versions (")  # 1, 2, 4, 6: the partial commits

    bounded = cleanup_index(store, dt.timedelta(0), keep_tags=1)  # only the newest job tag stays
    assert bounded.tags_removed == ["index-v3", "index-v5"] and bounded.tags == {"index-v7": 7, "golden": 3}
    assert bounded.versions_left == [3, 7, store.version]  # v3 stays: it still has the hand-made tag
    with pytest.raises(ValueError, match="kind"):
        tag_version(store, "nightly")


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


def _rows(settings, lo: int, hi: int, seed: int = 0):
    ids = [f"d{i}::0" for i in range(lo, hi)]
    meta = {"chunk_id": ids, "doc_id": [i[:-3] for i in ids], "position": [0] * len(ids), "text": ids}
    memory = np.random.default_rng(seed).standard_normal((hi - lo, 4, 16)).astype(np.float32)
    return encode_batch(meta, memory, settings)


def test_a_writer_of_new_chunks_appends_until_another_writer_shows_up(tmp_path, caplog, monkeypatch):
    settings = StoreSettings(n_mem=4, d=16, compressor_version="v", key_dim=8)
    store = ChunkStore.open(tmp_path / "db", settings)
    with pytest.raises(ValueError, match="duplicate chunk_id"):  # append never writes a duplicate it is given
        store.append(pa.concat_tables([_rows(settings, 0, 3), _rows(settings, 2, 4)]))
    assert store.count() == 0
    start = store.version
    writer = IndexWriter(store, commit_rows=40, new_only=True)
    with monkeypatch.context() as m:  # appended: not one upsert
        m.setattr(ChunkStore, "upsert", lambda self, rows: pytest.fail("upserted"))
        writer.add(_rows(settings, 0, 40))
        writer.add(_rows(settings, 40, 80))
    assert writer.new_only and writer.stats.commits == 2 and writer.stats.inserted == 80
    assert store.version == start + 2 == writer.stats.version and store.count() == 80  # a version a commit
    # another handle writes a row this writer is about to write: it notices before its next commit
    other = ChunkStore.open(tmp_path / "db", settings)
    other.upsert(_rows(settings, 85, 86, seed=1))
    with caplog.at_level("WARNING", logger="clara.index.build"):
        writer.add(_rows(settings, 80, 120, seed=2))
    assert not writer.new_only and "another writer" in caplog.text
    ids = [i for b in store.scan(["chunk_id"]) for i in b.column("chunk_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 120  # d85 once: the commit upserted
    got = store.get_memory(["d85::0"])
    want = np.random.default_rng(2).standard_normal((40, 4, 16)).astype(np.float32)[5]
    assert np.allclose(got[0], want, atol=1e-2 * np.abs(want).max())  # this writer's row replaced the other's


def test_a_writer_that_finds_its_append_was_not_next_upserts_from_then_on(tmp_path, caplog, monkeypatch):
    settings = StoreSettings(n_mem=4, d=16, compressor_version="v", key_dim=8)
    store = ChunkStore.open(tmp_path / "db", settings)
    writer = IndexWriter(store, commit_rows=10, new_only=True)
    writer.add(_rows(settings, 0, 10))
    # another writer commits between this writer's check and its append (the check is made to miss it)
    ChunkStore.open(tmp_path / "db", settings).upsert(_rows(settings, 50, 51))
    monkeypatch.setattr(store, "latest_version", lambda: writer.stats.version)
    with caplog.at_level("WARNING", logger="clara.index.build"):
        writer.add(_rows(settings, 10, 20))
    assert not writer.new_only and "after" in caplog.text and "another writer" in caplog.text
    assert store.count() == 21 and writer.stats.version == store.latest_version()


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
    assert auto_ann_kind(store) == "IVF_HNSW_SQ"  # --ann-index auto keeps the kind a table has


def test_ann_index_auto_builds_the_int8_scan_once_the_table_is_large(tmp_path):
    settings = StoreSettings(n_mem=4, d=16, compressor_version="v", key_dim=8)
    store = ChunkStore.open(tmp_path / "db", settings)
    ids = [f"d{i}::0" for i in range(600)]
    meta = {"chunk_id": ids, "doc_id": [i[:-3] for i in ids], "position": [0] * 600, "text": ids}
    mem = np.random.default_rng(1).standard_normal((600, 4, 16)).astype(np.float32)
    store.upsert(encode_batch(meta, mem, settings))
    assert auto_ann_kind(store) is None  # 600 rows: a query scans the float keys, exact
    assert auto_ann_kind(store, min_rows=500) == "IVF_SQ"
    built = refresh_ann_index(store, auto_ann_kind(store, min_rows=500))
    assert built.startswith("built IVF_SQ (cosine, 1 partitions)"), built
    assert auto_ann_kind(store) == "IVF_SQ"  # built: kept whatever the rows
    # a scan of every int8 key: each row's own memory finds it first among 10 candidates
    found = store.search(mem[::60], k=1, candidates=10)
    assert [r.chunk_ids[0] for r in found] == ids[::60]
    assert refresh_ann_index(store, "IVF_SQ").startswith("folded")
    # an IVF_SQ index of more partitions than a search probes by default (the old sqrt(rows) rule) is retrained
    store.create_ann_index("IVF_SQ", num_partitions=24, scalar=False)
    assert refresh_ann_index(store, "IVF_SQ").startswith("retrained (24 partitions, more than a search probes)")
    assert refresh_ann_index(store, "IVF_SQ").startswith("folded")


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_chunk_planner_gives_the_driver_readers_chunks_and_diffs_against_the_table(model_dir, scp_sample_path,
                                                                                   tmp_path, kind):
    """The worker-side plan (without Ray: the batches built as Ray Data's readers give them) has exactly the
    chunks of the driver's reader, statuses against the table, stale rows for a shortened document, and a bad
    record comes back as an error row naming file, line or record, and field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clara.index.build import PLAN_SCHEMA, ChunkPlanner, plan_error

    model_path, _ = model_dir
    texts = load_scp_chunks(scp_sample_path)[:12]
    docs = {f"d{i:02d}": t + " " + t for i, t in enumerate(texts)}
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if kind == "jsonl":
        (corpus / "a.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    elif kind == "parquet":
        pq.write_table(pa.table({"id": list(docs), "text": list(docs.values())}), corpus / "a.parquet")
    else:
        for k, v in docs.items():
            (corpus / f"{k}.txt").write_text(v)
    files = sorted(str(f) for f in corpus.iterdir())

    def batch(paths):  # what read_binary_files / read_parquet(include_paths=True) give the planner
        if kind == "parquet":
            t = pq.read_table(paths[0])
            return t.append_column("path", pa.array([paths[0]] * t.num_rows))
        return pa.table({"bytes": [open(p, "rb").read() for p in paths], "path": paths})

    chunking = ChunkingSettings(chunk_tokens=32)
    tok = load_tokenizer(model_path)
    salt = chunking_salt(chunking, "v1", tok)
    truth = list(source_chunks(corpus if kind != "jsonl" else files[0], tok, chunking, salt))
    planner = ChunkPlanner(model_path, chunking, salt, kind=kind, table_uri=str(tmp_path / "db"), table_name="chunks",
                           base=str(corpus))
    rows = planner(batch(files))
    assert rows.schema == PLAN_SCHEMA and set(rows.column("status").to_pylist()) == {"new"}
    assert [(r["chunk_id"], r["text"], r["content_hash"]) for r in rows.to_pylist()] == [
        (c.chunk_id, c.text, c.content_hash) for c in truth]

    # against a table holding the first 10 chunks, one of them edited, and a row past a document's end
    store = ChunkStore.open(tmp_path / "db", StoreSettings(n_mem=2, d=4, compressor_version="v1"))
    held = truth[:10]
    meta = {"chunk_id": [c.chunk_id for c in held] + [f"{truth[0].doc_id}::99"],
            "doc_id": [c.doc_id for c in held] + [truth[0].doc_id], "position": [c.position for c in held] + [99],
            "text": [c.text for c in held] + ["old"],
            "content_hash": [c.content_hash for c in held[:-1]] + ["edited", "old"]}
    store.upsert(encode_batch(meta, np.ones((11, 2, 4), np.float32), store.settings))
    planner = ChunkPlanner(model_path, chunking, salt, kind=kind, table_uri=str(tmp_path / "db"), table_name="chunks",
                           base=str(corpus), table_exists=True)
    statuses = dict(zip(*planner(batch(files)).select(["chunk_id", "status"]).to_pydict().values()))
    assert statuses.pop(f"{truth[0].doc_id}::99") == "stale"
    expected = {c.chunk_id: "unchanged" for c in held[:-1]} | {held[-1].chunk_id: "changed"}
    expected |= {c.chunk_id: "new" for c in truth[10:]}
    assert statuses == expected

    if kind == "jsonl":  # a bad record: an error row, the driver raises it
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n')
        row = planner(pa.table({"bytes": [bad.read_bytes()], "path": [str(bad)]})).to_pylist()
        assert [r["status"] for r in row] == ["error"]
        assert str(plan_error(row[0]["text"])) == f"{bad}:2: field 'text': missing"
