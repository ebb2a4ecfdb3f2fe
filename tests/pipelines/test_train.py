"""The training job: the three stages on a real local Ray Train with real DeepSpeed (CPU, gloo).

Ray fits are few and shared through module-scoped fixtures (each worker-group start costs ~20 s
on CPU; the first DeepSpeed initialisation on a fresh machine compiles a comm op for ~45 s):
stage 1 runs twice (an interrupted run, then the same name resumed, with a worker fault
injected on the way), stage 2 starts from stage 1's export and stage 3 from stage 2's.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from clara.config import ConfigError
from clara.data.derive import DeriveSettings, derive_records
from clara.data.records import RecordError, read_records
from pipelines.train import TrainJobConfig, apply_override, main, plan_run, run_train

RECIPES = Path(__file__).resolve().parents[2] / "pipelines" / "recipes"
TINY = dict(compression_rate=4, doc_max_tokens=64, train_base=True, device="cpu",
            lora=dict(r=4, alpha=8, dropout=0.0))
# Half a CPU each (one torch thread): other tests' actors in the shared 2-CPU session cannot starve them.
CPU_WORKERS = dict(num_workers=2, resources_per_worker={"CPU": 0.5}, torch_threads=1, micro_batch_size=4,
                   global_batch_size=8, report_every=1, checkpoint_every=2, lr=2e-3, warmup_ratio=0.0)


def quiet(*_):
    pass


class Planted:
    """A pickle that creates ``marker`` when unpickled: the stand-in for a pickled ``os.system`` call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def tensors(model, *, adapter: str | None = None, base: bool = False) -> dict[str, torch.Tensor]:
    """A copy of one adapter's LoRA tensors, or of the base weights (+ memory slots)."""
    out = {}
    for name, p in model.peft.named_parameters():
        if adapter is not None and "lora_" in name and f".{adapter}." in name:
            out[name] = p.detach().clone()
        elif base and "lora_" not in name:
            out[name] = p.detach().clone()
    if base:
        out["memory_embeddings"] = model.memory_embeddings.detach().clone()
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def data_loss(model, stage: str, path: Path) -> float:
    """The stage's cross-entropy over a whole record file, deterministic (eval mode, no dropout)."""
    model.eval()
    with torch.no_grad():
        return model(read_records(path, stage), stage=stage).ce


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def scp_file(workdir, scp_sample_path) -> Path:
    """The first 4 records of the bundled sample: 4 chunks, 29 QA pairs."""
    path = workdir / "scp.jsonl"
    path.write_text("".join(scp_sample_path.read_text().splitlines(keepends=True)[:4]))
    return path


def stage1_settings(workdir: Path, scp_file: Path, tiny_base: Path) -> dict:
    return dict(stage="scp", data=[str(scp_file)], model=dict(base_model=str(tiny_base), **TINY), name="s1",
                storage_path=str(workdir / "runs"), steps=6, **CPU_WORKERS)


@pytest.fixture(scope="module")
def stage1(ray_session, workdir, scp_file, tiny_base):
    """An interrupted stage-1 run (a worker fails at step 3, no retries), then the same run
    started again: it resumes at step 2, survives a worker fault before step 5 and finishes."""
    from pipelines.faults import ENV

    base = stage1_settings(workdir, scp_file, tiny_base)
    with pytest.MonkeyPatch.context() as mp:  # the module-scoped fixture cannot take monkeypatch
        mp.setenv(ENV, "train.fail_at_step=3")
        with pytest.raises(Exception, match="injected fault"):
            run_train(TrainJobConfig(**base, max_failures=0), out=quiet)
        mp.setenv(ENV, "train.fail_at_step=5")
        summary = run_train(TrainJobConfig(**base, max_failures=1), out=quiet)
    return summary


