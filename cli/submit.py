"""The one way every command sends work out: dry run, checks, executor, then here or on SLURM, then wait.

``submit`` takes the calls a command makes (one function, one argument tuple per job) and does the
same steps for prune, train, ptq and tune:

1. ``--dry-run``: print what would run (and the sbatch script with ``--partition``), nothing else;
2. the command's checks (data, model, weights, results root, run ids): a bad input is one line,
   exit 2, before anything is submitted or written;
3. the executor (here, or SLURM with its partition, nodes and shared folders checked);
4. here: each call in this process (``run_here``: one line and exit 1 for a failed write, 130 for
   Ctrl-C, with what was kept and how to carry on); on SLURM: each run folder's lease claimed
   before sbatch (a second submission of one run is refused; a prune/train job takes its run's lease
   over, a PTQ sweep's runs stay leased to its array while any task of it runs), the calls as one job or
   one job array, the leases handed to the jobs, and with ``--wait`` each job's result or error;
5. the command's own step after the work (``then``: PTQ's export), once the results exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rich_click as click

from cli.options import USER_ERRORS, echo_submitted, fail, open_executor, run_here, wait_for
from jobs import lease
from jobs.slurm_options import ExecutorOptions, render_sbatch


@dataclass
class Work:
    """What a command submits: ``fn(*args)`` per job, a label per job, and how to show and check it."""

    fn: Callable[..., Any]
    args: list[tuple[Any, ...]]
    labels: Callable[[], list[str]]  # a line per job, known once the checks ran
    shown: list[dict[str, Any]]  # printed by --dry-run (specs as dicts)
    echo: Callable[[Any], None]  # one job's result, when it is known
    shared: Sequence[str]  # folders every node must see (results roots)
    inputs: Sequence[tuple[str, str]]  # files a job reads (data, weights), checked on a node
    # run folders leased before sbatch: with ``claims`` one per job, whose claim token is its last argument
    # (the job takes the lease over); else the whole submission's, held by its (first) job array
    leases: Sequence[Path] = ()
    claims: bool = True
    redo: str = "run the same command again once the cause is gone"  # after a failed write here
    interrupted: str = "what finished is kept; the same command redoes the rest"  # after Ctrl-C here
    spans_nodes: bool = False  # a search may use several nodes
    dry_lines: list[str] = field(default_factory=list)  # more --dry-run lines (PTQ's task list)
    before: Callable[[int], None] | None = None  # here, before the i-th call (what it is about to do)
    here: Callable[[], Any] | None = None  # here, instead of the calls (a search handles its own errors)
    per_call_text: Callable[[int], tuple[str, str]] | None = None  # here: (redo, interrupted) of the i-th call
    announce: str = ""  # printed once the executor is open, before any work
    array: bool = False  # a job array even for one job (PTQ: its tasks' job ids stay array ids)


def submit(work: Work, executor: ExecutorOptions, dry_run: bool, check: Callable[[], None],
           then: Callable[[], None] | None = None, not_waiting: str = "") -> None:
    """Run ``work`` here or on SLURM, after ``check``; ``then`` once its results exist (see the module docstring)."""
    if dry_run:
        for shown in work.shown:
            click.echo(json.dumps(shown, indent=2))
        for line in work.dry_lines:
            click.echo(line)
        if not executor.local:
            click.echo(render_sbatch(executor))
        return
    try:
        check()
    except USER_ERRORS as e:
        fail(str(e))
    ex = open_executor(executor, spans_nodes=work.spans_nodes, shared=list(work.shared), inputs=list(work.inputs))
    if work.announce:
        click.echo(work.announce)
    if ex.local:
        _here(work, ex)
        if then is not None:
            then()
        return
    jobs = _to_slurm(work, ex)
    echo_submitted(jobs, work.labels(), executor.folder)
    if executor.wait:
        wait_for(jobs, work.echo)
        if then is not None:
            then()
    elif not_waiting:
        click.echo(not_waiting)


def _here(work: Work, ex: Any) -> None:
    if work.here is not None:
        work.echo(work.here())
        return
    for i, args in enumerate(work.args):
        if work.before is not None:
            work.before(i)
        redo, interrupted = work.per_call_text(i) if work.per_call_text else (work.redo, work.interrupted)
        work.echo(run_here(lambda args=args: ex.submit(work.fn, *args).result(), redo, interrupted))


def _to_slurm(work: Work, ex: Any) -> list[Any]:
    """Claim the leases, submit (one job, or one array), hand the leases to the jobs; release them on failure."""
    tokens: list[tuple[Path, str]] = []
    try:
        for folder in work.leases:  # before sbatch: a second submission of one run id is refused here
            tokens.append((folder, lease.claim(folder)))
        args = [(*a, t) for a, (_, t) in zip(work.args, tokens, strict=True)] if work.claims and tokens else work.args
        jobs = (ex.map_array(work.fn, *zip(*args, strict=True)) if len(args) > 1 or work.array
                else [ex.submit(work.fn, *args[0])])
    except BaseException as e:
        for folder, token in tokens:
            lease.release(folder, token)
        if isinstance(e, USER_ERRORS):
            fail(str(e))
        raise
    # squeue -j <array id> lists every task of the array: the lease stays live while any of them runs
    owners = [job.job_id for job in jobs] if work.claims else [jobs[0].job_id.split("_")[0]] * len(tokens)
    for owner, (folder, token) in zip(owners, tokens, strict=False):
        lease.hand_over(folder, token, owner)
    return jobs
