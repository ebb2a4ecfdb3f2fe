"""Training checkpoints that cannot run code when they are read.

DeepSpeed's ``save_checkpoint`` / ``load_checkpoint`` pickle everything, and its loader calls
``torch.load(..., weights_only=False)``: whoever can write to a run's ``storage_path`` (an object
store bucket on a cluster) could run code on every training worker that resumes from it. This
module writes the same training state as safetensors (tensors) and JSON (everything else), and
reads nothing else; no file of a checkpoint is ever unpickled.

A checkpoint directory (every rank writes its own files; Ray Train merges the ranks' directories):

* ``train_state.json`` (rank 0): the layout it was written with, the job's client state (step,
  data position, history), the learning-rate schedule and DeepSpeed's step counters;
* ``trainable.safetensors`` (rank 0): the trainable parameters by name, as the module holds them
  (not under ZeRO-3, whose optimizer state holds the parameters' partitions);
* ``optimizer-rank<r>.safetensors``: the state of rank ``r``'s DeepSpeed optimizer, its tensors as
  tensors and the rest (param groups, paddings, step counts) as JSON in the file's metadata;
* ``rng-rank<r>.safetensors``: rank ``r``'s torch random-number generator states, so that dropout
  continues as it would have without the interruption.

The optimizer files hold each rank's own partition (as DeepSpeed's files do), so a run resumes
with the ``num_workers``, ``zero_stage`` and precision it was written with.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FORMAT = 1
STATE_FILE = "train_state.json"
_STATE_KEYS = {"layout", "client", "lr_scheduler", "counters"}
WEIGHTS_FILE = "trainable.safetensors"
#: Entries of a DeepSpeed optimizer's state that are objects, not data; a resume keeps the live
#: optimizer's own: the loss scaler (fp16 is not offered, so it is the static scale 1 of every fresh
#: engine) and the parameter-slice map (read only by DeepSpeed's universal-checkpoint converter).
_LIVE_ENTRIES = ("loss_scaler", "param_slice_mappings")
#: The keys the JSON encoding marks tensors, tuples and dicts with non-string keys by.
_TAGS = ("__tensor__", "__tuple__", "__items__")
#: DeepSpeed's step counters (the engine's, not the optimizer's), restored as DeepSpeed's own load does.
_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class CheckpointError(RuntimeError):
    """A checkpoint that this job does not load: an old pickle-based one, a damaged one, or one of another layout."""


def optimizer_file(rank: int) -> str:
    return f"optimizer-rank{rank}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


# -- save ---------------------------------------------------------------------------------------
def save(engine, directory: str | Path, *, rank: int, world: int, client_state: dict[str, Any]) -> None:
    """Write this rank's share of the training state of a DeepSpeed ``engine`` to ``directory``.

    Every rank calls it: each writes its own optimizer partition (and ZeRO-3 gathers with the others).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _checkpoint_event(engine.optimizer):
        _write_tree(directory / optimizer_file(rank), _optimizer_state(engine.optimizer))
    _write_tree(directory / rng_file(rank), _rng_state())
    if rank != 0:
        return
    if engine.zero_optimization_stage() < 3:
        _write_tree(directory / WEIGHTS_FILE, {n: p.detach() for n, p in _trainable(engine.module).items()})
    state = {"format": FORMAT, "layout": _layout(engine, world), "client": client_state,
             "lr_scheduler": engine.lr_scheduler.state_dict(),
             "counters": {k: getattr(engine, k) for k in _COUNTERS}}
    (directory / STATE_FILE).write_text(json.dumps(_encode(state, None, STATE_FILE), indent=1) + "\n")


def _layout(engine, world: int) -> dict[str, Any]:
    """What the files depend on: the partitions follow the world size and ZeRO stage, the dtypes the precision."""
    return {"world_size": world, "zero_stage": int(engine.zero_optimization_stage()),
            "precision": "bf16" if engine.bfloat16_enabled() else "fp32", "optimizer": type(engine.optimizer).__name__}


def _trainable(module) -> dict[str, Any]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _optimizer_state(optimizer) -> dict[str, Any]:
    """The optimizer's ``state_dict`` without the objects a resume takes from the live optimizer."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False):
        raise CheckpointError("a dynamic loss scaler (fp16) cannot be checkpointed; train in fp32 or bf16")
    return {k: v for k, v in optimizer.state_dict().items() if k not in _LIVE_ENTRIES}


def _rng_state() -> dict[str, Any]:
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    state = {"cpu": torch.get_rng_state()}
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


@contextmanager
def _checkpoint_event(optimizer) -> Iterator[None]:
    """ZeRO-3 partitions every parameter before its state is read or written and gathers the persistent
    ones after, as DeepSpeed's own save and load do; the other optimizers have no such step."""
    getattr(optimizer, "checkpoint_event_prologue", lambda: None)()
    yield
    getattr(optimizer, "checkpoint_event_epilogue", lambda: None)()


