"""Fault injection for the failure tests: one environment variable, read in one place.

``CLARA_INJECT_FAULTS`` holds comma-separated ``name=value`` pairs::

    CLARA_INJECT_FAULTS="index.crash_after_commits=3"
    CLARA_INJECT_FAULTS="train.fail_at_step=5,train.fail_rank=-1"

* ``index.fail_after_batches``: each compression actor raises after compressing N batches (a worker
  failing part-way).
* ``index.crash_after_commits``: the index job raises right after N commits (the driver dying part-way).
* ``synth.fail_after_units``: the synth job raises right after writing N work units.
* ``train.fail_at_step``: a training worker raises once, when it is about to run step N (a marker in
  the run directory remembers it, so the restarted workers go on); ``train.fail_rank`` picks the
  worker (default -1: the last).

A job's driver reads the variable (:func:`injected`) and hands the values to its own workers, so they
reach processes that a long-running Ray cluster started before the variable was set. No flag, config
field or class of the product carries them. Unknown names and bad values are errors: a typo must not
silently turn a failure test into a passing run without a failure.
"""

from __future__ import annotations

import os

ENV = "CLARA_INJECT_FAULTS"
KNOWN: dict[str, int | None] = {
    "index.fail_after_batches": None,
    "index.crash_after_commits": None,
    "train.fail_at_step": None,
    "synth.fail_after_units": None,
    "train.fail_rank": -1,
}


class InjectedFault(RuntimeError):
    """What an injected fault raises."""


def injected(job: str) -> dict[str, int]:
    """The faults ``$CLARA_INJECT_FAULTS`` asks of ``job`` (``index``, ``synth`` or ``train``), by short name."""
    raw = os.environ.get(ENV, "").strip()
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in KNOWN:
            raise ValueError(f"{ENV}: {part!r} is not one of {', '.join(f'{k}=N' for k in KNOWN)}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{ENV}: {name} must be an integer, got {value!r}") from None
        if name.startswith(f"{job}."):
            out[name.split(".", 1)[1]] = number
    defaults = {k.split(".", 1)[1]: v for k, v in KNOWN.items() if k.startswith(f"{job}.") and v is not None}
    return {**defaults, **out} if out else {}


def failing_after(cls: type, batches: int) -> type:
    """A subclass of the Ray Data actor ``cls`` (with a ``batches`` counter) that raises once it has
    processed ``batches`` batches: the index job uses it only when a test injects the fault."""

    class FailingAfter(cls):
        def __call__(self, batch):
            if self.batches >= batches:
                raise InjectedFault(f"injected failure after {self.batches} batches (index.fail_after_batches)")
            return super().__call__(batch)

    FailingAfter.__name__ = FailingAfter.__qualname__ = f"{cls.__name__}FailingAfter{batches}"
    return FailingAfter
