"""Deriving stage-2/3 records from stage-1 records: BM25, distractors, split by chunk."""

import json

import pytest

from clara.data.derive import BM25, DeriveSettings, derive_records, split_by_chunk, tokenize
from clara.data.records import Example, parse_record


def test_bm25_ranks_the_document_that_shares_rare_terms_first():
    docs = ["the cat sat on the mat", "dogs chase the cat", "quantum chromodynamics of quarks", "the the the"]
    bm = BM25(docs)
    assert bm.top("What do quarks obey in chromodynamics?", 2) == [2]  # only doc 2 shares a term
    assert bm.top("the cat", 3)[:2] in ([0, 1], [1, 0])
    assert 0 not in bm.top("the cat", 3, exclude=[0])
    s = bm.scores("cat")
    assert s[1] > s[0] > 0  # same tf, doc 1 is shorter
    assert tokenize("Ünïcode, O'Brien 42!") == ["ünïcode", "o", "brien", "42"]


@pytest.mark.parametrize("stage,k", [("instruct", 5), ("e2e", 20)])
def test_derived_records_parse_and_hold_the_gold_at_pos_index(scp_records, stage, k):
    examples = scp_records[:300]
    records = derive_records(examples, DeriveSettings(stage=stage, seed=3))
    qa = [ex for ex in examples if ex.kind == "qa"]
    assert len(records) == len(qa)
    for rec, ex in zip(records, qa):
        (parsed,) = parse_record(json.loads(json.dumps(rec)), stage, "derived")
        assert len(parsed.chunks) == k and len(set(parsed.chunks)) == k
        assert parsed.chunks[parsed.gold[0]] == ex.chunks[0]  # the question's own chunk is the gold
        assert parsed.question == ex.question and parsed.answer == ex.answer
    # the gold is not always first
    assert len({r["pos_index"][0] for r in records}) > 1
    assert derive_records(examples, DeriveSettings(stage=stage, seed=3)) == records


def test_hard_distractors_come_from_bm25_and_random_ones_do_not(scp_records):
    examples = scp_records[:400]
    hard = derive_records(examples, DeriveSettings(stage="e2e", candidates=5, hard_fraction=1.0))
    rand = derive_records(examples, DeriveSettings(stage="e2e", candidates=5, hard_fraction=0.0))
    chunks = list(dict.fromkeys(ex.chunks[0] for ex in examples))
    bm = BM25(chunks)

    def overlap(records):  # mean BM25 score of the distractors for their question
        tot = n = 0
        for r in records:
            s = bm.scores(r["question"])
            for i, d in enumerate(r["docs"]):
                if i != r["pos_index"][0]:
                    tot, n = tot + s.get(chunks.index(d), 0.0), n + 1
        return tot / n

    assert overlap(hard) > 2 * overlap(rand)
    first = next(ex for ex in examples if ex.kind == "qa")
    gold = chunks.index(first.chunks[0])
    want = {chunks[i] for i in bm.top(first.question, 4, exclude=[gold])}
    assert want == set(hard[0]["docs"]) - {first.chunks[0]}


def test_split_is_by_chunk_never_by_question(scp_records):
    train, held = split_by_chunk(scp_records, 0.2, seed=1)
    assert len(train) + len(held) == len(scp_records) and held
    assert not {ex.chunks[0] for ex in train} & {ex.chunks[0] for ex in held}
    n_chunks = len({ex.chunks[0] for ex in scp_records})
    assert len({ex.chunks[0] for ex in held}) == pytest.approx(0.2 * n_chunks, abs=1)


def test_bad_settings_and_too_small_pools_are_rejected():
    ex = [Example(("only chunk",), "q?", "a")]
    with pytest.raises(ValueError, match="at least 5 distinct chunks"):
        derive_records(ex, DeriveSettings(stage="instruct"))
    with pytest.raises(ValueError, match="stage"):
        DeriveSettings(stage="scp")
    with pytest.raises(ValueError, match="hard_fraction"):
        DeriveSettings(stage="e2e", hard_fraction=1.5)
    with pytest.raises(ValueError, match="no stage-1 QA"):
        derive_records([Example(("c",), "p", "c", kind="paraphrase")], DeriveSettings(stage="e2e"))
