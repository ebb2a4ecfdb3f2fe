import json

import pytest

from clara.eval.evaluate import EvalSettings
from pipelines.evaluate import EvaluateJobSettings, main, run_evaluate


@pytest.fixture(scope="module")
def e2e_file(tmp_path_factory, scp_records):
    chunks = list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:8]
    path = tmp_path_factory.mktemp("eval") / "e2e.jsonl"
    lines = []
    for ex in scp_records:
        if ex.chunks[0] in chunks and len(lines) < 6:
            lines.append(json.dumps({"question": ex.question, "docs": chunks, "answer": ex.answer,
                                     "pos_index": [chunks.index(ex.chunks[0])]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.ray
def test_rate_sweep_on_ray_data(ray_session, make_model, e2e_file, tmp_path):
    models = [str(make_model(compression_rate=r).save_pretrained(tmp_path / f"rate{r}")) for r in (4, 16)]
    reports = run_evaluate(EvaluateJobSettings(models=models, data=str(e2e_file), out=str(tmp_path / "out"),
                                               eval=EvalSettings(top_k=2, max_new_tokens=3, batch_size=4)),
                           out=lambda *_: None)
    assert list(reports) == ["rate 4", "rate 16"]
    for r in reports.values():
        assert r.n == 6 and set(r.answers) == {"compressed", "text", "closed_book"}
        assert all(0 <= v <= 100 for m in r.answers.values() for s in m.values() for v in s.values())
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rate 16"]["meta"]["compression_rate"] == 16
    assert (tmp_path / "out" / "accuracy_vs_rate.png").stat().st_size > 1000


def test_cli_local_and_bad_records(make_model, e2e_file, tmp_path, capsys):
    model = str(make_model().save_pretrained(tmp_path / "m"))
    assert main(["--model", model, "--data", str(e2e_file), "--out", str(tmp_path / "o"), "--local",
                 "--modes", "compressed", "--settings", "oracle", "--top-k", "1", "--max-new-tokens", "2"]) == 0
    assert "| compressed | oracle |" in (tmp_path / "o" / "results.md").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "docs": ["a"], "answer": "x"}) + "\n")
    from clara.data.records import RecordError

    with pytest.raises(RecordError, match=r"bad\.jsonl:1: field 'pos_index'"):
        main(["--model", model, "--data", str(bad), "--local"])
    with pytest.raises(SystemExit):
        main(["--model", model, "--data", str(e2e_file), "--modes", "psychic"])
