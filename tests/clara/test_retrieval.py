"""clara.index.retrieve without Ray: the served retriever against the library's search, index refresh,
compressor checks, and batched answering of mixed backgrounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clara.index.retrieve import Retrieved, Retriever, check_index, generate_answers
from clara.index.schema import IndexMismatchError, StoreSettings
from clara.index.store import ChunkStore


@pytest.fixture(scope="module")
def corpus(scp_records) -> list[str]:
    return list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:24]


@pytest.fixture
def indexed(make_model, corpus, tmp_path):
    """A model and a 24-chunk float16 index of its compressor: ``(model, store)``."""
    model = make_model()
    settings = StoreSettings(n_mem=model.config.n_mem, d=model.hidden_size,
                             compressor_version=model.compressor_version(), key_dim=32)
    store = ChunkStore.open(tmp_path / "db", settings)
    rows = [{"chunk_id": f"d{i}::0", "doc_id": f"d{i}", "position": 0, "text": t} for i, t in enumerate(corpus)]
    store.upsert([{**r, "memory": m} for r, m in zip(rows, model.compress(corpus))])
    return model, store


def test_retrieve_is_the_library_search(indexed, scp_records):
    model, store = indexed
    retriever = Retriever(model, store, candidates=24)
    questions = [ex.question for ex in scp_records[:4]]
    got = retriever.retrieve(questions, k=5)
    want = store.search(model.encode_query(questions), k=5, candidates=24)
    assert len(got) == 4 and all(isinstance(r, Retrieved) for r in got)
    for g, w in zip(got, want):
        assert g.chunk_ids == w.chunk_ids and g.doc_ids == w.doc_ids and g.texts == w.texts
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-6)
        assert g.memory.dtype == torch.float16 and g.memory.shape == (5, model.config.n_mem, model.hidden_size)
        # float16 storage: the half-precision tensor holds exactly what the store holds
        np.testing.assert_array_equal(g.memory.float().numpy(), w.memory)
        assert g.index_version == store.version and g.batch_size == 4
        tokens = [min(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]), model.config.doc_max_tokens)
                  for t in w.texts]
        assert g.text_tokens == sum(tokens) > 0


def test_k_and_memory_per_question(indexed, scp_records):
    model, store = indexed
    retriever = Retriever(model, store)
    a, b = retriever.retrieve([scp_records[0].question, scp_records[1].question], k=[2, 7], with_memory=[True, False])
    assert len(a) == 2 and a.memory.shape[0] == 2
    assert len(b) == 7 and b.memory is None
    with pytest.raises(ValueError, match="k must be positive"):
        retriever.retrieve(["q"], k=0)


def test_memory_of_and_compress(indexed, corpus):
    model, store = indexed
    retriever = Retriever(model, store)
    mem = retriever.memory_of(["d3::0"])
    np.testing.assert_array_equal(mem.float().numpy(), store.get_memory(["d3::0"]))
    with pytest.raises(KeyError, match="missing"):
        retriever.memory_of(["missing"])
    fresh = retriever.compress([corpus[3]])
    assert torch.allclose(fresh.float(), mem.float(), atol=2e-3 * float(fresh.abs().max()))


def test_new_index_version_is_picked_up(indexed, corpus):
    model, store = indexed
    now = [0.0]
    retriever = Retriever(model, ChunkStore.open(store.uri, None, create=False), refresh_interval_s=10.0,
                          clock=lambda: now[0])
    v0 = retriever.version
    extra = "A new chunk about lighthouses on the northern coast."
    store.upsert([{"chunk_id": "new::0", "doc_id": "new", "position": 0, "text": extra,
                   "memory": model.compress([extra])[0]}])  # written through another handle
    assert retriever.refresh() == v0  # inside the interval: not checked yet
    with pytest.raises(KeyError):
        retriever.memory_of(["new::0"])
    now[0] = 10.0
    assert retriever.memory_of(["new::0"]).shape[0] == 1  # the interval passed: the next call refreshed
    assert retriever.version > v0
    manual = Retriever(model, ChunkStore.open(store.uri, None, create=False), refresh_interval_s=None)
    store.delete_chunks(["new::0"])
    assert manual.refresh() < store.version  # never on its own
    assert manual.refresh(force=True) == store.version


def test_another_compressor_is_refused(indexed, make_model):
    _, store = indexed
    other = make_model(seed=1)
    with pytest.raises(IndexMismatchError, match="compressor_version"):
        Retriever(other, store)
    with pytest.raises(IndexMismatchError, match="memory shape"):
        check_index(make_model(compression_rate=8), store.settings)
    with pytest.raises(ValueError):
        Retriever(indexed[0], store, candidates=0)


def test_generate_answers_groups_mixed_backgrounds(indexed, corpus, scp_records):
    model, store = indexed
    qs = [ex.question for ex in scp_records[:5]]
    mem = torch.from_numpy(store.get_memory([f"d{i}::0" for i in range(6)]))  # (6, M, D)
    backgrounds = [mem[0:2], [corpus[0], corpus[1]], mem[2:5], mem[4:6], [corpus[2]]]
    got = generate_answers(model, qs, backgrounds, max_new_tokens=6)
    k2 = model.generate([qs[0], qs[3]], torch.stack([mem[0:2], mem[4:6]]), max_new_tokens=6)
    k3 = model.generate([qs[2]], mem[2:5].unsqueeze(0), max_new_tokens=6)
    text = model.generate_from_text([qs[1], qs[4]], [[corpus[0], corpus[1]], [corpus[2]]], max_new_tokens=6)
    assert got == [k2[0], text[0], k3[0], k2[1], text[1]]
    with pytest.raises(ValueError, match="backgrounds"):
        generate_answers(model, qs, backgrounds[:2])
    with pytest.raises(ValueError, match=r"\[k, n_mem, d\]"):
        generate_answers(model, qs[:1], [mem[0]])


def _rebuild(uri, model, texts) -> ChunkStore:
    """Drop the chunk table and build it again from ``texts`` with ``model``'s compressor (a re-index)."""
    import lancedb

    db = lancedb.connect(str(uri))
    if "chunks" in db.table_names():
        db.drop_table("chunks")
    settings = StoreSettings(n_mem=model.config.n_mem, d=model.hidden_size,
                             compressor_version=model.compressor_version(), key_dim=32)
    store = ChunkStore.open(uri, settings)
    store.upsert([{"chunk_id": f"r{i}::0", "doc_id": f"r{i}", "position": 0, "text": t, "memory": m}
                  for i, (t, m) in enumerate(zip(texts, model.compress(texts)))])
    return store


