"""The one adapter for Ray calls whose names or signatures churn between releases.

Jobs call these helpers instead of the Ray API directly, so a Ray upgrade is a change here, not in
every job. Written against Ray 2.60 (pinned in ``pyproject.toml``); older spellings are fallbacks.
"""

from __future__ import annotations

import inspect
from typing import Any


def _map_batches_params() -> set[str]:
    from ray.data import Dataset

    return set(inspect.signature(Dataset.map_batches).parameters)


def actor_pool(size: int, *, num_cpus: float | None = None, num_gpus: float | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Dataset.map_batches`` that run a callable class on a fixed pool of ``size`` actors.

    Ray >= 2.9 takes ``compute=ActorPoolStrategy(size=...)`` (``concurrency=`` is deprecated in 2.60);
    releases without ``compute=`` take ``concurrency=size``.
    """
    if size <= 0:
        raise ValueError(f"actor pool size must be positive, got {size}")
    kwargs: dict[str, Any] = {}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if num_gpus:
        kwargs["num_gpus"] = num_gpus
    if "compute" in _map_batches_params():
        from ray.data import ActorPoolStrategy

        kwargs["compute"] = ActorPoolStrategy(size=size)
    else:  # pragma: no cover - older Ray
        kwargs["concurrency"] = size
    return kwargs


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Connect to (or start) Ray unless this process already has; ``address=None`` means local or $RAY_ADDRESS."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, **init_kwargs)
