"""The index job on a real local Ray (the session's 2-CPU ``ray_session``) and real LanceDB tables on disk.

Each test keeps its data small (the 900 chunks of the stage-1 sample, a 2-layer 128-wide model), so a
job run takes ~10-15 s, most of it the actors importing torch and loading the model.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from clara.data.corpus import DocumentError, load_scp_chunks
from clara.index.build import DeletionGuardError, IndexWriter, scp_doc_id
from clara.index.schema import IndexMismatchError, IndexNotFoundError
from clara.index.store import ChunkStore
from pipelines.index import IndexJobError, IndexSettings, IndexSummary, list_versions, main, run_index

pytestmark = pytest.mark.ray

# Bounds of the storage round trip, per element x of a memory token t (see clara.index.store):
#   float16: |x - x16| <= 2**-11 |x| (+ 2**-24 for subnormals)
#   int8:    |x - x8| <= scale_t / 2 with scale_t = max|t| / 127
# plus float32 noise from batching differently in the actors than in the reference (1e-5 of max|t|).
F16_REL = 2.0**-11
BATCH_NOISE = 1e-5


def _settings(corpus, model, table, **kw) -> IndexSettings:
    base = dict(actors=2, num_cpus_per_actor=0.5, batch_size=32)
    base.update(kw)
    return IndexSettings(corpus=corpus, model=model, table_uri=table, **base)


def _rows(table_uri, name="chunks") -> dict[str, dict]:
    store = ChunkStore.open(table_uri, None, table=name, create=False)
    t = store.table.to_arrow().select(["chunk_id", "doc_id", "text", "content_hash", "indexed_at"])
    return {r["chunk_id"]: r for r in t.to_pylist()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_base) -> Path:
    """The tiny model of the ``make_model`` fixture (seed 0, rate 4, 64-token chunks: memory [16, 128]), saved."""
    from clara.config import ClaraConfig, LoraSettings
    from clara.model import ClaraModel

    config = ClaraConfig(base_model=str(tiny_base), compression_rate=4, doc_max_tokens=64, device="cpu",
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    return ClaraModel.from_base(config, seed=0).save_pretrained(tmp_path_factory.mktemp("index") / "model")


@pytest.fixture(scope="module")
def scp_index(ray_session, tmp_path_factory, model_dir, scp_sample_path):
    """The 900 chunks of the sample indexed once (float16, the default): ``(settings, summary)``."""
    table = tmp_path_factory.mktemp("scp") / "db"
    lines: list[str] = []
    s = _settings(scp_sample_path, model_dir, table, format="scp", commit_rows=256)
    summary = run_index(s, progress=lines.append)
    return s, summary, lines


def test_index_scp_sample_one_row_per_chunk(scp_index, scp_sample_path, make_model):
    s, summary, lines = scp_index
    texts = load_scp_chunks(scp_sample_path)
    assert len(texts) == 900
    assert (summary.chunks_read, summary.compressed, summary.new, summary.skipped, summary.rows) == (900, 900, 900, 0,
                                                                                                      900)
    assert summary.bytes_written > 900 * 16 * 128 * 2 and 1 < summary.commits <= 4  # >= 256 rows a commit
    rows = _rows(s.table_uri)
    assert set(rows) == {f"{scp_doc_id(t)}::0" for t in texts}  # one row per chunk, ids from the text
    assert {r["text"] for r in rows.values()} == set(texts)
    store = ChunkStore.open(s.table_uri, None, create=False)
    assert summary.version == store.version and store.count() == 900
    # --ann-index auto (the default): no ANN index below 100,000 rows, queries scan the keys
    assert s.ann_index == "AUTO" and summary.ann == "" and not any("ANN index" in line for line in lines)
    with pytest.raises(ValueError, match="auto or none, got 'HNSW'"):
        IndexSettings(**{**s.__dict__, "ann_index": "hnsw"})
    st = store.settings
    assert (st.n_mem, st.d, st.dtype, st.key_dim) == (16, 128, "float16", 256)
    assert any("compressed and written" in line for line in lines) and "900 compressed" in lines[-1]

    # float16 round trip: what the table holds is the compressor's memory within the documented bound
    ids = sorted(rows)[:200]
    ref = make_model().compress([rows[i]["text"] for i in ids]).numpy()  # (200, 16, 128) float32
    got = store.get_memory(ids)
    tok_max = np.abs(ref).max(-1, keepdims=True)
    assert np.all(np.abs(got - ref) <= F16_REL * np.abs(ref) + BATCH_NOISE * tok_max + 2.0**-24)


def test_rerun_unchanged_recompresses_nothing(scp_index):
    s, first, _ = scp_index
    before = _rows(s.table_uri)
    again = run_index(s)
    assert (again.compressed, again.skipped, again.deleted, again.rows) == (0, 900, 0, 900)
    assert again.version == again.start_version  # nothing written: no new version
    assert _rows(s.table_uri) == before  # same rows, same indexed_at


def test_two_step_search_recall_against_brute_force(scp_index, make_model, scp_records):
    s, _, _ = scp_index
    summary = run_index(IndexSettings(**{**s.__dict__, "ann_index": "IVF_HNSW_SQ"}))
    assert summary.compressed == 0 and "built IVF_HNSW_SQ" in summary.ann
    store = ChunkStore.open(s.table_uri, None, create=False)
    assert any(list(i.columns) == ["key"] for i in store.list_indices())
    questions = [ex.question for ex in scp_records][::73][:100]
    query = make_model().encode_query(questions).numpy()  # (100, 16, 128)
    exact = store.exact_search(query, k=10)
    ann = store.search(query, k=10, candidates=100)
    recall = np.mean([len(set(a.chunk_ids) & set(e.chunk_ids)) / 10 for a, e in zip(ann, exact)])
    assert recall >= 0.98, recall
    # the re-scored scores are the exact CLaRa cosines
    np.testing.assert_allclose(ann[0].scores[:3], exact[0].scores[:3], atol=1e-5)


def test_a_new_table_gets_a_fitted_key_at_scale_unless_told():
    from pipelines.index import default_fitted_key_dim, new_table_key

    s = IndexSettings(corpus="c.jsonl", model="m", table_uri="db")
    assert s.key_basis is None and s.key_fit_rows == 4096
    assert new_table_key(s, 40_959, 256) == "random" and new_table_key(s, 40_960, 256) == "pca"  # 10 x the sample
    assert new_table_key(s, 10**9, 8192) == "random"  # a sample too small for the key: no automatic fit
    assert new_table_key(IndexSettings(**{**s.__dict__, "key_basis": "random"}), 10**9, 256) == "random"
    assert new_table_key(IndexSettings(**{**s.__dict__, "key_basis": "pca"}), 500, 256) == "pca"
    assert default_fitted_key_dim(16, 576) == 256 and default_fitted_key_dim(4, 16) == 8
    with pytest.raises(ValueError, match="key_basis must be random or pca"):
        IndexSettings(corpus="c.jsonl", model="m", table_uri="db", key_basis="learned")


def test_a_pca_key_basis_is_fitted_once_kept_with_the_table_and_searched_with(ray_session, model_dir, make_model,
                                                                               scp_sample_path, scp_records, tmp_path,
                                                                               monkeypatch):
    """``--key-basis pca``: the job compresses a sample, fits the key on it, stores the basis beside the table;
    the keys are the stored memory projected on it, a query finds the exact top-10 among few candidates, a
    rerun keeps the basis, and a table of random keys is not silently switched."""
    import pipelines.index as job

    calls = tmp_path / "compressed.txt"

    made = tmp_path / "actors.txt"

    class Counting(job.ChunkCompressor):  # defined here: Ray ships it to the actors by value
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            with open(made, "a") as f:
                f.write("actor\n")

        def compress_rows(self, batch):
            with open(calls, "a") as f:
                f.write(f"{batch.num_rows}\n")
            return super().compress_rows(batch)

    def compressed() -> int:
        n = sum(int(x) for x in calls.read_text().split())
        calls.unlink()
        return n

    def actors() -> int:
        n = made.read_text().count("actor")
        made.unlink()
        return n

    monkeypatch.setattr(job, "ChunkCompressor", Counting)
    lines: list[str] = []
    s = _settings(scp_sample_path, model_dir, tmp_path / "db", format="scp", commit_rows=512, key_basis="pca",
                  key_dim=32, key_fit_rows=120, limit=240)
    summary = run_index(s, progress=lines.append)
    assert summary.compressed == summary.rows == 240
    assert compressed() == 240  # the 120 compressed for the fit are written, not compressed again
    assert actors() == s.actors  # by the run's actors: one pool, started once
    store = ChunkStore.open(s.table_uri, None, create=False)
    basis = store.key_basis
    assert basis is not None and basis.digest == store.settings.key_basis and basis.fitted_rows == 120
    assert basis.matrix.shape == (16 * 128, 32) and store.settings.key_dim == 32
    assert any(f"key basis {basis.digest}: 32 dimensions fitted on 120 chunks" in line for line in lines)
    t = store.table.to_arrow()
    keys = np.stack(t.column("key").to_numpy(zero_copy_only=False))
    memory = store.get_memory(t.column("chunk_id").to_pylist())
    from clara.index.codec import project_keys

    np.testing.assert_allclose(keys, project_keys(memory, 32, basis=basis), atol=2e-3)  # of the float16 memory
    # the fit's chunks hold the memory the compressor makes of them, like the others
    ref = make_model().compress(t.column("text").to_pylist()).numpy()
    tok_max = np.abs(ref).max(-1, keepdims=True)
    assert np.all(np.abs(memory - ref) <= F16_REL * np.abs(ref) + BATCH_NOISE * tok_max + 2.0**-24)
    questions = [ex.question for ex in scp_records][::73][:60]
    query = make_model().encode_query(questions).numpy()
    exact = store.exact_search(query, k=10)
    found = store.search(query, k=10, candidates=50)
    recall = np.mean([len(set(a.chunk_ids) & set(e.chunk_ids)) / 10 for a, e in zip(found, exact)])
    assert recall >= 0.95, recall

    again = run_index(IndexSettings(**{**s.__dict__, "key_basis": None}))
    assert again.compressed == 0
    assert ChunkStore.open(s.table_uri, None, create=False).key_basis.digest == basis.digest
    with pytest.raises(IndexMismatchError, match="not --key-basis random"):
        run_index(IndexSettings(**{**s.__dict__, "key_basis": "random"}))

    # the streamed plan (--reader ray-data) fits on a sample of the planned rows the same way
    texts = load_scp_chunks(scp_sample_path)[:40]
    corpus = _write_corpus(tmp_path / "one.jsonl", {f"d{i:03d}": t for i, t in enumerate(texts)}, "jsonl")
    streamed = run_index(_settings(corpus, model_dir, tmp_path / "db2", reader="ray-data", key_basis="pca",
                                   key_dim=16, key_fit_rows=64))
    st = ChunkStore.open(tmp_path / "db2", None, create=False)
    assert streamed.rows >= 100 and st.key_basis is not None and st.key_basis.fitted_rows == 64
    assert compressed() == streamed.compressed == streamed.rows == streamed.new == streamed.chunks_read
    assert actors() == 2
    # a sample of every chunk: nothing left to compress after the fit, every chunk written once
    small = run_index(_settings(corpus, model_dir, tmp_path / "db4", key_basis="pca", key_dim=16, key_fit_rows=1000))
    assert compressed() == small.rows == small.chunks_read >= 100
    assert st.count() == len(set(st.table.to_arrow().column("chunk_id").to_pylist()))
    with pytest.raises(ValueError, match="--key-basis pca fits a 64-d key .* there are [0-9]+ "):
        run_index(_settings(corpus, model_dir, tmp_path / "db3", key_basis="pca", key_dim=64, limit=10))
    with pytest.raises(IndexNotFoundError):  # refused before the table was created
        ChunkStore.open(tmp_path / "db3", None, create=False)


def test_the_job_keeps_a_text_index_for_hybrid_retrieval(scp_index, model_dir, scp_records):
    """The run built the full-text index; with the tiny random model, latent retrieval barely finds a
    question's chunk, BM25 and hybrid (through the served Retriever) find most."""
    from clara.index.retrieve import Retriever

    s, summary, lines = scp_index
    assert summary.text_index.startswith("built on 900 rows") and any("text index" in line for line in lines)
    store = ChunkStore.open(s.table_uri, None, create=False)
    assert store.has_text_index
    examples = [ex for ex in scp_records][::41][:20]
    gold = [f"{scp_doc_id(ex.chunks[0])}::0" for ex in examples]
    questions = [ex.question for ex in examples]
    retriever = Retriever.open(model_dir, s.table_uri, candidates=20, retrieval="hybrid")
    hybrid = retriever.retrieve(questions, k=5, with_memory=False)
    retriever.set_retrieval("latent")
    latent = retriever.retrieve(questions, k=5, with_memory=False)
    bm25 = store.text_search(questions, k=5)

    def recall(results) -> float:
        return float(np.mean([g in r.chunk_ids for g, r in zip(gold, results)]))

    assert recall(bm25) >= 0.7 and recall(hybrid) >= 0.7 > recall(latent) + 0.3, \
        (recall(latent), recall(bm25), recall(hybrid))
    assert retriever.describe()["retrieval"] == "latent"
    rerun = run_index(s)  # nothing changed: the text index is left alone
    assert rerun.text_index == "" and rerun.version == rerun.start_version


