"""A sharded index (several LanceDB tables on disk) reads as the one table that holds the same rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clara.index.schema import IndexMismatchError, StoreSettings, shard_of, shard_table
from clara.index.shards import ShardedStore
from clara.index.store import ChunkStore

N_MEM, D = 4, 16
WORDS = ("granite quarry basalt harbour lighthouse orchard glacier monsoon violin cathedral falcon "
         "copper tundra lagoon meteor saffron").split()


def settings(dtype: str = "float16") -> StoreSettings:
    return StoreSettings(n_mem=N_MEM, d=D, compressor_version="comp-v1", dtype=dtype, key_dim=16, model="tiny")


def memories(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, N_MEM, D)).astype(np.float32)


def worded_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows whose text names two words of WORDS each (row i: words i and i+1, cycled)."""
    mem = memories(n, seed)
    return [{"chunk_id": f"c{i}", "doc_id": f"d{i}", "position": 0, "memory": mem[i],
             "text": f"a note on the {WORDS[i % len(WORDS)]} and the {WORDS[(i + 1) % len(WORDS)]} of row {i}"}
            for i in range(n)]


def test_shard_routing_is_stable_and_spreads_documents():
    assert shard_of("doc-1", 4) == shard_of("doc-1", 4)  # a pure function of the id
    counts = np.bincount([shard_of(f"doc-{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900  # ~1000 each
    assert shard_of("anything", 1) == 0
    assert shard_table("chunks", 1, 4) == "chunks-01of04" and shard_table("chunks", 0, 1) == "chunks"
    with pytest.raises(ValueError):
        shard_table("chunks", 4, 4)


@pytest.fixture
def one_and_sharded(tmp_path):
    """The same 60 rows in one table and, routed by document, in three shard tables (with text indices)."""
    data = worded_rows(60, seed=3)
    for i, r in enumerate(data):
        r["doc_id"] = f"doc-{i // 2}"  # two chunks a document
    single = ChunkStore.open(tmp_path / "db", settings(), table="chunks")
    single.upsert(data)
    single.create_text_index()
    for s in range(3):
        shard = ChunkStore.open(tmp_path / "db", settings(), table=shard_table("chunks", s, 3))
        shard.upsert([r for r in data if shard_of(r["doc_id"], 3) == s])
        shard.create_text_index()
    sharded = ShardedStore.open(tmp_path / "db", "chunks", 3)
    return data, single, sharded


def test_sharded_reads_equal_one_table(one_and_sharded):
    data, single, sharded = one_and_sharded
    assert sharded.count() == single.count() == 60
    assert all(0 < len(s) < 60 for s in sharded.shards)  # sizes follow the hash
    query = memories(5, seed=9)
    for got, want in zip(sharded.exact_search(query, k=7), single.exact_search(query, k=7)):
        assert got.chunk_ids == want.chunk_ids
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
        np.testing.assert_allclose(got.memory, want.memory, atol=1e-6)
    # two-step search: every shard proposes 60 (all its rows) and re-scores exactly: the same top-k
    for got, want in zip(sharded.search(query, k=7, candidates=60), single.search(query, k=7, candidates=60)):
        assert got.chunk_ids == want.chunk_ids
    mem = np.stack([r["memory"] for r in data])
    questions = [WORDS[5], WORDS[9] + " " + WORDS[2]]
    for w in (0.0, 1.0):
        for got, want in zip(sharded.hybrid_search(mem[[7, 30]], questions, k=5, candidates=60, text_weight=w),
                             single.hybrid_search(mem[[7, 30]], questions, k=5, candidates=60, text_weight=w)):
            if w == 0:
                assert got.chunk_ids == want.chunk_ids
            else:  # BM25's term statistics are per shard: its ranks may differ a little from one table's
                assert len(set(got.chunk_ids) & set(want.chunk_ids)) >= 4, (got.chunk_ids, want.chunk_ids)
    ids = ["c59", "c0", "c31"]
    np.testing.assert_allclose(sharded.get_memory(ids), single.get_memory(ids))
    with pytest.raises(KeyError, match="nope"):
        sharded.get_memory(["c1", "nope"])
    assert sharded.has_text_index and sharded.version == sum(s.version for s in sharded.shards)


def test_the_retriever_reads_a_sharded_index(one_and_sharded, make_model, tmp_path):
    """Retriever.open(shards=N) over shards written with a model's compressor = over one table."""
    from clara.index.build import read_compressor_info, store_settings_for
    from clara.index.retrieve import Retriever

    model = make_model()
    model_dir = model.save_pretrained(tmp_path / "model")
    texts = [f"chunk {i} about {WORDS[i % len(WORDS)]} and {WORDS[(i + 3) % len(WORDS)]}" for i in range(24)]
    memory = model.compress(texts).float().numpy()
    st = store_settings_for(read_compressor_info(model_dir))
    rows = [{"chunk_id": f"c{i}", "doc_id": f"d{i}", "position": 0, "text": t, "memory": m}
            for i, (t, m) in enumerate(zip(texts, memory))]
    ChunkStore.open(tmp_path / "idx", st).upsert(rows)
    for s in range(2):
        ChunkStore.open(tmp_path / "idx", st, table=shard_table("chunks", s, 2)).upsert(
            [r for r in rows if shard_of(r["doc_id"], 2) == s])
    one = Retriever.open(model, tmp_path / "idx", candidates=24)
    two = Retriever.open(model, tmp_path / "idx", candidates=24, shards=2)
    questions = ["what about the granite?", "the violin", "a meteor"]
    for a, b in zip(one.retrieve(questions, k=4), two.retrieve(questions, k=4)):
        assert a.chunk_ids == b.chunk_ids and np.allclose(a.scores, b.scores, atol=1e-6)
        assert torch_equal(a.memory, b.memory)
    assert two.describe()["shards"] == 2 and two.describe()["rows"] == 24 and two.describe()["manifest"] is False
    with pytest.raises(ValueError, match="shards"):
        Retriever.open(model, tmp_path / "idx", shards=0)

    # a live Retriever follows manifests: a chunk written after manifest 1 is served from manifest 2 on,
    # and a rollback manifest (manifest 1's versions under a new id) hides it again
    from clara.index.shards import publish_manifest, rollback_manifest

    publish_manifest(tmp_path / "idx", "chunks", 2)
    live = Retriever.open(model, tmp_path / "idx", candidates=25, shards=2, refresh_interval_s=0)
    extra = "a new chunk about the lighthouse keeper's falcon"
    target = shard_of("d-new", 2)
    writer = ChunkStore.open(tmp_path / "idx", None, table=shard_table("chunks", target, 2), create=False)
    writer.upsert([{"chunk_id": "c-new", "doc_id": "d-new", "position": 0, "text": extra,
                    "memory": model.compress([extra]).float().numpy()[0]}])
    ask = [extra]
    (r1,) = live.retrieve(ask, k=25)
    assert r1.index_version == 1 and "c-new" not in r1.chunk_ids and len(r1.chunk_ids) == 24
    publish_manifest(tmp_path / "idx", "chunks", 2, updates={target: writer.version})
    (r2,) = live.retrieve(ask, k=25)
    assert r2.index_version == 2 and "c-new" in r2.chunk_ids
    rollback_manifest(tmp_path / "idx", "chunks", 2, 1)
    (r3,) = live.retrieve(ask, k=25)
    assert r3.index_version == 3 and "c-new" not in r3.chunk_ids
    assert live.describe()["manifest"] is True and live.describe()["rows"] == 24


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_a_retriever_opens_on_an_empty_index_and_says_so(make_model, tmp_path):
    """An empty table (a first index run still to come) opens; retrieval and the health probe say it is
    empty; hybrid on a table without a full-text index is refused, naming what to do."""
    from clara.index.build import read_compressor_info, store_settings_for
    from clara.index.retrieve import IndexEmptyError, Retriever
    from clara.index.schema import TextIndexMissingError

    model = make_model()
    model_dir = model.save_pretrained(tmp_path / "model")
    ChunkStore.open(tmp_path / "idx", store_settings_for(read_compressor_info(model_dir)))
    retriever = Retriever.open(model, tmp_path / "idx")
    with pytest.raises(IndexEmptyError):
        retriever.retrieve(["anything?"], k=3)
    with pytest.raises(IndexEmptyError):
        retriever.health()
    with pytest.raises(TextIndexMissingError, match="index job"):
        retriever.set_retrieval("hybrid")
    assert retriever.retrieval == "latent"


def test_shards_of_other_settings_are_refused(tmp_path):
    ChunkStore.open(tmp_path / "db", settings(), table=shard_table("chunks", 0, 2)).upsert(worded_rows(3))
    ChunkStore.open(tmp_path / "db", settings(dtype="int8"), table=shard_table("chunks", 1, 2)).upsert(
        worded_rows(3))
    with pytest.raises(IndexMismatchError, match="dtype"):
        ShardedStore.open(tmp_path / "db", "chunks", 2)


def test_shards_with_their_own_keys_search_as_one_table(tmp_path):
    """Each shard fits (or not) its own key: a random-key shard and a fitted-key shard open together, and the
    merged search equals one table's exact search (each shard projects the query with its own key)."""
    from clara.index.codec import fit_key_basis

    data = worded_rows(80, seed=5)
    mem = np.stack([r["memory"] for r in data])
    parts = [[r for r in data if shard_of(r["doc_id"], 2) == s] for s in range(2)]
    ChunkStore.open(tmp_path / "db", settings(), table=shard_table("chunks", 0, 2)).upsert(parts[0])
    basis = fit_key_basis(np.stack([r["memory"] for r in parts[1]]), 8)
    fitted = dataclasses.replace(settings(), key_dim=8, key_basis=basis.digest)
    ChunkStore.open(tmp_path / "db", fitted, table=shard_table("chunks", 1, 2), key_basis=basis).upsert(parts[1])
    single = ChunkStore.open(tmp_path / "db", settings(), table="chunks")
    single.upsert(data)
    sharded = ShardedStore.open(tmp_path / "db", "chunks", 2)
    assert sharded.shards[1].key_basis.digest == basis.digest and sharded.shards[0].key_basis is None
    q = mem[:6] + 0.1 * memories(6, seed=9)
    got, want = sharded.search(q, k=5, candidates=80), single.exact_search(q, k=5)
    assert [g.chunk_ids for g in got] == [w.chunk_ids for w in want]


def test_a_manifest_pins_every_shard_until_the_next_is_published(one_and_sharded, tmp_path):
    """Readers see the shard versions of the newest manifest: a shard written after it stays invisible
    (count, search, memory) until a new manifest is published; a rollback manifest serves the old versions
    again; the manifest's versions survive a cleanup that removes everything untagged."""
    import datetime as dt

    from clara.index.shards import (
        ManifestError,
        latest_manifest,
        prune_manifests,
        publish_manifest,
        read_manifests,
        rollback_manifest,
    )

    data, _, unpinned = one_and_sharded
    db = tmp_path / "db"
    assert read_manifests(db, "chunks") == [] and unpinned.manifest is None
    first = publish_manifest(db, "chunks", 3, note="run 1")
    assert first.manifest_id == 1 and first.versions == tuple(s.version for s in unpinned.shards)
    assert first.compressor_version == "comp-v1"
    served = ShardedStore.open(db, "chunks", 3)
    assert served.version == 1 and served.count() == 60

    # a shard job writes shard 0 (three new rows), without publishing: readers do not see it
    new_rows = [r for r in worded_rows(40, seed=8)[30:] if shard_of(f"new-{r['chunk_id']}", 3) == 0][:3]
    for r in new_rows:
        r["chunk_id"], r["doc_id"] = f"new-{r['chunk_id']}", f"new-{r['chunk_id']}"
    writer = ChunkStore.open(db, None, table=shard_table("chunks", 0, 3), create=False)
    writer.upsert(new_rows)
    query = np.stack([r["memory"] for r in new_rows])
    for store in (served, ShardedStore.open(db, "chunks", 3)):  # pinned: an open handle and a fresh one
        assert store.version == 1 and store.count() == 60
        assert not {r["chunk_id"] for r in new_rows} & {c for res in store.exact_search(query, k=3)
                                                         for c in res.chunk_ids}
        with pytest.raises(KeyError):
            store.get_memory([new_rows[0]["chunk_id"]])
    assert ShardedStore.open(db, "chunks", 3, pinned=False).count() == 63  # what the writers see

    second = publish_manifest(db, "chunks", 3, updates={0: writer.version}, note="shard 0")
    assert second.manifest_id == 2 and second.versions == (writer.version, *first.versions[1:])
    assert served.refresh() == 2 and served.count() == 63
    assert [res.chunk_ids[0] for res in served.exact_search(query, k=1)] == [r["chunk_id"] for r in new_rows]

    third = rollback_manifest(db, "chunks", 3, 1)
    assert third.versions == first.versions and "rollback to manifest 1" in third.note
    assert served.refresh() == 3 and served.count() == 60
    # the cleanup keeps every version a manifest names (tagged manifest-<id>) and removes the others
    for shard in unpinned.shards:
        shard.refresh()
        shard.cleanup_versions(dt.timedelta(0))
    assert ShardedStore.open(db, "chunks", 3).count() == 60
    assert [m.manifest_id for m in read_manifests(db, "chunks")] == [1, 2, 3]

    assert prune_manifests(db, "chunks", 3, keep=1) == [1, 2]
    assert [m.manifest_id for m in read_manifests(db, "chunks")] == [3]
    assert not any(t.startswith(("manifest-1", "manifest-2")) for s in unpinned.shards for t in s.tags())
    assert latest_manifest(db, "chunks").manifest_id == 3

    with pytest.raises(ManifestError, match="no version 999"):
        publish_manifest(db, "chunks", 3, updates={1: 999})
    with pytest.raises(ManifestError, match="3 shards, not 2"):
        publish_manifest(db, "chunks", 2)
    with pytest.raises(ManifestError, match="no manifest 7"):
        rollback_manifest(db, "chunks", 3, 7)
    assert latest_manifest(db, "chunks").manifest_id == 3  # nothing written by the refusals
    # a pin that fails part-way (shard 2 has no such version) leaves every shard where it was
    served.refresh()
    before = (served.manifest, served.count(), [sh.version for sh in served.shards])
    broken = dataclasses.replace(served.manifest, manifest_id=99, versions=(writer.version, first.versions[1], 999))
    with pytest.raises(ValueError, match="no version 999"):
        served._pin(broken)
    assert (served.manifest, served.count(), [sh.version for sh in served.shards]) == before


def test_concurrent_publishes_keep_both_tag_sets_and_a_store_opened_early_follows(tmp_path, monkeypatch):
    """Two publishes that took the same id: both rows stay, each with its own tags (neither's versions can be
    cleaned up), the newer is served and the second publisher is told. A reader opened before the first
    manifest existed pins itself on its next refresh."""
    import clara.index.shards as shards_mod
    from clara.index.shards import ManifestError, publish_manifest, read_manifests

    db = tmp_path / "db"
    tables = [ChunkStore.open(db, settings(), table=shard_table("chunks", i, 2)) for i in range(2)]
    for i, t in enumerate(tables):
        t.upsert(worded_rows(4, seed=i))
    early = ShardedStore.open(db, "chunks", 2)
    assert early.manifest is None and early.count() == 8
    first = publish_manifest(db, "chunks", 2)
    # pinned to manifest 1, not shard 0's latest
    tables[0].upsert([{**worded_rows(5, seed=7)[4], "chunk_id": "late", "doc_id": "late"}])
    assert early.refresh() == 1 and early.manifest == first and early.count() == 8

    real = shards_mod.latest_manifest
    monkeypatch.setattr(shards_mod, "latest_manifest", lambda *a, **k: None)  # as if it had not seen manifest 1
    with pytest.raises(ManifestError, match="at the same time"):
        publish_manifest(db, "chunks", 2)
    monkeypatch.setattr(shards_mod, "latest_manifest", real)
    rows = read_manifests(db, "chunks")
    assert [m.manifest_id for m in rows] == [1, 1] and rows[0].tag != rows[1].tag
    for t in tables:
        tags = t.tags()
        assert tags[rows[0].tag] == rows[0].versions[tables.index(t)]
        assert tags[rows[1].tag] == rows[1].versions[tables.index(t)]
    assert early.refresh() == 1 and early.manifest == rows[1] and early.count() == 9  # the newer row is served
