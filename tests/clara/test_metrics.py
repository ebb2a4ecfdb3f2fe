import pytest

from clara.eval.metrics import cover_em, exact_match, normalize_answer, recall_at_k, summarize, token_f1


def test_normalize_answer():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("  Theory of   Relativity ") == "theory of relativity"  # 'the' only as a word
    assert normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("") == ""


def test_exact_match():
    assert exact_match("the Paris.", "Paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("Lyon", ["Paris", "lyon"]) == 1.0
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_cover_em():
    assert cover_em("The capital is Paris, France", "paris") == 1.0
    assert cover_em("It was Jake Phelps, the editor.", "Jake Phelps") == 1.0
    assert cover_em("Phelps was the editor", "Jake Phelps") == 0.0  # every gold token must appear
    assert cover_em("Phelps was the editor", ["Jake Phelps", "Phelps"]) == 1.0
    assert cover_em("parisian food", "Paris") == 0.0  # tokens, not substrings
    assert cover_em("", "the") == 1.0 and cover_em("something", "the") == 0.0  # empty gold covers only empty


def test_token_f1_by_hand():
    # pred tokens: [new, york, city]; gold tokens: [new, york]; overlap 2
    # precision 2/3, recall 2/2 -> F1 = 2 * (2/3) * 1 / (2/3 + 1) = 0.8
    assert token_f1("New York City", "new york") == pytest.approx(0.8)
    # pred [paris, paris, france] vs gold [paris]: overlap counts multiplicity once -> P=1/3, R=1, F1=0.5
    assert token_f1("Paris Paris France", "Paris") == pytest.approx(0.5)
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("New York City", ["Boston", "new york", "new york city"]) == 1.0


def test_recall_at_k():
    retrieved = ["c3", "c1", "c7", "c2"]
    assert recall_at_k(retrieved, {"c1", "c2"}, k=2) == 0.5
    assert recall_at_k(retrieved, {"c1", "c2"}, k=4) == 1.0
    assert recall_at_k(retrieved, ["c9"], k=10) == 0.0
    assert recall_at_k(retrieved, ["c3", "c3"], k=1) == 1.0  # gold ids are a set
    with pytest.raises(ValueError, match="gold"):
        recall_at_k(retrieved, [], k=3)
    with pytest.raises(ValueError, match="k"):
        recall_at_k(retrieved, ["c1"], k=0)


def test_summarize():
    preds = ["Paris", "The capital is Paris, France", "New York City"]
    golds = ["paris", ["Lyon", "Paris"], "new york"]
    s = summarize(preds, golds)
    assert s["n"] == 3
    assert s["em"] == pytest.approx(1 / 3)
    assert s["cover_em"] == pytest.approx(1.0)
    # f1: 1.0; "capital is paris france" vs "paris": P=1/4, R=1 -> 0.4; 0.8 -> mean 2.2 / 3
    assert s["f1"] == pytest.approx(2.2 / 3)
    with pytest.raises(ValueError):
        summarize(["a"], [])
    with pytest.raises(ValueError):
        summarize([], [])