@pytest.mark.ray
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_ray_job_and_the_single_process_loop_give_the_same_losses(ray_session, workdir, scp_file, tiny_base,
                                                                      zero_stage):
    """Same seed, data order and settings: DeepSpeed (ZeRO-2, and ZeRO-3 with its partitioned
    parameters, memory slots included) on a Ray Train worker and :func:`clara.training.loop.train` in
    this process train the same model, step for step."""
    from clara.config import ClaraConfig
    from clara.model import ClaraModel
    from clara.training.loop import TrainSettings, train

    steps, batch, lr = 4, 4, 2e-3
    job = run_train(TrainJobConfig(
        stage="scp", data=[str(scp_file)], model=dict(base_model=str(tiny_base), **TINY), name=f"same-z{zero_stage}",
        storage_path=str(workdir / "runs"), steps=steps, num_workers=1, resources_per_worker={"CPU": 1},
        torch_threads=1, micro_batch_size=batch, global_batch_size=batch, report_every=1, checkpoint_every=100,
        lr=lr, warmup_ratio=0.0, shuffle_buffer_size=0, zero_stage=zero_stage, seed=0), out=quiet)
    torch.manual_seed(0)  # as the worker does before it builds the model
    model = ClaraModel.from_base(ClaraConfig.from_dict(dict(base_model=str(tiny_base), **TINY)), seed=0)
    log = train(model, "scp", read_records(scp_file, "scp"),
                TrainSettings(steps=steps, batch_size=batch, lr=lr, warmup_ratio=0.0, order="sequential", seed=0))
    ray_losses = [h["loss"] for h in job.history]
    assert len(ray_losses) == steps and log.losses[-1] < log.losses[0]
    assert ray_losses == pytest.approx(log.losses, rel=2e-3), (ray_losses, log.losses)


@pytest.mark.ray
def test_an_interrupted_run_resumes_from_its_saved_step(stage1):
    assert stage1.starts[:2] == [0, 2]  # the second run started at the checkpoint of step 2, not at 0
    assert [h["step"] for h in stage1.history] == [1, 2, 3, 4, 5, 6]  # each step reported once


@pytest.mark.ray
def test_a_failed_worker_restarts_from_the_last_checkpoint_and_finishes(stage1):
    assert stage1.starts == [0, 2, 4]  # the fault before step 5 restarted the run at step 4
    assert stage1.steps == 6
    run = Path(stage1.run_dir)
    assert (run / "fault_injected_at_step_3").is_file() and (run / "fault_injected_at_step_5").is_file()
    assert stage1.checkpoint and Path(stage1.checkpoint).is_dir()


@pytest.mark.ray
def test_a_checkpoint_holding_pickles_is_refused_and_nothing_runs(stage1, workdir, scp_file, tiny_base):
    """Whoever can write to storage_path plants pickles in the run's latest checkpoint, in every file a
    resume reads and as a DeepSpeed file: the run started again refuses it, and no payload runs."""
    checkpoint = Path(stage1.checkpoint)
    files = sorted(p.name for p in checkpoint.iterdir() if not p.name.startswith("."))
    assert {"train_state.json", "optimizer-rank0.safetensors", "optimizer-rank1.safetensors"} <= set(files)
    for name in files + ["mp_rank_00_model_states.pt"]:
        (checkpoint / name).write_bytes(pickle.dumps(Planted(workdir / f"ran-{name}")))
    with pytest.raises(Exception, match="train_state.json: not a JSON training state"):
        run_train(TrainJobConfig(**stage1_settings(workdir, scp_file, tiny_base)), out=quiet)
    assert not list(workdir.glob("ran-*"))
    pickle.loads((checkpoint / files[0]).read_bytes())  # the control: a payload runs when unpickled
    assert (workdir / f"ran-{files[0]}").exists()


@pytest.mark.ray
def test_stage1_loss_falls_and_the_export_loads_and_generates(stage1, tiny_base, scp_file):
    from clara.config import ClaraConfig
    from clara.model import ClaraModel

    assert all(x["tokens_per_s"] > 0 and x["mse"] >= 0 and x["lr"] > 0 for x in stage1.history)
    assert all(0 < x["memory_spread"] <= 2 for x in stage1.history)  # reported, and the memories differ
    torch.manual_seed(0)  # as the workers do: the same initial weights
    start = ClaraModel.from_base(ClaraConfig(base_model=str(tiny_base), **TINY), seed=0)
    model = ClaraModel.from_pretrained(stage1.model_dir, device="cpu")
    assert data_loss(model, "scp", scp_file) < data_loss(start, "scp", scp_file) - 0.5
    assert model.config.compression_rate == 4 and model.config.device == "cpu"
    memory = model.compress(["Flip Skateboards is a skateboard company."])
    assert memory.shape == (1, 16, model.hidden_size)
    out = model.generate(["Who founded it?"], memory.unsqueeze(1), max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str)


