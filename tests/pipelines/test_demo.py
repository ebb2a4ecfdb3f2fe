"""The main job, shortened: every stage of the loop runs for real, end to end."""

import json

import pytest

from pipelines.demo import DemoSettings, run_demo


@pytest.mark.ray
def test_main_job_end_to_end(ray_session, tmp_path):
    lines = []
    result = run_demo(DemoSettings(workdir=tmp_path / "demo", base_model="tiny", docs=16, steps1=4, steps2=2,
                                   steps3=2, batch_size=8, questions=1, eval_questions=4), out=lines.append)
    text = "\n".join(lines)
    for step in range(1, 9):
        assert f"[{step}/8]" in text
    assert len(result["answers"]) == 1 and isinstance(result["answers"][0]["memory"], str)
    assert result["answers"][0]["chunks"], "the served answer names its retrieved chunks"
    from clara.index.store import ChunkStore
    from clara.model import ClaraModel

    model = ClaraModel.from_pretrained(result["model"], device="cpu")
    store = ChunkStore.open(result["index"], create=False)
    assert store.count() > 0 and store.settings.compressor_version == model.compressor_version()
    report = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    figures = next(iter(report.values()))
    assert set(figures["answers"]) == {"compressed", "text", "closed_book"}
    assert (tmp_path / "demo" / "eval" / "accuracy_vs_rate.png").exists()
    assert (tmp_path / "demo" / "logs" / "main.log").read_text().count("[8/8]") == 1
