"""Training checkpoints without pickle (:mod:`pipelines.train_checkpoint`) on real DeepSpeed engines, no Ray.

This file is also the script its test runs: two ranks (gloo on CPU, in subprocesses) train a small
model with dropout under every ZeRO stage and precision the job can configure, save at step 2, and
an engine built afresh and restored from the files must continue exactly as the original did. Then
each file of such a checkpoint in turn is replaced by a pickle whose unpickling would create a
marker file, and so is an old DeepSpeed checkpoint: every one is refused, and no marker appears.
A checkpoint of another ZeRO stage is refused too (the optimizer files hold each rank's partition).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
CONFIGS = [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (2, "bf16"), (3, "bf16")]
TAMPERED_CONFIG = (2, "fp32")  # the recipes' ZeRO stage, the CPU precision
OLD_FILES = ("deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt")


class Payload:
    """Unpickling it creates ``marker``: the stand-in for a pickled ``os.system`` call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


# -- the two ranks (run as a script) ----------------------------------------------------------------
def _engine(zero: int, precision: str):
    import deepspeed
    import torch

    from clara.training.deepspeed import deepspeed_config

    torch.manual_seed(0)  # the same initial weights for the original and the restored engine
    net = _net()
    if precision == "bf16":
        net = net.to(torch.bfloat16)
    config = deepspeed_config(micro_batch_size=4, grad_accum=2, world_size=WORLD, lr=1e-2, zero_stage=zero,
                              precision=precision, weight_decay=0.1)
    engine, _, _, _ = deepspeed.initialize(
        model=net, model_parameters=[p for p in net.parameters() if p.requires_grad], config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)))
    return engine


def _net():
    import torch

    class Net(torch.nn.Module):
        """A frozen layer, trained layers, a bare parameter (like the memory slots) and dropout."""

        def __init__(self):
            super().__init__()
            self.frozen = torch.nn.Linear(8, 16).requires_grad_(False)
            self.hidden = torch.nn.Linear(16, 16)
            self.out = torch.nn.Linear(16, 1)
            self.slots = torch.nn.Parameter(torch.randn(3, 16))
            self.drop = torch.nn.Dropout(0.2)

        def forward(self, x):
            h = self.drop(torch.relu(self.hidden(self.frozen(x)) + self.slots.sum(0)))
            return (self.out(h) ** 2).mean()

    return Net()


def _train(engine, batches) -> list[float]:
    losses = []
    for x in batches:
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def _attempt(engine, directory: Path, rank: int) -> str | None:
    """The error a resume from ``directory`` raises, or ``None`` when it loads."""
    from pipelines import train_checkpoint

    try:
        train_checkpoint.load(engine, directory, rank=rank, world=WORLD)
    except train_checkpoint.CheckpointError as e:
        return str(e)
    return None


def _plant(src: Path, dest: Path, name: str, marker: Path) -> None:
    """A copy of the checkpoint ``src`` whose file ``name`` is a pickle."""
    shutil.copytree(src, dest)
    _plant_file(dest / name, marker)


def _plant_file(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload(marker)))


def _rank_main(out: Path) -> None:
    """One rank: the exact-resume runs for every configuration, then the tampered checkpoints."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from pipelines import train_checkpoint

    report: dict = {"resume": {}, "tampered": {}}
    for zero, precision in CONFIGS:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        g = torch.Generator().manual_seed(rank)  # each rank its own data
        batches = [torch.randn(4, 8, generator=g).to(dtype) for _ in range(10)]
        directory = out / f"ckpt-{zero}-{precision}"
        original = _engine(zero, precision)
        _train(original, batches[:4])  # 2 optimizer steps of 2 micro-batches
        train_checkpoint.save(original, directory, rank=rank, world=WORLD, client_state={"step": 2})
        dist.barrier()
        expected = _train(original, batches[4:])
        restored = _engine(zero, precision)
        client = train_checkpoint.load(restored, directory, rank=rank, world=WORLD)
        report["resume"][f"{zero}-{precision}"] = {
            "client": client, "expected": expected, "got": _train(restored, batches[4:]),
            "lr": [original.lr_scheduler.get_last_lr(), restored.lr_scheduler.get_last_lr()],
            "global_steps": [original.global_steps, restored.global_steps]}
    zero, precision = TAMPERED_CONFIG
    good = out / f"ckpt-{zero}-{precision}"
    engine = _engine(zero, precision)
    for name in sorted(p.name for p in good.iterdir()):
        if rank == 0:
            _plant(good, out / f"tampered-{name}", name, out / f"marker-{name}")
        dist.barrier()
        report["tampered"][name] = _attempt(engine, out / f"tampered-{name}", rank)
        dist.barrier()
    if rank == 0:
        (out / "old").mkdir()
        (out / "old" / "latest").write_text("deepspeed")
        for old in OLD_FILES:
            _plant_file(out / "old" / old, out / f"marker-{Path(old).name}")
    dist.barrier()
    report["old"] = _attempt(engine, out / "old", rank)
    report["other_layout"] = _attempt(_engine(1, precision), good, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


# -- the tests ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Run the two ranks; their reports (one per rank) and their working directory."""
    out = tmp_path_factory.mktemp("train_checkpoint")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], [out / f"rank{rank}.log" for rank in range(WORLD)]
    for rank, log in enumerate(logs):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1"}
        with log.open("w") as f:  # a file, not a pipe: a rank blocked on a full pipe would hang the other
            procs.append(subprocess.Popen([sys.executable, __file__, str(out)], cwd=ROOT, env=env, stdout=f,
                                          stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, code in enumerate(codes):
        assert code == 0, f"rank {rank} failed:\n{logs[rank].read_text()[-4000:]}"
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("zero,precision", CONFIGS)
def test_a_restored_engine_continues_exactly_as_the_original(ranks, zero, precision):
    for report in ranks[1]:
        run = report["resume"][f"{zero}-{precision}"]
        assert run["client"] == {"step": 2}
        assert run["got"] == run["expected"]  # losses of 3 more steps, bit for bit (dropout included)
        assert run["lr"][0] == run["lr"][1] and run["global_steps"] == [5, 5]


def test_the_payload_runs_when_unpickled(tmp_path):
    """The control: what the other tests plant would run if anything unpickled it."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "marker")))
    assert (tmp_path / "marker").exists()


def test_every_checkpoint_file_holding_a_pickle_is_refused_and_nothing_runs(ranks):
    out, reports = ranks
    files = list(reports[0]["tampered"])
    assert sorted(files) == sorted(["train_state.json", "trainable.safetensors", "optimizer-rank0.safetensors",
                                    "optimizer-rank1.safetensors", "rng-rank0.safetensors", "rng-rank1.safetensors"])
    for name in files:
        readers = [r for r in range(WORLD) if "rank" not in name or name.endswith(f"rank{r}.safetensors")]
        for rank in readers:
            error = reports[rank]["tampered"][name]
            assert error and name in error and "refusing to load" in error, (rank, name, error)
        assert not (out / f"marker-{name}").exists()


def test_an_old_deepspeed_checkpoint_is_refused_and_not_unpickled(ranks):
    out, reports = ranks
    for report in reports:
        assert "DeepSpeed's pickle format" in report["old"]
        assert "start the run again under a new name" in report["old"]
    assert not list(out.glob("marker-*.pt"))


def test_a_checkpoint_of_another_zero_stage_is_refused(ranks):
    for report in ranks[1]:
        assert "'zero_stage': 2" in report["other_layout"] and "resume with the num_workers" in report["other_layout"]


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
