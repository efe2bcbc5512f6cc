"""Where a job runs: in this process (no ``--partition``) or on SLURM through submitit.

    python -m jobs.launch prune ... --partition gpu --gpus 1 --time 2:00:00 --folder /shared/me/slurm-jobs
    python -m jobs.launch prune ... --seeds 0,1,2 --partition debug     # one job array, one task per seed
    python -m jobs.launch prune ... --partition gpu --dry-run           # print the sbatch script, submit nothing
    python -m jobs.launch status                                        # state, progress and log of each job

Launchers build a spec, build an executor with ``build_executor`` and submit one module-level job
function; the same function runs in-process, on SLURM and inside a Ray trial. On SLURM every
function goes out wrapped in ``jobs.slurm_jobs.Requeueable``: on preemption or when the time limit
nears, the job is requeued with the same arguments and the function resumes from its own checkpoint.

``build_executor`` checks the options (``jobs.slurm_options.ExecutorOptions``) against the cluster
(``jobs.cluster``) before anything is submitted; each failure is one ``ExecutorError`` line, which
the CLI turns into exit code 2.

The job folder (``--folder``) holds each job's sbatch script, pickled function and arguments, result
pickle and log, one sub-folder per job id. It must be on a filesystem that the submitting machine
and every compute node see (home or project space, not ``/tmp``), and so must ``--results``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.cluster import (
    check_cluster,
    check_folder,
    check_nodes_see,
    check_shared,
    cluster_partitions,
    max_array_size,
    warn_if_tmp,
)
from jobs.slurm_jobs import Requeueable
from jobs.slurm_options import ExecutorOptions, slurm_parameters


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
    local = True

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FinishedJob:
        return FinishedJob(f"local-{os.getpid()}", fn(*args, **kwargs))

    def map_array(self, fn: Callable[..., Any], *iterables: Sequence[Any]) -> list[FinishedJob]:
        return [self.submit(fn, *args) for args in zip(*iterables, strict=True)]


class SlurmExecutor:
    """Submits to SLURM through submitit; every function is wrapped to requeue and resume.

    ``submit`` sends one job; ``map_array`` sends one job array (one task per argument set, at
    most ``array_parallelism`` running at once). Both return submitit ``SlurmJob`` objects
    (``job_id``, ``state``, ``result()``, ``paths.stdout``).
    """

    local = False

    def __init__(self, options: ExecutorOptions) -> None:
        import submitit

        self.options = options
        self.folder = Path(options.folder).expanduser().resolve()
        self._executor = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=options.max_requeues)
        self._executor.update_parameters(**slurm_parameters(options))

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._executor.submit(Requeueable(fn), *args, **kwargs)

    def map_array(self, fn: Callable[..., Any], *iterables: Sequence[Any]) -> list[Any]:
        """One job array, or several when there are more tasks than the cluster's ``MaxArraySize``.

        Each array runs at most ``array_parallelism`` tasks at once (``%`` throttling), so a split
        sweep may run that many per array.
        """
        args = list(zip(*iterables, strict=True))
        size = max_array_size()
        jobs: list[Any] = []
        for start in range(0, len(args), size):
            part = args[start:start + size]
            jobs += self._executor.map_array(Requeueable(fn), *zip(*part, strict=True))
        return jobs


def build_executor(options: ExecutorOptions | None = None, shared: Sequence[str | os.PathLike] = (),
                   inputs: Sequence[tuple[str, str | os.PathLike]] = (),
                   **fields: Any) -> LocalExecutor | SlurmExecutor:
    """The executor for the launch options; no partition means this machine.

    ``fields`` override single options (``build_executor(partition="gpu", gpus=1)``). For SLURM the
    cluster is asked first (``sinfo``), the job folder and the ``shared`` results roots must be on a
    filesystem the nodes see (not in memory: ``check_shared``; seen from a node of the partition:
    ``check_nodes_see``, unless ``check_nodes`` is off, which also looks for the ``inputs``, e.g.
    ``("data_root", "/shared/cifar")``, on the node), and the job folder is created; any problem
    raises ``ExecutorError`` before anything is submitted.
    """
    options = options or ExecutorOptions()
    if fields:
        options = dataclasses.replace(options, **fields)
    if options.local:
        return LocalExecutor()
    check_cluster(options, cluster_partitions())
    folders = [("folder", options.folder), *(("results", path) for path in shared)]
    for name, path in folders:
        check_shared(name, path)
    seen = False
    if options.check_nodes:  # creates the folders and writes into each: check_folder's work, and a node's
        seen = check_nodes_see(options, folders, inputs)
    else:
        check_folder(options.folder)
    if not seen:
        for name, path in folders:
            warn_if_tmp(name, path)
    return SlurmExecutor(options)