@pytest.fixture(scope="module")
def stage2(stage1, workdir, scp_file):
    from clara.model import ClaraModel

    examples = read_records(scp_file, "scp")
    path = workdir / "instruct.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in derive_records(
        examples, DeriveSettings(stage="instruct", candidates=2))))
    # with in-batch wrong-memory negatives, so the job's path for them runs for real
    summary = run_train(TrainJobConfig(stage="instruct", data=[str(path)], init=stage1.model_dir, name="s2",
                                       storage_path=str(workdir / "runs"), steps=4, wrong_memory_negatives=0.25,
                                       **CPU_WORKERS), out=quiet)
    return summary, ClaraModel.from_pretrained(stage1.model_dir, device="cpu"), ClaraModel.from_pretrained(
        summary.model_dir, device="cpu"), path


@pytest.mark.ray
def test_stage1_at_a_higher_rate_starts_from_inits_first_memory_slots(tiny_base, tmp_path):
    """``init`` + ``model.compression_rate`` in stage 1: the model built for the workers keeps init's first memory
    slots (the same first memory vectors); a lower rate than init's is a clear error."""
    from clara.config import ClaraConfig
    from clara.model import ClaraModel
    from pipelines.train import _build_model

    init = ClaraModel.from_base(ClaraConfig(base_model=str(tiny_base), **TINY), seed=0).save_pretrained(tmp_path / "m")
    chunks = ["Flip Skateboards is a skateboard company.", "Jake Phelps edited Thrasher magazine."]
    cfg = TrainJobConfig(stage="scp", data=["x"], init=str(init), model={"compression_rate": 16})
    model = _build_model(cfg, "cpu", str(tmp_path))
    start = ClaraModel.from_pretrained(init, device="cpu")
    assert model.config.compression_rate == 16 and model.config.n_mem == start.config.n_mem // 4
    assert torch.allclose(model.compress(chunks), start.compress(chunks)[:, :model.config.n_mem], atol=1e-5)
    with pytest.raises(ConfigError, match="slots can only be dropped"):
        _build_model(TrainJobConfig(stage="scp", data=["x"], init=str(init), model={"compression_rate": 1}), "cpu",
                     str(tmp_path))


def test_stage2_starts_a_fresh_generator_and_learns(stage2, stage1):
    from clara.model import ClaraModel
    from clara.training.stages import get_stage

    summary, before, after, path = stage2
    start = ClaraModel.from_pretrained(stage1.model_dir, device="cpu")
    get_stage("instruct").prepare(start, seed=0)  # as the workers do: a fresh generator adapter
    assert summary.steps == 4 and data_loss(after, "instruct", path) < data_loss(start, "instruct", path)
    assert not same(tensors(before, adapter="generator"), tensors(after, adapter="generator"))
    assert not same(tensors(before, adapter="compressor"), tensors(after, adapter="compressor"))
    memory = after.compress(["a chunk", "another chunk"])
    assert len(after.generate(["q?"], memory.unsqueeze(0), max_new_tokens=3)) == 1


@pytest.fixture(scope="module")
def stage3(stage2, workdir, scp_file):
    from clara.model import ClaraModel

    examples = read_records(scp_file, "scp")
    path = workdir / "e2e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in derive_records(
        examples, DeriveSettings(stage="e2e", candidates=4, hard_fraction=0.5))))
    init = stage2[0].model_dir
    summary = run_train(TrainJobConfig(stage="e2e", data=[str(path)], init=init, model={"top_k": 2}, name="s3",
                                       storage_path=str(workdir / "runs"), steps=4, **CPU_WORKERS), out=quiet)
    return summary, stage2[2], ClaraModel.from_pretrained(summary.model_dir, device="cpu"), path


@pytest.mark.ray
def test_stage3_trains_query_reasoner_and_generator_and_leaves_the_compressor_bit_for_bit(stage3, stage2):
    from clara.model import ClaraModel
    from clara.training.stages import get_stage

    summary, before, after, path = stage3
    start = ClaraModel.from_pretrained(stage2[0].model_dir, device="cpu")
    start.config.top_k = 2
    get_stage("e2e").prepare(start)  # as the workers do: the query reasoner starts as the compressor
    assert summary.steps == 4 and data_loss(after, "e2e", path) < data_loss(start, "e2e", path)
    assert all("recall@2" in h and 0 <= h["recall@2"] <= 1 for h in summary.history)
    assert same(tensors(before, adapter="compressor"), tensors(after, adapter="compressor"))
    assert same(tensors(before, base=True), tensors(after, base=True))  # base weights and memory slots
    assert after.compressor_version() == before.compressor_version()
    assert not same(tensors(before, adapter="generator"), tensors(after, adapter="generator"))
    qr = tensors(after, adapter="query_reasoner")
    assert not same(tensors(before, adapter="query_reasoner"), qr)
    # initialised from the compressor, then trained: close to it, not equal to it
    comp = {k.replace(".compressor.", ".query_reasoner."): v for k, v in tensors(after, adapter="compressor").items()}
    assert qr.keys() == comp.keys() and not same(qr, comp)
    assert after.config.top_k == 2


