"""Fixtures for tests that run on a real local Ray: one Ray session for the whole test run."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 logical CPUs, started once per test session (4-6 s, ~460 MB).

    Actors in tests ask for fractional CPUs: two actors at num_cpus=1 plus a read task deadlock
    on 2 CPUs.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
