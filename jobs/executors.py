"""Where a job runs: in this process (no ``--partition``) or on SLURM through submitit.

Launchers build a spec, build an executor with ``build_executor`` and submit one module-level job
function; the same function runs in-process, on SLURM and inside a Ray trial.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class FinishedJob:
    """A job that ran in this process: the same ``job_id``/``result()``/``state`` surface as submitit's."""

    job_id: str
    value: Any

    @property
    def state(self) -> str:
        return "COMPLETED"

    def result(self) -> Any:
        return self.value

    def done(self) -> bool:
        return True


class LocalExecutor:
    """Runs submitted functions right here, one after another (the no-cluster default)."""

    folder = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FinishedJob:
        import os

        return FinishedJob(f"local-{os.getpid()}", fn(*args, **kwargs))

    def map_array(self, fn: Callable[..., Any], *iterables: Sequence[Any]) -> list[FinishedJob]:
        return [self.submit(fn, *args) for args in zip(*iterables, strict=True)]


def build_executor(partition: str | None = None, **options: Any) -> LocalExecutor:
    """An executor for the launch options; no partition means this machine."""
    if partition:
        raise NotImplementedError("SLURM submission is not wired up yet")
    return LocalExecutor()