# -- load ---------------------------------------------------------------------------------------
def load(engine, directory: str | Path, *, rank: int, world: int) -> dict[str, Any]:
    """Restore a DeepSpeed ``engine`` (built as the saving run built it) from ``directory``; returns the client state.

    Raises :class:`CheckpointError` for an old DeepSpeed (pickle) checkpoint, a damaged file or another layout.
    """
    import torch

    directory = Path(directory)
    state = _read_state(directory)
    if state["layout"] != _layout(engine, world):
        raise CheckpointError(f"{directory}: written with {state['layout']}, this run has {_layout(engine, world)}; "
                              "resume with the num_workers, zero_stage and precision the run started with")
    if engine.zero_optimization_stage() < 3:
        _restore_trainable(engine.module, _read_tree(directory / WEIGHTS_FILE))
    with _checkpoint_event(engine.optimizer):
        _restore_optimizer(engine.optimizer, _read_tree(directory / optimizer_file(rank)), rank, world)
    engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for k in _COUNTERS:
        setattr(engine, k, int(state["counters"][k]))
    rng = _read_tree(directory / rng_file(rank))
    torch.set_rng_state(rng["cpu"])
    if "accelerator" in rng:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_rng_state(rng["accelerator"])
    return state["client"]


def _read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.is_file():
        old = sorted(p.name for p in directory.iterdir() if p.suffix == ".pt" or p.name in ("latest", "deepspeed"))
        if old:
            raise CheckpointError(
                f"{directory}: a checkpoint of DeepSpeed's pickle format ({', '.join(old)}), which is not loaded "
                "because unpickling it can run code; start the run again under a new name (or delete this run's "
                "checkpoints) to train from the start")
        raise CheckpointError(f"{directory}: no {STATE_FILE}; not a checkpoint of this job")
    try:
        state = _decode(json.loads(path.read_text(encoding="utf-8")), {}, path)
    except (ValueError, TypeError) as e:  # not UTF-8, not JSON, or not this encoding
        raise CheckpointError(f"{path}: not a JSON training state ({e}); refusing to load it") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not _STATE_KEYS <= state.keys():
        raise CheckpointError(f"{path}: not a format-{FORMAT} training state of this job")
    return state


def _restore_trainable(module, saved: dict[str, Any]) -> None:
    """Copy in place: under ZeRO-1/2 the parameters are views of DeepSpeed's flat buffers."""
    import torch

    params = _trainable(module)
    if saved.keys() != params.keys():
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise CheckpointError(f"{WEIGHTS_FILE}: trainable parameters differ (missing {missing[:3]}, extra {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def _restore_optimizer(optimizer, saved: dict[str, Any], rank: int, world: int) -> None:
    """DeepSpeed's ZeRO optimizers read a list with one state per rank (only this rank's is read), and
    restore their fp32 master weights from it; the others read one state."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if not isinstance(optimizer, ZeROOptimizer):
        optimizer.load_state_dict(saved)
        return
    if hasattr(optimizer, "loss_scaler"):
        saved["loss_scaler"] = optimizer.loss_scaler
    optimizer.load_state_dict([saved if r == rank else None for r in range(world)],
                              load_optimizer_states=True, load_from_fp32_weights=True)


# -- safetensors + JSON ---------------------------------------------------------------------------
def _write_tree(path: Path, tree: Any) -> None:
    """Tensors into a safetensors file, the structure around them as JSON in its metadata.

    Tensors are copied (safetensors refuses views of one buffer, and ZeRO's states are such views).
    """
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    skeleton = _encode(tree, tensors, path.name)
    save_file(tensors, str(path), metadata={"clara": json.dumps(skeleton)})


def _read_tree(path: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            skeleton = json.loads((f.metadata() or {})["clara"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _decode(skeleton, tensors, path)
    except (SafetensorError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file of this job ({e!r}); refusing to load it") from None


def _encode(obj: Any, tensors: dict[str, Any] | None, where: str) -> Any:
    """JSON for plain data; tensors go to ``tensors`` (``None``: none allowed). Anything else is an error:
    there is no fallback to pickle."""
    import torch

    if isinstance(obj, torch.Tensor) and tensors is not None:
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().clone(memory_format=torch.contiguous_format)
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)  # an IntEnum (DeepSpeed's ZeRO stage) is stored as its value
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not set(_TAGS) & set(obj):
            return {k: _encode(v, tensors, where) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, where)] for k, v in obj.items()]}
    raise CheckpointError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not plain data and "
                          "would need pickle; this configuration cannot be checkpointed")


def _decode(obj: Any, tensors: dict[str, Any], where: Path) -> Any:
    """The inverse of :func:`_encode`: it builds only dicts, lists, tuples, scalars and the file's tensors."""
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and next(iter(obj)) in _TAGS:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"{where}: names a tensor {value!r} the file does not hold")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors, where) for v in value)
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}
