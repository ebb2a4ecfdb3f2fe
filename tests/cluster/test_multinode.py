"""The jobs on a real two-node Ray cluster, submitted through the Job Submission API as on any cluster.

A head and a worker node are started with ``ray start --block`` on 127.0.0.1, each with one logical CPU
and its own ports, in this test's own temporary directory (never the session's ``ray_session``: this
process never calls ``ray.init``). The index job and a short stage-1 training job are submitted with
``JobSubmissionClient`` exactly as ``ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml``
would, with one difference: the runtime env's ``pip`` list is left out (this machine has the packages and
no index to install from). Each job asks for two actors or workers of one CPU, more than one node has, so
Ray must place one on each node; the test checks that it did, and checks the results: one row per chunk
in the LanceDB table, and a training export that ``ClaraModel.from_pretrained`` loads.

Both nodes run in their own process groups and are stopped, and their directory removed, however the
test ends. ~2-4 minutes on 2 busy cores (most of it the training job's worker start and DeepSpeed set-up).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 120
INDEX_TIMEOUT_S = 420
TRAIN_TIMEOUT_S = 600


@dataclass
class Cluster:
    dashboard: str          # http://127.0.0.1:PORT, the Job Submission and state API
    headers: dict           # the bearer token of this cluster (Ray 2.60 enables token auth)
    head_node: str          # node ids
    worker_node: str
    temp_dir: Path

    def jobs(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers=dict(self.headers))


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_range(size: int) -> int:
    """The first of ``size`` consecutive ports that are free on 127.0.0.1 now (Ray's worker ports)."""
    for _ in range(50):
        base = _free_ports(1)[0]
        if base + size >= 65000:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free range of ports")


def _node_ports() -> list[str]:
    node_manager, object_manager, agent_http, agent_grpc, metrics, runtime_env = _free_ports(6)
    workers = _free_range(40)
    return [f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            f"--min-worker-port={workers}", f"--max-worker-port={workers + 39}"]


def _stop(proc: subprocess.Popen | None) -> None:
    """Stop a ``ray start --block`` and every process of its group (its Ray processes), gracefully first."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anything left in the group?
            except ProcessLookupError:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
        else:
            continue
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _wait(what: str, predicate, timeout: float, procs=(), logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"{what}: `ray start` exited with {p.returncode}:\n{_tail(log)}")
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(1)
    raise TimeoutError(f"{what}: not after {timeout:.0f}s\n" + "\n".join(_tail(log) for log in logs))


def _state(dashboard: str, headers: dict, resource: str, filters=(), detail: bool = False) -> list:
    """Rows of the state API (``nodes``, ``actors``), through the dashboard with this cluster's token."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(dashboard, headers={"Content-Type": "application/json", **headers})
    return client.list(StateResource(resource), ListApiOptions(filters=list(filters), limit=1000, timeout=30,
                                                               detail=detail), raise_on_missing_output=False)


def _alive_nodes(dashboard: str, headers: dict) -> list:
    return [n for n in _state(dashboard, headers, "nodes") if n.state == "ALIVE"]


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU, resource ``head_node``) and a worker (1 CPU, resource ``worker_node``) on 127.0.0.1."""
    # Unix socket paths are limited to ~107 characters: keep the root short.
    temp_dir = Path(tempfile.mkdtemp(prefix="/tmp/rc"))
    # Its own token: the nodes, and the jobs they start, read it from the environment; this process only
    # sends it as a header (its own Ray settings stay untouched for the other tests of the session).
    token = uuid.uuid4().hex + uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {token}"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    gcs, dashboard_port, client = _free_ports(3)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
              "--object-store-memory=300000000", "--disable-usage-stats"]
    head = worker = None
    head_log, worker_log = temp_dir / "head.out", temp_dir / "worker.out"
    try:
        with head_log.open("w") as out:
            head = subprocess.Popen(
                [str(RAY), "start", "--head", *common, f"--port={gcs}", f"--temp-dir={temp_dir}",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 f"--ray-client-server-port={client}", '--resources={"head_node": 1}', *_node_ports()],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp_dir)

        def dashboard_up() -> bool:
            request = urllib.request.Request(f"{dashboard}/api/version", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status == 200

        _wait("head node", lambda: dashboard_up() and len(_alive_nodes(dashboard, headers)) == 1, START_TIMEOUT_S,
              [head], [head_log])
        with worker_log.open("w") as out:
            worker = subprocess.Popen(
                [str(RAY), "start", *common, f"--address=127.0.0.1:{gcs}", '--resources={"worker_node": 1}',
                 *_node_ports()],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp_dir)
        _wait("worker node", lambda: len(_alive_nodes(dashboard, headers)) == 2, START_TIMEOUT_S, [head, worker],
              [head_log, worker_log])
        nodes = {("head" if "head_node" in n.resources_total else "worker"): n.node_id
                 for n in _alive_nodes(dashboard, headers)}
        assert set(nodes) == {"head", "worker"}, nodes
        yield Cluster(dashboard, headers, nodes["head"], nodes["worker"], temp_dir)
    finally:
        with contextlib.suppress(Exception):  # a job still running when the test gave up
            from ray.job_submission import JobStatus, JobSubmissionClient

            client = JobSubmissionClient(dashboard, headers=dict(headers))
            for job in client.list_jobs():
                if job.status in (JobStatus.PENDING, JobStatus.RUNNING):
                    client.stop_job(job.submission_id)
        _stop(worker)
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _runtime_env() -> dict:
    """cluster/runtime_env.yaml with this checkout as the working_dir; ``pip`` left out (see the module doc)."""
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    env.pop("pip", None)
    env["working_dir"] = str(ROOT)
    return env


def _run_job(cluster: Cluster, argv: list[str], timeout: float, env_vars: dict | None = None) -> tuple[str, str]:
    """Submit ``python -m ...argv`` and wait for it; returns ``(Ray job id, logs)``; fails with the logs."""
    (result,) = _run_jobs(cluster, [argv], timeout, env_vars)
    return result


def _run_jobs(cluster: Cluster, argvs: list[list[str]], timeout: float,
              env_vars: dict | None = None) -> list[tuple[str, str]]:
    """Submit several jobs at once and wait for all; ``[(Ray job id, logs)]``; fails with the logs."""
    from ray.job_submission import JobStatus

    client = cluster.jobs()
    runtime_env = _runtime_env()
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **(env_vars or {})}
    sids = []
    for argv in argvs:
        sids.append(f"{argv[2].replace('.', '-')}-{uuid.uuid4().hex[:8]}")
        client.submit_job(entrypoint=shlex.join(argv), runtime_env=runtime_env, submission_id=sids[-1])
    deadline = time.monotonic() + timeout
    statuses = {sid: client.get_job_status(sid) for sid in sids}
    while not all(st.is_terminal() for st in statuses.values()) and time.monotonic() < deadline:
        time.sleep(2)
        statuses = {sid: client.get_job_status(sid) for sid in sids}
    out = []
    for sid, status in statuses.items():
        logs = client.get_job_logs(sid)
        if not status.is_terminal():
            client.stop_job(sid)
        assert status == JobStatus.SUCCEEDED, f"{sid}: {status} after {timeout}s\n{logs[-6000:]}"
        out.append((client.get_job_info(sid).job_id, logs))
    return out


def _task_nodes(cluster: Cluster, job_id: str, name_part: str) -> set[str]:
    """Node ids where the job's finished tasks whose name contains ``name_part`` ran (actor tasks included)."""
    tasks = _state(cluster.dashboard, cluster.headers, "tasks", [("job_id", "=", job_id)], detail=True)
    return {t.node_id for t in tasks if name_part in t.name and t.state == "FINISHED" and t.node_id}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_base) -> Path:
    """The tiny model (rate 4, 64-token chunks), saved as the index job reads it."""
    from clara.config import ClaraConfig, LoraSettings
    from clara.model import ClaraModel

    config = ClaraConfig(base_model=str(tiny_base), compression_rate=4, doc_max_tokens=64, device="cpu",
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    return ClaraModel.from_base(config, seed=0).save_pretrained(tmp_path_factory.mktemp("mn") / "model")


def test_index_job_runs_on_both_nodes_and_writes_one_row_per_chunk(cluster, model_dir, scp_sample_path, tmp_path):
    """One index job with an actor on each node; then the same corpus as two shards, one job per shard
    at once (one on each node), read back by the Retriever as the one table."""
    from clara.data.corpus import load_scp_chunks
    from clara.index.store import ChunkStore

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(scp_sample_path.read_text().splitlines(keepends=True)[:40]))
    chunks = set(load_scp_chunks(corpus))
    assert 30 <= len(chunks) <= 40
    table = tmp_path / "index"
    job_id, logs = _run_job(cluster, [
        "python", "-m", "pipelines.index", "--format", "scp", "--corpus", str(corpus), "--model", str(model_dir),
        "--table-uri", str(table), "--actors", "2", "--num-cpus-per-actor", "1", "--batch-size", "8",
        "--commit-rows", "16", "--json"], INDEX_TIMEOUT_S,
        # Ray Data hands out work once both actors are up; else, with this little work, the head's actor may
        # be done before the worker's has imported torch (work on both nodes is what is tested here).
        env_vars={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": str(INDEX_TIMEOUT_S)})

    (summary,) = [json.loads(line) for line in logs.splitlines() if line.startswith('{"table_uri"')]
    assert summary["compressed"] == summary["rows"] == len(chunks)
    store = ChunkStore.open(str(table), None, create=False)
    assert store.count() == len(chunks)
    assert store.settings.n_mem == 16 and store.version == summary["version"]
    # two one-CPU actors on nodes of one CPU each: one compressed on each node
    assert _task_nodes(cluster, job_id, "(ChunkCompressor)).submit") == {cluster.head_node, cluster.worker_node}

    # The same corpus in two shards (--shards 2 --shard I), one job per shard at the same time: one on
    # each node. The Retriever over both shards returns what it returns over the one table.
    from clara.index.retrieve import Retriever
    from clara.index.schema import shard_table

    sharded = tmp_path / "sharded"
    runs = _run_jobs(cluster, [
        ["python", "-m", "pipelines.index", "--format", "scp", "--corpus", str(corpus), "--model", str(model_dir),
         "--table-uri", str(sharded), "--actors", "1", "--num-cpus-per-actor", "1", "--batch-size", "8",
         "--shards", "2", "--shard", str(i), "--json"] for i in range(2)], INDEX_TIMEOUT_S)
    nodes = [_task_nodes(cluster, job_id, "(ChunkCompressor)).submit") for job_id, _ in runs]
    assert len(nodes[0]) == len(nodes[1]) == 1 and nodes[0] | nodes[1] == {cluster.head_node, cluster.worker_node}
    from clara.index.schema import shard_of

    shards = [ChunkStore.open(str(sharded), None, table=shard_table("chunks", i, 2), create=False) for i in range(2)]
    rows = [s.count() for s in shards]
    assert sum(rows) == len(chunks) and min(rows) > 0
    for i, s in enumerate(shards):  # each document in the shard of its hash
        assert {shard_of(d, 2) for d in s.table.to_arrow().column("doc_id").to_pylist()} == {i}
    questions = [json.loads(line)["question"][0] for line in corpus.read_text().splitlines()[:10]]
    one = Retriever.open(model_dir, table, candidates=50).retrieve(questions, k=5)
    two = Retriever.open(model_dir, sharded, candidates=50, shards=2).retrieve(questions, k=5)
    assert [r.chunk_ids for r in one] == [r.chunk_ids for r in two]
    assert all(abs(x - y) < 1e-6 for a, b in zip(one, two) for x, y in zip(a.scores, b.scores))
    # both shard jobs done: publish their versions as one manifest, which readers then serve
    from pipelines.index import main as index_main

    assert index_main(["manifest", "publish", "--table-uri", str(sharded), "--shards", "2"]) == 0
    pinned = Retriever.open(model_dir, sharded, candidates=50, shards=2)
    assert pinned.version == 1 and pinned.store.manifest.versions == tuple(s.version for s in shards)
    assert [r.chunk_ids for r in pinned.retrieve(questions, k=5)] == [r.chunk_ids for r in one]


def test_training_job_runs_on_both_nodes_and_exports_a_model(cluster, tiny_base, scp_sample_path, tmp_path):
    from clara.model import ClaraModel

    data = tmp_path / "scp.jsonl"
    data.write_text("".join(scp_sample_path.read_text().splitlines(keepends=True)[:4]))
    runs = tmp_path / "runs"
    # The stage-1 recipe the RayJob runs, shrunk to the tiny model, two one-CPU workers and two steps.
    overrides = [f"data={data}", f"model.base_model={tiny_base}", "model.compression_rate=4",
                 "model.doc_max_tokens=64", "model.train_base=true", "model.lora.r=4", "model.lora.alpha=8",
                 "model.lora.dropout=0.0", "model.device=cpu", "name=multinode", f"storage_path={runs}",
                 "use_gpu=false", "num_workers=2", "resources_per_worker={CPU: 1}", "micro_batch_size=4",
                 "global_batch_size=8", "steps=2", "epochs=null", "lr=2e-3", "warmup_ratio=0.0", "report_every=1",
                 "max_failures=0"]
    job_id, logs = _run_job(cluster, ["python", "-m", "pipelines.train", "--config",
                                      "pipelines/recipes/stage1_scp.yaml", "--override", *overrides],
                            TRAIN_TIMEOUT_S)

    assert "[scp] done: 2 steps" in logs
    model = ClaraModel.from_pretrained(runs / "multinode" / "model", device="cpu")
    assert model.config.compression_rate == 4 and model.config.doc_max_tokens == 64
    memory = model.compress(["Flip Skateboards is a skateboard company."])
    assert memory.shape == (1, 16, model.hidden_size)
    # two one-CPU workers on nodes of one CPU each: one trained on each node
    assert _task_nodes(cluster, job_id, "RayTrainWorker.run_train_fn") == {cluster.head_node, cluster.worker_node}