def test_run_sharded_runs_each_shard_or_the_one_asked(monkeypatch, tmp_path):
    """The loop over shards (the shard runs themselves are tested on two nodes, tests/cluster)."""
    import pipelines.index as job
    from clara.index.shards import Manifest

    seen, published = [], []
    def run_index(s, progress=None):
        seen.append((s.shards, s.shard))
        return _summary(version=10 + (s.shard or 0))

    monkeypatch.setattr(job, "run_index", run_index)

    def publish(uri, table, shards, *, updates=None, note="", storage_options=None):
        published.append((shards, updates, note))
        return Manifest(len(published), (0,) * shards, dt.datetime.now(dt.timezone.utc), "", note)

    monkeypatch.setattr(job, "publish_manifest", publish)
    pruned = []
    monkeypatch.setattr(job, "prune_manifests", lambda uri, table, shards, keep, storage_options=None:
                        pruned.append((shards, keep)) or [])
    base = dict(corpus="c.jsonl", model="m", table_uri=str(tmp_path))
    every = job.run_sharded(IndexSettings(**base, shards=3))
    assert [r.version for r in every] == [10, 11, 12] and seen == [(3, 0), (3, 1), (3, 2)]
    # a run over every shard publishes one manifest of every shard's latest version, after the last shard
    assert published == [(3, None, "index run of every shard")] and [r.manifest for r in every] == [0, 0, 1]
    assert [r.version for r in job.run_sharded(IndexSettings(**base, shards=3, shard=1))] == [11]
    assert len(published) == 1  # one shard of parallel jobs: nothing published (auto)
    (one,) = job.run_sharded(IndexSettings(**base, shards=3, shard=1, publish="always"))
    assert published[-1] == (3, {1: 11}, "index run of shard 1") and one.manifest == 2
    job.run_sharded(IndexSettings(**base, shards=3, publish="never"))
    assert job.run_sharded(IndexSettings(**base))[0].version == 10 and seen[-1] == (1, None)
    assert len(published) == 2 and pruned == []
    job.run_sharded(IndexSettings(**base, shards=3, cleanup_older_than_days=1, keep_tags=0))
    assert len(published) == 3 and pruned == [(3, 1)]  # the manifests' tags bounded with the job's own
    with pytest.raises(ValueError, match="shard"):
        IndexSettings(**base, shards=2, shard=2)
    with pytest.raises(ValueError, match="publish"):
        IndexSettings(**base, shards=2, publish="sometimes")


