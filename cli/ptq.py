"""``ptq``: a post-training int8 sweep, one task per (observer, calibration size) (``jobs/ptq.py``);
and the export step it shares with ``export``."""

from __future__ import annotations

import dataclasses
from typing import Any

import rich_click as click

from cli.options import (
    USER_ERRORS,
    executor_options,
    fail,
    given_on_command_line,
    job_inputs,
    run_here,
    spec_options,
)
from cli.schedule import download_option, run_option
from cli.submit import Work, submit
from compress.results import check_results_root, run_folder
from jobs.runs import from_run, seed_specs
from jobs.slurm_options import ExecutorOptions
from jobs.specs import PTQSpec

EXPORT_HELP = ("which row to export: best (highest int8 top-1), smallest (smallest .pt2pack), max-drop=PP "
               "(within PP points of float) and COLUMN=VALUE filters, comma-separated, e.g. max-drop=0.3,smallest")


# after a failed write, after Ctrl-C: what an export run here says
EXPORT_STOPPED = ("run the same export again once the cause is gone",
                  "the files written so far are kept; the same export writes them again")


def echo_export(out: dict[str, Any]) -> None:
    """What an export chose and wrote."""
    click.echo(f"export {out['run_id']}: {out['reason']}")
    for w in out["warnings"]:
        click.echo(f"warning: {w}", err=True)
    for f in out["files"]:
        click.echo(f"  {f['path']}  {f['bytes']:,} B  top-1 {f['top1']:.2f}% (read back: same predictions)  "
                   f"manifest {f['path']}.json")


def run_export(spec: Any) -> None:
    """Run an export in this process and print what it chose and wrote; a user error is one line, exit 2."""
    from jobs.export import run_export as export

    echo_export(run_here(lambda: export(spec), *EXPORT_STOPPED))


@click.command()
@spec_options(PTQSpec)
@click.option("--export", "export_select", default="", help=EXPORT_HELP + "; after the sweep (here, or with "
              "--wait on SLURM) [default: no export]", panel="Run")
@click.option("--seeds", default="", help="comma-separated seeds of the calibration subset: one run each "
              "(run id -s<seed>), every task of every seed in one job array on SLURM", panel="Run")
@click.option("--tasks-per-job", default=1, show_default=True, type=click.IntRange(min=1),
              help="tasks each array job runs one after another (fewer, longer jobs for large sweeps)",
              panel="SLURM")
@executor_options
@run_option
@download_option
@click.option("--dry-run", is_flag=True, help="print the spec and its tasks (and the sbatch script) and exit",
              panel="Run")
def ptq(dry_run: bool, download: bool, run: str, export_select: str, seeds: str, tasks_per_job: int,
        executor: ExecutorOptions, **options: Any) -> None:
    """Post-training int8 sweep (FX graph mode and hand-written): one task per (observer, calibration size).

    Each task calibrates once and evaluates every weight-scheme/alpha/center variant from those
    statistics; on SLURM the tasks go out as one job array. Rows: <results>/ptq/<run_id>-<task>.parquet.
    """
    # the job modules (and torch) load when a command runs, not for --help or a bad option
    from jobs.inputs import check_job
    from jobs.ptq import format_rows, plan_tasks, run_ptq, run_ptq_tasks

    try:
        specs = seed_specs(PTQSpec, from_run(options, run, given_on_command_line(options)), seeds)
    except USER_ERRORS as e:
        fail(str(e))
    spec = specs[0]
    tasks = [t for s in specs for t in plan_tasks(s)]
    export_spec = None
    if export_select and len(specs) > 1:
        fail("--export takes the rows of one run: drop --seeds, or export each run (export RUN_ID) afterwards")
    if export_select:
        from jobs.specs import ExportSpec

        try:
            export_spec = ExportSpec(run=spec.run_id, select=export_select, results=spec.results,
                                     data_root=spec.data_root, device=spec.device)
        except ValueError as e:
            fail(str(e))

    def check() -> None:
        check_job(spec, download, executor)
        check_results_root(spec.results, 2**20)

    def echo(summary: dict[str, Any] | list[dict[str, Any]]) -> None:
        for one in summary if isinstance(summary, list) else [summary]:
            click.echo(f"task {one['task']} -> {one['path']}")
            click.echo(format_rows(one["rows"]))

    here_or_one_each = executor.local or tasks_per_job == 1
    chunks = [tasks[i:i + tasks_per_job] for i in range(0, len(tasks), tasks_per_job)]
    names = [t.task_name() if len(specs) == 1 else f"{t.run_id}/{t.task_name()}" for t in tasks]
    work = Work(fn=run_ptq if here_or_one_each else run_ptq_tasks,
                args=[(t,) for t in tasks] if here_or_one_each else [(c,) for c in chunks],
                labels=lambda: [f"task {', '.join(t.task_name() for t in c)}"
                                for c in ([[t] for t in tasks] if here_or_one_each else chunks)],
                shown=[dataclasses.asdict(spec)], dry_lines=[f"{len(tasks)} task(s): {', '.join(names)}"],
                echo=echo, shared=[spec.results], inputs=job_inputs(specs), array=True,
                leases=[run_folder(s.results, s.run_id) for s in specs], claims=False,
                announce=f"run{'s' if len(specs) > 1 else ''} {', '.join(s.run_id for s in specs)}: {len(tasks)} "
                         f"task(s), results under {spec.results}/ptq/",
                interrupted="the tasks that finished keep their rows; the same command redoes the rest")
    not_waiting = (f"export when done: python -m jobs.launch export {spec.run_id} --select '{export_select}' "
                   f"--results {spec.results}" if export_spec is not None else "")
    submit(work, executor, dry_run, check, then=(lambda: run_export(export_spec)) if export_spec else None,
           not_waiting=not_waiting)