@pytest.mark.ray
def test_a_malformed_file_fails_before_training_naming_file_and_line(ray_session, workdir, scp_file, tiny_base):
    bad = workdir / "bad.jsonl"
    lines = scp_file.read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1], '{"data_type": "qa", "question": ["q"], "docs": ["c"]}']) + "\n")
    cfg = TrainJobConfig(stage="scp", data=[str(scp_file), str(bad)], model=dict(base_model=str(tiny_base), **TINY),
                         name="bad", storage_path=str(workdir / "runs"), steps=2, **CPU_WORKERS)
    with pytest.raises(RecordError, match=r"bad\.jsonl:3: field 'answers': missing"):
        run_train(cfg, out=quiet)
    assert not (workdir / "runs" / "bad").exists()  # nothing started
    recipe = workdir / "bad.yaml"
    recipe.write_text(f"stage: scp\ndata: [{bad}]\nmodel: {{base_model: {tiny_base}}}\nstorage_path: {workdir}\n")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:3"):
        main(["--config", str(recipe), "--dry-run"])


# -- no Ray below ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,stage", [("stage1_scp.yaml", "scp"), ("stage2_instruct.yaml", "instruct"),
                                          ("stage3_e2e.yaml", "e2e")])
def test_recipes_fill_a_valid_config_and_show_their_launch_line(recipe, stage):
    path = RECIPES / recipe
    cfg = TrainJobConfig.from_yaml(path)
    assert cfg.stage == stage and cfg.zero_stage in (0, 1, 2, 3)
    assert cfg.peak_lr == (5e-6 if stage == "e2e" else 1e-4)
    assert cfg.batch_size == (32 if stage == "e2e" else 128)
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"ray job submit --working-dir . -- python -m pipelines.train --config pipelines/recipes/{recipe}" in header


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: scp\ndata: x.jsonl\nmodel: {base_model: b}\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown field.*learning_rate"):
        TrainJobConfig.from_yaml(recipe)
    recipe.write_text("stage: scp\ndata: x.jsonl\nmodel: {base_model: b, compresion_rate: 4}\n")
    with pytest.raises(ConfigError, match="compresion_rate"):
        TrainJobConfig.from_yaml(recipe)
    recipe.write_text("stage: scp\ndata: x.jsonl\nmodel: {base_model: b}\nlr: 1e-4\n")  # YAML reads 1e-4 as text
    cfg = TrainJobConfig.from_yaml(recipe, ["steps=7", "model.compression_rate=8", "resources_per_worker={CPU: 2}"])
    assert cfg.lr == 1e-4 and cfg.steps == 7 and cfg.model["compression_rate"] == 8
    assert cfg.resources_per_worker == {"CPU": 2} and cfg.data == ["x.jsonl"]
    with pytest.raises(ConfigError, match="r.yaml: steps: input should be a valid integer"):
        TrainJobConfig.from_yaml(recipe, ["steps=many"])
    gbs = dict(global_batch_size=10, micro_batch_size=4)
    bad = [
        (dict(stage="e2e", data=["x"]), "init"),
        (dict(stage="scp", data=["x"], model={}), "base_model"),
        (dict(stage="scp", data=["x"], model={"base_model": "b"}, **gbs), "multiple"),
        (dict(stage="scp", data=["x"], model={"base_model": "b"}, zero_stage=4), "zero_stage"),
        (dict(stage="scp", data=["x"], model={"base_model": "b"}, precision="fp16"), "fp16"),
        (dict(stage="scp", data=["x"], model={"base_model": "b"}, steps=3, epochs=1.0), "one or the other"),
        (dict(stage="instruct", data=["x"], init="m", model={"compression_rate": 4}), "only"),
        (dict(stage="scp", data=["x"], init="m", model={"doc_max_tokens": 32}), "in stage scp"),
        (dict(stage="instruct", data=["x"], init="m", reconstruction_warmup=0.5), "reconstruction_warmup"),
        (dict(stage="e2e", data=["x"], init="m", wrong_memory_negatives=0.25), "wrong_memory_negatives"),
        (dict(stage="scp", data=["x"], model={"base_model": "b"}, wrong_memory_negatives=1.5), "wrong_memory_neg"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            TrainJobConfig(**kwargs)
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "steps")


def test_plan_counts_steps_and_gradient_accumulation():
    cfg = TrainJobConfig(stage="scp", data=["x"], model={"base_model": "b"}, num_workers=2, micro_batch_size=4,
                         global_batch_size=32, epochs=2.0)
    plan = plan_run(cfg, 1000)
    assert plan.grad_accum == 4 and plan.micro_batches_per_epoch == 125  # 500 examples per worker / 4
    assert plan.steps == 62 and plan.lr == 1e-4  # 2 epochs x 125 micro-batches / 4
    e2e = TrainJobConfig(stage="e2e", data=["x"], init="m")
    assert plan_run(e2e, 100).global_batch_size == 32 and plan_run(e2e, 100).lr == 5e-6
    with pytest.raises(ConfigError, match="fewer than"):
        plan_run(cfg, 7)


def test_derive_command_writes_records_split_by_chunk(scp_sample_path, tmp_path, capsys):
    from pipelines.derive import main as derive

    out, held = tmp_path / "e2e.jsonl", tmp_path / "eval.jsonl"
    assert derive(["--input", str(scp_sample_path), "--stage", "e2e", "--out", str(out), "--candidates", "6",
                   "--holdout", "0.1", "--holdout-out", str(held), "--seed", "1"]) == 0
    train, test = read_records(out, "e2e"), read_records(held, "e2e")
    assert len(train[0].chunks) == 6 and all(len(ex.gold) == 1 for ex in train + test)
    gold_train = {ex.chunks[ex.gold[0]] for ex in train}
    gold_test = {ex.chunks[ex.gold[0]] for ex in test}
    assert gold_train and gold_test and not gold_train & gold_test
    assert not {c for ex in train for c in ex.chunks} & gold_test  # no held-out chunk leaks into training
    assert "derive:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holdout needs holdout_out"):
        derive(["--input", str(scp_sample_path), "--stage", "e2e", "--out", str(out), "--holdout", "0.1"])


