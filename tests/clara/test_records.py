import json

import pytest

from clara.data.records import RecordError, parse_record, read_records, reconstruction_example


def test_sample_reads(scp_records):
    assert len(scp_records) > 7000
    assert all(len(ex.chunks) == 1 and ex.question and ex.answer for ex in scp_records)


def test_stage_formats():
    [p] = parse_record({"data_type": "paraphrase", "answers": ["the same, said again"], "docs": ["a chunk"]}, "scp")
    assert p.kind == "paraphrase" and p.answer == "the same, said again"
    [i] = parse_record({"question": "q", "docs": ["a", "b"], "answer": "x"}, "instruct")
    assert i.chunks == ("a", "b") and i.gold == (0, 1)
    [e] = parse_record({"question": "q", "docs": ["a", "b", "c"], "pos_index": [2], "answer": "x"}, "e2e")
    assert e.gold == (2,)
    assert reconstruction_example("chunk text").answer == "chunk text"


@pytest.mark.parametrize("record,field,msg", [
    ({"data_type": "qa", "question": ["q"], "answers": ["a"], "docs": [""]}, "docs[0]", "empty"),
    ({"data_type": "qa", "question": ["q"], "answers": [3], "docs": ["c"]}, "answers[0]", "must be a string"),
    ({"data_type": "qa", "question": ["q", "r"], "answers": ["a"], "docs": ["c"]}, "answers", "1 answers for 2"),
    ({"data_type": "qa", "question": ["q"], "answers": ["a"], "docs": "c"}, "docs", "must be a list"),
    ({"data_type": "summary", "answers": ["a"], "docs": ["c"]}, "data_type", "qa"),
    ({"question": ["q"], "answers": ["a"]}, "docs", "missing"),
])
def test_bad_scp_records_name_the_field(record, field, msg):
    with pytest.raises(RecordError, match=msg) as err:
        parse_record(record, "scp", "rec 7")
    assert err.value.field == field and err.value.where == "rec 7"


def test_e2e_pos_index_checked():
    with pytest.raises(RecordError, match=r"pos_index\[0\].*out of range"):
        parse_record({"question": "q", "docs": ["a"], "pos_index": [1], "answer": "x"}, "e2e")
    with pytest.raises(RecordError, match="pos_index.*missing"):
        parse_record({"question": "q", "docs": ["a"], "answer": "x"}, "e2e")


def test_file_errors_name_file_and_line(tmp_path):
    good = json.dumps({"data_type": "qa", "question": ["q"], "answers": ["a"], "docs": ["c"]})
    f = tmp_path / "r.jsonl"
    f.write_text(good + "\n\n" + good + "\n{not json\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:4: field '<json>': not valid JSON"):
        read_records(f, "scp")
    f.write_text(good + "\n" + json.dumps({"question": ["q"], "answers": ["a"], "docs": [7]}) + "\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:2: field 'docs\[0\]': must be a string, got int"):
        read_records(f, "scp")
    f.write_text("\n")
    with pytest.raises(RecordError, match="no records"):
        read_records(f, "scp")


@pytest.mark.parametrize("line, where, field, words", [
    (b'{"question": ["q"], "answers": ["a"], "docs": ["na\xefve"]}', 2, "<line>", "is not UTF-8: byte 0xef"),
    (b'{"question": ["q"], "answers": ["a"], "docs": ["lone \\udbff"]}', 2, "docs[0]", "unpaired surrogate \\udbff"),
    (b'{"question": "q \\ud800", "answers": ["a"], "docs": ["c"]}', 2, "question", "unpaired surrogate \\ud800"),
    (b'{"question": ["q"], "answers": ["\\udc80"], "docs": ["c"]}', 2, "answers[0]", "unpaired surrogate \\udc80"),
])
def test_bad_bytes_and_surrogates_name_file_line_and_field(tmp_path, line, where, field, words):
    good = json.dumps({"data_type": "qa", "question": ["q"], "answers": ["a"], "docs": ["c"]}).encode()
    f = tmp_path / "r.jsonl"
    f.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    with pytest.raises(RecordError) as err:
        read_records(f, "scp")
    assert (err.value.where, err.value.field) == (f"{f}:{where}", field) and words in err.value.msg


def test_an_empty_file_names_file_and_line(tmp_path):
    f = tmp_path / "r.jsonl"
    for content in (b"", b"\n \n"):
        f.write_bytes(content)
        with pytest.raises(RecordError, match=r"r\.jsonl:1: field '<file>': holds no records"):
            read_records(f, "instruct")