def test_rebuilt_dropped_and_restored_tables_are_followed(indexed, corpus, make_model, scp_records):
    """The table is dropped and rebuilt under a running retriever (a re-index with a new compressor),
    then restored: every state is served or refused with the right error, never a stale handle."""
    from clara.index.retrieve import IndexEmptyError, IndexUnavailableError

    model, store = indexed
    retriever = Retriever.open(model, store.uri, refresh_interval_s=0)
    q = [scp_records[0].question]
    assert len(retriever.retrieve(q, k=3)[0]) == 3 and retriever.health()["rows"] == 24

    _rebuild(store.uri, model, corpus[:10])  # same compressor, new table: served at once
    got = retriever.retrieve(q, k=3)[0]
    assert all(c.startswith("r") for c in got.chunk_ids) and retriever.health()["rows"] == 10

    import lancedb

    lancedb.connect(str(store.uri)).drop_table("chunks")  # gone: a clear, transient error
    with pytest.raises(IndexUnavailableError, match="cannot be opened"):
        retriever.retrieve(q, k=3)
    with pytest.raises(IndexUnavailableError):
        retriever.health()

    _rebuild(store.uri, make_model(seed=1), corpus[:10])  # rebuilt by another compressor: refused
    with pytest.raises(IndexMismatchError, match="compressor_version"):
        retriever.retrieve(q, k=3)
    with pytest.raises(IndexMismatchError):
        retriever.health()

    _rebuild(store.uri, model, corpus)  # restored: served again, no new Retriever needed
    assert len(retriever.retrieve(q, k=3)[0]) == 3 and retriever.health()["rows"] == 24

    ChunkStore.open(store.uri, None, create=False).delete_chunks([f"r{i}::0" for i in range(24)])
    with pytest.raises(IndexEmptyError, match="holds no chunks"):
        retriever.retrieve(q, k=3)
    with pytest.raises(IndexEmptyError):
        retriever.health()