def _summary(**kw) -> IndexSummary:
    fields = {f.name: 0 for f in dataclasses.fields(IndexSummary) if f.default is dataclasses.MISSING}
    return IndexSummary(**{**fields, "table_uri": "t", "table_name": "chunks", **kw})


def test_other_compressor_wrong_shape_or_bad_input_leave_the_table_unchanged(scp_index, make_model, tmp_path):
    s, _, _ = scp_index
    store = ChunkStore.open(s.table_uri, None, create=False)
    version, rows = store.version, _rows(s.table_uri)
    other = make_model(seed=1).save_pretrained(tmp_path / "other")  # other memory slots: another compressor
    with pytest.raises(IndexMismatchError, match="compressor_version"):
        run_index(IndexSettings(**{**s.__dict__, "model": other}))
    shape = make_model(compression_rate=8).save_pretrained(tmp_path / "rate8")  # 8 memory tokens, not 16
    with pytest.raises(IndexMismatchError, match="n_mem"):
        run_index(IndexSettings(**{**s.__dict__, "model": shape}))
    with pytest.raises(IndexMismatchError, match="dtype"):
        run_index(IndexSettings(**{**s.__dict__, "dtype": "int8"}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n" + json.dumps({"id": "b", "body": "no text"}) + "\n")
    with pytest.raises(DocumentError, match=r"bad.jsonl:2: field 'text'"):
        run_index(IndexSettings(**{**s.__dict__, "corpus": bad, "format": "auto"}))
    # a variable-length memory vector (one row one value short) is refused before anything is written
    n_flat = 16 * 128
    variable = pa.table({"chunk_id": ["v::0", "v::1"], "doc_id": ["v", "v"], "position": pa.array([0, 1], pa.int32()),
                         "text": ["a", "b"], "memory": pa.array([[0.5] * n_flat, [0.5] * (n_flat - 1)])})
    writer = IndexWriter(store, commit_rows=1)
    with pytest.raises(ValueError, match="'v::1'"):
        writer.add(variable)
    store.refresh()
    assert store.version == version and _rows(s.table_uri) == rows


def test_changed_and_deleted_documents_touch_exactly_their_rows(ray_session, model_dir, scp_sample_path, tmp_path,
                                                                capsys):
    texts = load_scp_chunks(scp_sample_path)
    docs = {f"doc-{i:03d}": t for i, t in enumerate(texts)}
    corpus = tmp_path / "corpus.jsonl"

    def write(d: dict[str, str]) -> None:
        corpus.write_text("".join(json.dumps({"id": k, "body": v}) + "\n" for k, v in d.items()))

    write(docs)
    s = _settings(corpus, model_dir, tmp_path / "db", text_field="body", chunk_tokens=48, overlap=8)
    first = run_index(s)
    before = _rows(s.table_uri)
    assert first.rows == first.chunks_read == len(before) > 900  # 48-token windows: several per document
    by_doc: dict[str, set[str]] = {}
    for cid, r in before.items():
        by_doc.setdefault(r["doc_id"], set()).add(cid)
    assert set(by_doc) == set(docs)

    ids = sorted(docs)
    appended, shortened, deleted = ids[10:15], ids[20:25], ids[40:45]
    new_docs = {k: v for k, v in docs.items() if k not in deleted}
    for k in appended:
        new_docs[k] = docs[k] + " A sentence added later changes only the end of this document."
    for k in shortened:
        new_docs[k] = docs[k][:60]  # one chunk left: the others become stale
    write(new_docs)

    second = run_index(s)  # without delete_missing: the deleted documents' rows stay
    after = _rows(s.table_uri)
    assert second.rows == len(after)  # one row an id: a plan with changed chunks upserts
    untouched = [c for c in before if before[c]["doc_id"] not in set(appended) | set(shortened)]
    assert all(after[c] == before[c] for c in untouched)  # not rewritten: same hash, same indexed_at
    changed = {c for c in after if c not in before or after[c]["content_hash"] != before[c]["content_hash"]}
    assert changed and {after[c]["doc_id"] for c in changed} <= set(appended) | set(shortened)
    assert second.compressed == len(changed) and second.skipped == second.chunks_read - len(changed)
    for k in shortened:
        assert {c for c in after if after[c]["doc_id"] == k} == {f"{k}::0"}
    stale = sum(len(by_doc[k]) - 1 for k in shortened)
    assert second.deleted == stale
    assert all(c in after for k in deleted for c in by_doc[k])

    third = run_index(IndexSettings(**{**s.__dict__, "delete_missing": True}))
    final = _rows(s.table_uri)
    assert third.compressed == 0 and third.deleted == sum(len(by_doc[k]) for k in deleted)
    assert {r["doc_id"] for r in final.values()} == set(new_docs)
    assert {c: r for c, r in final.items()} == {c: r for c, r in after.items() if r["doc_id"] not in deleted}

    # versions and rollback, through the job's CLI (and `clara index`)
    assert main(["versions", "--table-uri", str(s.table_uri)]) == 0
    listed = [int(line.split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert third.version in listed and second.version in listed
    from pipelines.cli import main as clara_main

    assert clara_main(["index", "rollback", str(second.version), "--table-uri", str(s.table_uri)]) == 0
    assert f"restored version {second.version}" in capsys.readouterr().out
    assert _rows(s.table_uri) == after  # the deleted documents are back


def test_crash_part_way_then_rerun_gives_one_row_per_chunk(ray_session, model_dir, scp_sample_path, tmp_path,
                                                           monkeypatch):
    from pipelines.faults import ENV

    s = _settings(scp_sample_path, model_dir, tmp_path / "db", format="scp", commit_rows=64)

    def no_upsert(self, rows):  # every plan below has only new chunks: the writer appends them, never upserts
        raise AssertionError("a plan of new chunks upserted")

    monkeypatch.setattr(ChunkStore, "upsert", no_upsert)
    # the driver dies right after its third commit: exactly those rows are in the table
    monkeypatch.setenv(ENV, "index.crash_after_commits=3")
    with pytest.raises(IndexJobError, match="injected crash after 3 commits") as crash:
        run_index(s)
    store = ChunkStore.open(s.table_uri, None, create=False)
    assert 3 * 64 <= crash.value.written < 900
    assert store.count() == crash.value.written and store.version == crash.value.version

    # a worker fails part-way: the job stops with a clear error, what was committed stays
    monkeypatch.setenv(ENV, "index.fail_after_batches=2")
    with pytest.raises(IndexJobError, match="injected failure after 2 batches"):
        run_index(IndexSettings(**{**s.__dict__, "actors": 1}))
    monkeypatch.delenv(ENV)
    store.refresh()
    partial = store.count()
    assert crash.value.written <= partial < 900

    resumed = run_index(s)
    assert (resumed.skipped, resumed.compressed, resumed.rows) == (partial, 900 - partial, 900)
    store.refresh()
    ids = store.table.to_arrow().column("chunk_id").to_pylist()
    assert len(ids) == len(set(ids)) == 900 and store.version == resumed.version


def test_the_key_sample_is_the_same_bottom_n_however_the_rows_are_split():
    from pipelines.index import _sample_rows, hash_sample

    ids = [f"doc{i}::{i % 3}" for i in range(5000)]
    kept = hash_sample(ids, 300, seed=7)
    assert len(kept) == len(set(kept.tolist())) == 300
    assert [ids[i] for i in kept] == sorted(ids[i] for i in kept)  # in id order
    shuffled = list(reversed(ids))
    assert {shuffled[i] for i in hash_sample(shuffled, 300, seed=7)} == {ids[i] for i in kept}
    assert {ids[i] for i in hash_sample(ids, 300, seed=8)} != {ids[i] for i in kept}  # the seed matters
    # the workers' filter keeps a superset, however the rows are split into blocks
    table = pa.table({"chunk_id": ids, "text": ids})
    fraction = (300 + 4 * 300**0.5 + 16) / 5000
    whole = set(_sample_rows(table, fraction, 7).column("chunk_id").to_pylist())
    parts = {c for k in range(0, 5000, 700) for c in _sample_rows(table.slice(k, 700), fraction, 7)
             .column("chunk_id").to_pylist()}
    assert whole == parts and {ids[i] for i in kept} <= whole and 300 < len(whole) < 420
    assert _sample_rows(table.slice(0, 0), fraction, 7).num_rows == 0


def test_int8_index_round_trip_within_bound(ray_session, model_dir, scp_sample_path, tmp_path, make_model):
    s = _settings(scp_sample_path, model_dir, tmp_path / "db", format="scp", dtype="int8", limit=200, actors=1)
    summary = run_index(s)
    assert summary.rows == 200
    store = ChunkStore.open(s.table_uri, None, create=False)
    assert store.settings.dtype == "int8"
    rows = _rows(s.table_uri)
    ids = sorted(rows)
    ref = make_model().compress([rows[i]["text"] for i in ids]).numpy()  # (200, 16, 128)
    got = store.get_memory(ids)
    tok_max = np.abs(ref).max(-1, keepdims=True)  # (200, 16, 1)
    assert np.all(np.abs(got - ref) <= tok_max / 254 + BATCH_NOISE * tok_max)
    cos = np.sum(got * ref, axis=(1, 2)) / (np.linalg.norm(got, axis=(1, 2)) * np.linalg.norm(ref, axis=(1, 2)))
    assert cos.min() > 0.9999


def test_help_explains_the_flags(capsys):
    out = subprocess.run([sys.executable, "-m", "pipelines.index", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    for flag in ("--corpus", "--format", "--model", "--table-uri", "--chunk-tokens", "--actors",
                 "--num-gpus-per-actor", "--dtype", "--key-dim", "--delete-missing", "--max-delete-fraction",
                 "--ann-index", "--limit", "--reader", "--debug", "versions", "rollback", "cleanup"):
        assert flag in out.stdout
    cleanup = subprocess.run([sys.executable, "-m", "pipelines.index", "cleanup", "--help"], capture_output=True,
                             text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert "--older-than-days" in cleanup.stdout and "--keep-tags" in cleanup.stdout
    assert "--cleanup-older-than-days" in out.stdout
    assert main(["--corpus", "x", "--model", "m", "--table-uri", "t", "--delete-missing", "--limit", "3"]) == 2
    assert "delete_missing with limit" in capsys.readouterr().err
    assert main(["--corpus", "x", "--model", "m", "--table-uri", "t", "--keep-tags", "3"]) == 2
    assert "keep_tags applies to the cleanup" in capsys.readouterr().err
    assert main(["--corpus", "x", "--model", "m", "--table-uri", "t", "--max-delete-fraction", "1.5"]) == 2
    assert "max_delete_fraction must be within [0, 1], got 1.5" in capsys.readouterr().err
    assert main(["--corpus", "x", "--model", "m", "--table-uri", "t", "--cleanup-older-than-days", "nan"]) == 2
    assert "finite" in capsys.readouterr().err


@pytest.mark.parametrize("content, where, field, words", [
    (b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "\xff\xfe"}\n', 2, "<line>", "is not UTF-8: byte 0xff"),
    (b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "lone \\ud800"}\n', 2, "text", "unpaired surrogate \\ud800"),
    (b"", 1, "<file>", "holds no records"),
])
def test_bad_corpus_is_one_line_naming_file_line_and_field_and_exit_2(model_dir, tmp_path, capsys, content, where,
                                                                      field, words):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_bytes(content)
    args = ["--corpus", str(corpus), "--model", str(model_dir), "--table-uri", str(tmp_path / "db")]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"clara index: {corpus}:{where}: field {field!r}: ") and words in err
    with pytest.raises(DocumentError, match=f"{corpus.name}:{where}: field"):  # the traceback, on request
        main([*args, "--debug"])
    with pytest.raises(IndexNotFoundError):  # nothing was created
        ChunkStore.open(tmp_path / "db", None, create=False)


def test_truncated_corpus_with_delete_missing_is_refused_unless_allowed(ray_session, model_dir, scp_sample_path,
                                                                         tmp_path, capsys):
    """The incident: a scheduled reindex with --delete-missing met a truncated corpus and emptied the index."""
    texts = load_scp_chunks(scp_sample_path)[:40]
    corpus, table = tmp_path / "corpus.jsonl", tmp_path / "db"

    def write(n: int) -> None:
        lines = [json.dumps({"id": f"doc-{i:02d}", "text": t}) + "\n" for i, t in enumerate(texts[:n])]
        corpus.write_text("".join(lines))

    write(40)
    first = run_index(_settings(corpus, model_dir, table, actors=1, commit_rows=32))
    assert first.rows > 80 and first.commits >= 3 and first.tag == f"index-v{first.version}"
    capsys.readouterr()  # Ray Data's progress lines
    rows = _rows(table)
    kept = sum(1 for r in rows.values() if r["doc_id"] in {"doc-00", "doc-01", "doc-02"})

    write(3)  # the truncated export
    args = ["--corpus", str(corpus), "--model", str(model_dir), "--table-uri", str(table), "--delete-missing"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"clara index: refusing to delete {first.rows - kept} of the "
                                               f"table's {first.rows} rows (")
    assert "more than --max-delete-fraction 0.1 allows" in err[0]
    assert "37 documents that are not in the corpus" in err[0]
    assert re.search(r"rerun with --max-delete-fraction 0\.\d+ \(or 1\)$", err[0])
    store = ChunkStore.open(table, None, create=False)
    assert store.count() == first.rows and store.version == first.version and _rows(table) == rows

    assert main([*args, "--max-delete-fraction", "1", "--json"]) == 0  # the override
    summary = json.loads(capsys.readouterr().out)
    assert (summary["deleted"], summary["rows"], summary["compressed"]) == (first.rows - kept, kept, 0)
    assert summary["tag"] == f"index-v{summary['version']}"

    # every run's last version is tagged; cleanup drops the untagged commits between them, keeps the rest
    listed = {v["version"]: v["tags"] for v in list_versions(str(table))}
    assert listed[first.version] == [first.tag] and listed[summary["version"]] == [summary["tag"]]
    assert len(listed) > 3
    assert main(["cleanup", "--table-uri", str(table), "--older-than-days", "0"]) == 0
    assert "versions left: [" in capsys.readouterr().out
    assert [v["version"] for v in list_versions(str(table))] == [first.version, summary["version"]]
    assert main(["rollback", str(first.version), "--table-uri", str(table)]) == 0  # a kept version restores
    assert f"tagged rollback-v{summary['version'] + 1}" in capsys.readouterr().out and _rows(table) == rows
    assert main(["rollback", "2", "--table-uri", str(table)]) == 2  # removed by the cleanup
    assert "version 2 is not in the table's history" in capsys.readouterr().err

    # a scheduled run can clean up too; --keep-tags 1 drops the older job tags, so only the newest run stays
    assert main([*args, "--max-delete-fraction", "1", "--cleanup-older-than-days", "0", "--keep-tags", "1",
                 "--json"]) == 0
    last = json.loads(capsys.readouterr().out)
    assert last["compressed"] == 0 and last["rows"] == kept and "dropped tags index-v" in last["cleanup"]
    assert [(v["version"], v["tags"]) for v in list_versions(str(table))] == [(last["version"], [last["tag"]])]


@pytest.fixture
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 with an empty bucket: ``(endpoint, bucket, client)``."""
    pytest.importorskip("moto.server")
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
    client.create_bucket(Bucket="clara-index")
    try:
        yield endpoint, "clara-index", client
    finally:
        server.stop()


def test_index_into_an_object_store_table(ray_session, model_dir, scp_sample_path, s3_server, tmp_path):
    """The table on an S3 URI (a local S3 server): written, rerun idempotently, versions listed, searched."""
    endpoint, bucket, client = s3_server
    options = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "aws_endpoint": endpoint,
               "aws_region": "us-east-1", "allow_http": "true"}
    texts = load_scp_chunks(scp_sample_path)[:60]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    uri = f"s3://{bucket}/clara/index"
    s = _settings(corpus, model_dir, uri, storage_options=options, commit_rows=32)
    first = run_index(s)
    assert first.rows == first.compressed == first.chunks_read >= 60 and first.commits >= 2
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="clara/index/")["Contents"]]
    assert any(k.endswith(".lance") for k in keys)  # the table's files are in the bucket

    again = run_index(s)
    assert (again.compressed, again.skipped, again.rows, again.version) == (0, first.rows, first.rows, first.version)
    versions = list_versions(uri, storage_options=options)
    assert versions[-1]["version"] == first.version and len(versions) >= first.commits
    store = ChunkStore.open(uri, None, create=False, storage_options=options)
    ids = sorted(store.table.to_arrow().column("chunk_id").to_pylist())[:3]
    found = store.search(store.get_memory(ids), k=1)
    assert [r.chunk_ids[0] for r in found] == ids  # each chunk's own memory finds it


def test_fault_injection_is_read_from_the_environment_only(monkeypatch):
    from pipelines import faults
    from pipelines.index import build_parser

    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.injected("index") == {} and faults.injected("train") == {}
    monkeypatch.setenv(faults.ENV, "index.crash_after_commits=3, train.fail_at_step=5")
    assert faults.injected("index") == {"crash_after_commits": 3}
    assert faults.injected("train") == {"fail_at_step": 5, "fail_rank": -1}
    for bad, msg in (("index.crash_after_commit=3", "is not one of"), ("train.fail_at_step=x", "integer")):
        monkeypatch.setenv(faults.ENV, bad)
        with pytest.raises(ValueError, match=msg):
            faults.injected("index")
    # no product flag or setting carries a fault
    help_text = build_parser().format_help()
    assert "--fail-after-batches" not in help_text and "--crash-after-commits" not in help_text
    assert not {"fail_after_batches", "crash_after_commits"} & set(IndexSettings.__dataclass_fields__)


# --------------------------------------------------------------------------------------------
# --reader ray-data: Ray Data's readers, chunking and the diff on the workers


def _write_corpus(path: Path, docs: dict[str, str], kind: str) -> Path:
    """``docs`` as a JSONL file, a Parquet file, or a directory of .txt files (ids are the file paths)."""
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(docs), "text": list(docs.values())}), path)
    else:
        for k, v in docs.items():
            (path / f"{k}.txt").parent.mkdir(parents=True, exist_ok=True)
            (path / f"{k}.txt").write_text(v)
    return path


# .txt goes through read_binary_files as JSONL does; the planner's equivalence for each kind is also checked
# without Ray in tests/clara/test_indexing.py
@pytest.mark.parametrize("kind", ["jsonl", "parquet", pytest.param("txt", marks=pytest.mark.slow)])
def test_ray_data_reader_plans_the_same_chunks_as_the_driver(ray_session, model_dir, scp_sample_path, tmp_path,
                                                             kind):
    """A table built by the driver's reader is complete for the Ray Data reader (same ids, same hashes: nothing
    compressed), and for JSONL a table built by Ray Data alone has the very rows the driver's has."""
    texts = load_scp_chunks(scp_sample_path)[:50]
    docs = {(f"sub/d{i:02d}" if kind == "txt" and i % 2 else f"d{i:02d}"): t + " " + t for i, t in enumerate(texts)}
    name = {"jsonl": "docs.jsonl", "parquet": "docs.parquet", "txt": "docs"}[kind]
    corpus = _write_corpus(tmp_path / name, docs, kind)
    driver = _settings(corpus, model_dir, tmp_path / "db", chunk_tokens=48, reader="driver")
    built = run_index(driver)
    assert built.chunks_read > len(docs)  # several windows a document
    again = run_index(IndexSettings(**{**driver.__dict__, "reader": "ray-data"}))
    assert (again.chunks_read, again.docs, again.skipped, again.compressed, again.deleted) == (
        built.chunks_read, len(docs), built.chunks_read, 0, 0)
    if kind == "jsonl":
        streamed = run_index(IndexSettings(**{**driver.__dict__, "reader": "ray-data",
                                              "table_uri": str(tmp_path / "db2")}))
        assert streamed.compressed == built.compressed
        drop = ("indexed_at",)
        assert ({c: {k: v for k, v in r.items() if k not in drop} for c, r in _rows(tmp_path / "db2").items()}
                == {c: {k: v for k, v in r.items() if k not in drop} for c, r in _rows(tmp_path / "db").items()})


def test_ray_data_reader_streams_one_big_file_to_the_writer_in_call_sized_blocks(ray_session, model_dir,
                                                                                  scp_sample_path, tmp_path):
    """A corpus of one JSONL file is one planned block; Ray Data would hand back a task's compressed rows as
    one block of up to 128 MiB, written in one burst at the end. The job sizes blocks to a compressor call
    (or half a commit), so commits follow compression: here one commit per ~32 rows, not one for the run."""
    texts = load_scp_chunks(scp_sample_path)[:120]
    corpus = _write_corpus(tmp_path / "one.jsonl", {f"d{i:03d}": t for i, t in enumerate(texts)}, "jsonl")
    s = _settings(corpus, model_dir, tmp_path / "db", reader="ray-data", batch_size=8, commit_rows=32)
    summary = run_index(s)
    assert summary.compressed == summary.rows >= 120
    assert summary.commits >= max(3, summary.compressed // 64), summary  # the job before: 1 commit


def test_ray_data_reader_updates_exactly_the_changed_rows(ray_session, model_dir, scp_sample_path, tmp_path):
    """Edited, shortened and removed documents through the streamed plan: only their rows are touched, stale
    positions go, --delete-missing removes the gone documents (behind the deletion guard), scp duplicates
    are compressed once."""
    texts = load_scp_chunks(scp_sample_path)[:150]
    docs = {f"doc-{i:03d}": t for i, t in enumerate(texts)}
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus, docs, "jsonl")
    s = _settings(corpus, model_dir, tmp_path / "db", chunk_tokens=32, reader="ray-data", commit_rows=512)
    first = run_index(s)
    before = _rows(s.table_uri)
    assert first.rows == first.compressed == len(before) > 150 and first.docs == 150

    ids = sorted(docs)
    edited, shortened, deleted = ids[10:13], ids[20:23], ids[142:]  # the deleted ones: 8 of 150, in a later batch
    new_docs = {k: v for k, v in docs.items() if k not in deleted}
    for k in edited:
        new_docs[k] = "A new first sentence. " + docs[k]
    for k in shortened:
        new_docs[k] = docs[k][:40]
    _write_corpus(corpus, new_docs, "jsonl")
    second = run_index(s)
    after = _rows(s.table_uri)
    assert second.rows == len(after)  # one row an id: a plan with changed chunks upserts
    changed = {c for c in after if c not in before or after[c]["content_hash"] != before[c]["content_hash"]}
    assert {after[c]["doc_id"] for c in changed} == set(edited) | set(shortened)
    assert second.compressed == len(changed) and second.skipped == second.chunks_read - len(changed)
    assert all(after[c] == before[c] for c in before if before[c]["doc_id"] not in set(edited) | set(shortened))
    for k in shortened:
        assert {c for c in after if after[c]["doc_id"] == k} == {f"{k}::0"}
    assert second.deleted == sum(1 for c in before if before[c]["doc_id"] in shortened) - len(shortened)

    gone = sum(1 for r in after.values() if r["doc_id"] in deleted)
    with pytest.raises(DeletionGuardError, match=f"refusing to delete {gone} of"):
        run_index(IndexSettings(**{**s.__dict__, "delete_missing": True, "max_delete_fraction": 0.01}))
    assert _rows(s.table_uri) == after  # refused before anything was written
    third = run_index(IndexSettings(**{**s.__dict__, "delete_missing": True}))
    assert third.compressed == 0 and third.deleted == gone
    assert {r["doc_id"] for r in _rows(s.table_uri).values()} == set(new_docs)

    # stage-1 records repeat their chunk once per record, in one file or two: each chunk is compressed once
    scp = tmp_path / "scp"
    scp.mkdir()
    lines = scp_sample_path.read_text().splitlines()[:20]
    (scp / "a.jsonl").write_text("\n".join(lines + lines[:3]) + "\n")
    (scp / "b.jsonl").write_text("\n".join(lines[10:]) + "\n")
    ran = run_index(_settings(scp, model_dir, tmp_path / "scp-db", format="scp", reader="ray-data"))
    assert ran.compressed == ran.rows == ran.docs == ran.chunks_read == len(set(load_scp_chunks(scp / "a.jsonl")))


def test_ray_data_reader_bad_records_name_file_line_and_field(ray_session, model_dir, tmp_path, capsys):
    """One line naming the file, the line and the field, exit status 2, nothing created; an id in two files
    (two planner batches) names both records."""
    corpus = tmp_path / "docs"
    corpus.mkdir()
    rows = [{"id": f"d{i}", "text": f"document number {i}"} for i in range(400)]

    def write() -> None:
        for part in range(2):
            (corpus / f"part-{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[200 * part:][:200]))

    rows[333] = {"id": "d333", "body": "the text under another name"}
    write()
    args = ["--corpus", str(corpus), "--model", str(model_dir), "--table-uri", str(tmp_path / "db"),
            "--reader", "ray-data", "--actors", "1", "--num-cpus-per-actor", "0.5"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"clara index: {corpus}/part-1.jsonl:134: field 'text': missing"), err
    rows[333] = {"id": "d7", "text": "a second document with the id of the eighth"}
    write()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clara index: {corpus}/part-1.jsonl:134: field 'id': duplicate id 'd7' (first seen at "
                          f"{corpus}/part-0.jsonl:8)"), err
    with pytest.raises(IndexNotFoundError):
        ChunkStore.open(tmp_path / "db", None, create=False)


def test_ray_data_reader_reads_a_corpus_prefix_in_an_object_store_into_one_shard(ray_session, model_dir,
                                                                                  scp_sample_path, s3_server):
    """A corpus of two JSONL files under an S3 prefix (a local S3 server), read by Ray Data (the default for a
    URI) into shard 1 of 2 of a table in the same bucket: exactly that shard's documents, rerun idempotent."""
    from clara.index.schema import shard_of, shard_table

    endpoint, bucket, client = s3_server
    options = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "aws_endpoint": endpoint,
               "aws_region": "us-east-1", "allow_http": "true"}
    texts = load_scp_chunks(scp_sample_path)[:80]
    for part in range(2):
        body = "".join(json.dumps({"id": f"p{part}-{i}", "text": t}) + "\n" for i, t in enumerate(texts[part::2]))
        client.put_object(Bucket=bucket, Key=f"corpus/part-{part}.jsonl", Body=body.encode())
    client.put_object(Bucket=bucket, Key="corpus/README.md", Body=b"not a corpus file")
    ids = [f"p{part}-{i}" for part in range(2) for i in range(len(texts[part::2]))]
    mine = {d for d in ids if shard_of(d, 2) == 1}
    uri = f"s3://{bucket}/clara/index"
    s = _settings(f"s3://{bucket}/corpus/", model_dir, uri, storage_options=options, shards=2, shard=1)
    first = run_index(s)
    assert first.docs == len(mine) and first.rows == first.compressed == first.chunks_read >= len(mine)
    store = ChunkStore.open(uri, None, table=shard_table("chunks", 1, 2), create=False, storage_options=options)
    assert set(store.table.to_arrow().column("doc_id").to_pylist()) == mine
    again = run_index(s)
    assert (again.compressed, again.skipped, again.version) == (0, first.rows, first.version)


def test_manifest_subcommand_lists_publishes_rolls_back_and_prunes(tmp_path, capsys):
    from clara.index.schema import StoreSettings, shard_table
    from clara.index.shards import ShardedStore, read_manifests

    st = StoreSettings(n_mem=2, d=8, compressor_version="v1", dtype="float32", key_dim=8, model="tiny")
    rng = np.random.default_rng(0)
    shards = [ChunkStore.open(tmp_path, st, table=shard_table("chunks", i, 2)) for i in range(2)]
    for i, shard in enumerate(shards):
        shard.upsert([{"chunk_id": f"s{i}-{j}", "doc_id": f"d{i}-{j}", "position": 0, "text": "t",
                       "memory": rng.standard_normal((2, 8)).astype(np.float32)} for j in range(3)])
    where = ["--table-uri", str(tmp_path), "--shards", "2"]
    assert main(["manifest", "list", *where]) == 0
    assert "no manifest published" in capsys.readouterr().out
    assert main(["manifest", "publish", *where, "--note", "first"]) == 0
    assert "published manifest 1" in capsys.readouterr().out
    shards[1].upsert([{"chunk_id": "s1-new", "doc_id": "d1-new", "position": 0, "text": "t",
                       "memory": rng.standard_normal((2, 8)).astype(np.float32)}])
    assert ShardedStore.open(tmp_path, "chunks", 2).count() == 6  # pinned to manifest 1
    assert main(["manifest", "publish", *where]) == 0 and ShardedStore.open(tmp_path, "chunks", 2).count() == 7
    assert main(["manifest", "rollback", "1", *where]) == 0
    assert ShardedStore.open(tmp_path, "chunks", 2).count() == 6
    capsys.readouterr()
    assert main(["manifest", "list", *where]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in listed] == ["1", "2", "3"] and "rollback to manifest 1" in listed[2]
    assert main(["manifest", "rollback", "9", *where]) == 2 and "no manifest 9" in capsys.readouterr().err
    assert main(["manifest", "rollback", *where]) == 2 and "manifest id" in capsys.readouterr().err
    assert main(["manifest", "publish", "--table-uri", str(tmp_path), "--shards", "3"]) == 2
    assert "2 shards, not 3" in capsys.readouterr().err
    assert main(["manifest", "publish", "--table-uri", str(tmp_path)]) == 2 and "--shards" in capsys.readouterr().err
    assert main(["manifest", "prune", *where, "--keep", "2"]) == 0 and "[1]" in capsys.readouterr().out
    assert [m.manifest_id for m in read_manifests(tmp_path, "chunks")] == [2, 3]