def test_stale_build_locks_are_cleared(tmp_path, monkeypatch):
    """A lock left by a job killed mid-build would hang every later deepspeed.initialize."""
    import os
    import time

    from pipelines.compat import clear_stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other" / "lock"
    built = tmp_path / "py311_cpu" / "built" / "lock"
    for f in (old, fresh, built):
        f.parent.mkdir(parents=True)
        f.write_text("")
    (built.parent / "built.so").write_text("")
    (old.parent / "shm.o").write_text("")  # killed before linking: no library
    for f in (old, built):
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    said = []
    assert sorted(clear_stale_extension_locks(out=said.append)) == sorted([str(old), str(built)])
    assert not old.parent.exists()  # the half-built op is rebuilt from scratch
    assert not built.exists() and (built.parent / "built.so").exists() and fresh.exists() and "stale" in said[0]


def test_a_job_console_shows_its_own_lines_not_rays_info_logs(scp_sample_path, tmp_path):
    """Ray's INFO lines (start-up, Ray Data's operator progress) are off by default, one variable away."""
    import os
    import re
    import subprocess
    import sys

    argv = [sys.executable, "-m", "pipelines.train", "--stage", "scp", "--data", str(scp_sample_path),
            "--model", "base_model=b", "--steps", "2", "--dry-run"]
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("CLARA_RAY_LOG_LEVEL", "RAY_DATA_LOG_LEVEL")}
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    lines = (quiet.stdout + quiet.stderr).splitlines()
    assert any(line.startswith("[scp] ") and "all valid; 2 steps" in line for line in lines)
    assert not [line for line in lines if re.search(r"\sINFO\s", line)]
    loud = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=root,
                          env={**env, "CLARA_RAY_LOG_LEVEL": "info"})
    assert loud.returncode == 0 and sum(bool(re.search(r"\sINFO\s", line))
                                         for line in (loud.stdout + loud.stderr).splitlines()) > 5
