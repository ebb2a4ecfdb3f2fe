import json

import pytest

from clara.data.records import Example
from clara.eval.evaluate import EvalSettings, aggregate, evaluate_examples, write_report
from clara.eval.metrics import cover_em, exact_match, token_f1


def test_metrics_on_hand_checked_cases():
    assert exact_match("Yes.", "yes") == 1.0 and exact_match("no", "yes") == 0.0
    assert cover_em("", "Paris") == 0.0 and token_f1("", "Paris") == 0.0
    assert cover_em("It was the Eiffel Tower in Paris", ["London", "Eiffel Tower"]) == 1.0
    assert exact_match("the  Beatles!", ["beatles", "stones"]) == 1.0
    assert token_f1("in 1990 or 1991", "1990") == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))


@pytest.fixture(scope="module")
def examples(scp_records):
    chunks = list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:6]
    out = []
    for ex in scp_records:
        if ex.chunks[0] in chunks and len(out) < 5:
            gold = chunks.index(ex.chunks[0])
            out.append(Example(tuple(chunks), ex.question, ex.answer, (gold,), "e2e"))
    return out


def test_every_figure_is_present_and_in_range(make_model, examples, tmp_path):
    model = make_model()
    settings = EvalSettings(top_k=2, recall_ks=(1, 3, 5), max_new_tokens=4, batch_size=3)
    rows = evaluate_examples(model, examples, settings)
    # 5 retrieval rows + 5 x (compressed 2 settings + text 2 settings + closed-book 1)
    assert len(rows) == 5 + 5 * 5
    report = aggregate(rows, meta={"compression_rate": 4})
    assert report.n == 5
    assert set(report.answers) == {"compressed", "text", "closed_book"}
    for mode, by_setting in report.answers.items():
        assert set(by_setting) == ({"normal"} if mode == "closed_book" else {"normal", "oracle"})
        for m in by_setting.values():
            assert set(m) == {"cover_em", "em", "f1"} and all(0 <= v <= 100 for v in m.values())
    assert list(report.retrieval) == ["recall@1", "recall@3", "recall@5"]
    r = report.retrieval
    assert 0 <= r["recall@1"] <= r["recall@3"] <= r["recall@5"] <= 100
    # the oracle setting always holds the gold chunk: recall among the chosen is complete
    paths = write_report({"rate 4": report}, tmp_path)
    assert json.loads(paths["json"].read_text())["rate 4"]["n"] == 5
    assert "| compressed | oracle |" in paths["markdown"].read_text()
    for key in ("accuracy_plot", "recall_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_custom_ranker_and_oracle_insertion(make_model, examples):
    model = make_model()

    def worst_first(questions, candidates):  # ranks the gold chunk last on purpose
        return [[0.0 if j == ex.gold[0] else 1.0 for j in range(len(c))] for ex, c in zip(examples, candidates)]

    rows = evaluate_examples(model, examples[:2], EvalSettings(modes=("text",), top_k=2, recall_ks=(1, 6),
                                                               max_new_tokens=2), ranker=worst_first)
    report = aggregate(rows)
    assert report.retrieval["recall@1"] == 0.0 and report.retrieval["recall@6"] == 100.0
    assert set(report.answers["text"]) == {"normal", "oracle"}


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown mode"):
        EvalSettings(modes=("telepathy",))
    with pytest.raises(ValueError, match="retrieval"):
        EvalSettings(retrieval="psychic")


def test_hybrid_retrieval_fuses_bm25_with_the_query_reasoner(make_model, examples):
    """On the tiny random model the query reasoner ranks at chance; fused with BM25 over the candidates
    (the served hybrid's formula), with BM25's term weighted up, the gold chunk comes first for most
    questions (at weight 1 the two rank lists count alike: no better than their average)."""
    from clara.eval.evaluate import hybrid_scores

    model = make_model()
    settings = dict(modes=(), top_k=2, recall_ks=(1,), max_new_tokens=2)
    latent = aggregate(evaluate_examples(model, examples, EvalSettings(**settings)))
    hybrid = aggregate(evaluate_examples(model, examples, EvalSettings(**settings, retrieval="hybrid",
                                                                                   text_weight=10.0)))
    assert hybrid.retrieval["recall@1"] >= 60 and hybrid.retrieval["recall@1"] > latent.retrieval["recall@1"]
    # weight 0 keeps the latent order; a candidate with no shared term gets no BM25 term
    lat = [[0.3, 0.2, 0.1]]
    no_terms = hybrid_scores(["zzz"], [["a b", "c d", "e f"]], lat, 1.0)
    assert no_terms == hybrid_scores(["q"], [["a", "b", "c"]], lat, 0.0)
    fused = hybrid_scores(["cat"], [["a dog", "the cat", "a bird"]], lat, 1.0)[0]
    assert max(range(3), key=fused.__getitem__) == 1
