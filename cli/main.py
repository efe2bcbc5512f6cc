"""Command-line launcher for the compression jobs.

    python -m jobs.launch prune --weights W --data-root D --phases 2 --epochs 1 --final-sparsity 0.5
    python -m jobs.launch train --data-root D --epochs 30
    python -m jobs.launch prune ... --dry-run          # print the spec, run nothing
    python -m jobs.launch prune ... --partition gpu --gpus 1 --time 2:00:00   # one SLURM job
    python -m jobs.launch prune ... --seeds 0,1,2 --partition gpu             # one SLURM job array
    python -m jobs.launch status [JOB_ID|JOB_FOLDER ...]                      # state, progress, log
    python -m jobs.launch ptq --weights W --calib-sizes 1000,10000 --alphas 0.95:1.0:0.01  # int8 sweep
    python -m jobs.launch report results --out results/report                # tables and plots, offline
    python -m jobs.launch export RUN_ID --select max-drop=0.3,smallest       # files to deploy, with manifests
    python -m jobs.launch results compact --results results                  # merge a sweep's small files

Without ``--partition`` the job runs in this process on this machine; with it, it goes to SLURM
through submitit (``jobs/executors.py``, ``slurm/README.md``) and requeues itself on preemption.
Every option maps onto one field of the job's spec (``jobs/specs.py``) or of ``ExecutorOptions``;
a bad value is one line on stderr and exit code 2, before anything is submitted or written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import rich_click as click

from cli.options import USER_ERRORS, Cli, executor_options, fail
from cli.ptq import EXPORT_HELP, EXPORT_STOPPED, echo_export, ptq
from cli.schedule import prune, train
from cli.submit import Work, submit
from cli.tune import tune
from compress.results import RUNS, run_folder
from jobs.slurm_jobs import setup_logging
from jobs.slurm_options import DEFAULT_FOLDER, ExecutorOptions

# bad input of every kind (specs, data, weights, a run of another spec, a busy run) is a ValueError


@click.group(cls=Cli)
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def cli(verbose: bool) -> None:
    """Compress CIFAR ResNets: prune, retrain and quantize as resumable jobs."""
    setup_logging(sys.stderr, logging.DEBUG if verbose else logging.INFO)


@cli.command()
@click.argument("targets", nargs=-1)
@click.option("--results", default="", help="results root whose runs to show [default: $COMPRESS_RESULTS or results]")
@click.option("--folder", default=DEFAULT_FOLDER, show_default=True, help="the --folder the jobs were launched with")
@click.option("--last", default=20, show_default=True, help="without targets: the newest N runs and jobs (0: all)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per run, search and job instead of tables")
def status(targets: tuple[str, ...], results: str, folder: str, last: int, as_json: bool) -> None:
    """Runs, searches and SLURM jobs: state, phase/epoch, top-1, owner; by run id, job id or job folder.

    Runs come from the results root (wherever they ran: here, on SLURM, in a Ray search), jobs from
    the SLURM job folder. A failed job's error line is shown under it; its traceback is in its log.
    """
    from compress.results import default_root
    from jobs.runs import format_runs, format_searches, inspect_run, inspect_runs, inspect_searches
    from jobs.slurm_jobs import format_reports, inspect_jobs

    root = Path(results or default_root())
    run_targets = [t for t in targets if run_folder(root, t).is_dir()]
    job_targets = [t for t in targets if t not in run_targets]
    runs = [inspect_run(run_folder(root, t)) for t in run_targets] if targets else inspect_runs(root, last)
    searches = inspect_searches(runs) if not targets else []
    jobs: list[Any] = []
    if job_targets or (not targets and Path(folder).is_dir()):
        try:
            jobs = inspect_jobs(job_targets, folder, 0 if job_targets else last)
        except FileNotFoundError as e:
            fail(f"{e}; and no run of that id under {root}/{RUNS}" if job_targets else str(e))
    if as_json:
        for kind, items in (("run", runs), ("search", searches), ("job", jobs)):
            for item in items:
                click.echo(json.dumps({"type": kind, **dataclasses.asdict(item)}, default=str))
        return
    sections = [fmt(items) for fmt, items in ((format_runs, runs), (format_searches, searches),
                                              (format_reports, jobs)) if items]
    click.echo("\n\n".join(sections) if sections else f"no runs under {root} and no SLURM jobs under {folder}")


@cli.command()
@click.argument("results", required=False, default="")
@click.option("--out", default="", help="report folder (report.md + PNGs) [default: RESULTS/report]")
@click.option("--run", "runs", multiple=True, help="run id or shell pattern, e.g. 'prune-2025*' (repeatable)")
@click.option("--search", "searches", multiple=True, help="search id or shell pattern (repeatable)")
@click.option("--model", "models", multiple=True, help="model string, e.g. resnet20a or timm:resnet18 (repeatable)")
@click.option("--kind", "kinds", multiple=True, help="row kind: prune, train, ptq (repeatable)")
@click.option("--max-drop", default=1.5, show_default=True,
              help="the prune searches' --max-drop, to rank their trials by the same objective")
@click.option("--data-root", default="",
              help="CIFAR-10 root, for the test labels of the intervals and p-values [default: $COMPRESS_DATA; "
                   "neither: no intervals]")
@click.option("--data", "data", default="cifar10", show_default=True,
              help="the rows' data, for the test labels: cifar10, imagefolder:ROOT or package.module:function "
                   "(rows of other data get no intervals)")
@click.option("--image-size", default=0, show_default=True, help="an image folder's --image-size")
def report(results: str, out: str, runs: tuple[str, ...], searches: tuple[str, ...], models: tuple[str, ...],
           kinds: tuple[str, ...], max_drop: float, data_root: str, data: str, image_size: int) -> None:
    """Markdown report with PNG plots from the Parquet results under RESULTS (default $COMPRESS_RESULTS or results).

    Reads only the tables, so a results folder copied off the cluster is enough; with the test labels
    (--data-root) every top-1 gets a 95% interval and compared models a McNemar p-value.
    """
    from analysis.report import Filters, ReportError, build_report
    from compress.results import default_root
    from jobs.specs import TuneSpec, spec_defaults
    from sweeps.search import prune_score

    results = results or default_root()
    if max_drop < 0:
        fail(f"max_drop={max_drop!r} is invalid: must be >= 0")
    labels = None
    if data != "cifar10" or data_root or os.environ.get("COMPRESS_DATA"):
        from compress.datasets import load_test_labels_for

        try:
            labels = load_test_labels_for(data, data_root or None, image_size)
        except ValueError as e:
            fail(str(e))
    try:
        written = build_report(results, out or str(Path(results) / "report"),
                               Filters(runs=runs, searches=searches, models=models, kinds=kinds), max_drop,
                               spec_defaults(), lambda row: prune_score(row, TuneSpec(max_drop=max_drop)), labels)
    except ReportError as e:
        fail(str(e))
    for line in written.summary:
        click.echo(line)

@cli.command()
@click.argument("run")
@click.option("--select", "select", default="best", show_default=True, help=EXPORT_HELP)
@click.option("--results", default="", help="results root [default: $COMPRESS_RESULTS or results]")
@click.option("--data-root", default="", help="CIFAR-10 root [default: the run's own, else $COMPRESS_DATA]")
@click.option("--device", default="auto", show_default=True, help="where calibration runs (int8 is CPU-only)")
@executor_options
@click.option("--dry-run", is_flag=True, help="print the export's spec (and the sbatch script) and exit",
              panel="Run")
def export(run: str, select: str, results: str, data_root: str, device: str, executor: ExecutorOptions,
           dry_run: bool) -> None:
    """Write the model RUN chose as files to deploy: its int8 program (.pt2pack, packed small, and .pt2), or
    the packed sparse float model.

    RUN is a PTQ run (one row is chosen with --select and rebuilt) or a prune/train run (its final
    model, packed). Each file gets a JSON manifest with its sha256 and expected top-1, and is read
    back and checked image by image before the command returns. Beside a .pt2pack goes pt2pack.py,
    its loader, which needs torch and torchao only.
    """
    from compress.results import default_root
    from jobs.export import plan_export
    from jobs.export import run_export as export_job
    from jobs.specs import ExportSpec

    try:
        spec = ExportSpec(run=run, select=select, results=results or default_root(),
                          data_root=data_root or os.environ.get("COMPRESS_DATA", ""), device=device)
    except ValueError as e:
        fail(str(e))
    # unknown run, bad selector, nothing matching: one line before any work
    work = Work(fn=export_job, args=[(spec,)], labels=lambda: [f"export of {spec.run}"],
                shown=[dataclasses.asdict(spec)], echo=echo_export, shared=[spec.results], inputs=[],
                redo=EXPORT_STOPPED[0], interrupted=EXPORT_STOPPED[1])
    submit(work, executor, dry_run, lambda: plan_export(spec))


@cli.command()
@click.argument("artifact")
@click.option("--data-root", default="", help="CIFAR-10 root [default: the manifest's spec, else $COMPRESS_DATA]")
def verify(artifact: str, data_root: str) -> None:
    """Check an exported file against its manifest: sha256, then top-1 and every prediction on the test set.

    Exit 0 when the file reproduces the manifest exactly, 1 when it loads but predicts differently,
    2 when it cannot be checked (damaged, truncated, no manifest, no data).
    """
    from jobs.export import verify_artifact

    try:
        out = verify_artifact(artifact, data_root or os.environ.get("COMPRESS_DATA", ""))
    except USER_ERRORS as e:
        fail(str(e))
    verdict = "ok" if out["ok"] else "MISMATCH"
    click.echo(f"{verdict}: {out['path']} ({out['kind']}) top-1 {out['top1']:.2f}% on {out['images']:,} images, "
               f"manifest {out['expected_top1']:.2f}%, "
               f"{'same' if out['same_predictions'] else 'different'} predictions")
    if not out["ok"]:
        raise click.exceptions.Exit(1)


@cli.group(name="results")
def results_group() -> None:
    """Upkeep of a results root: merge the small Parquet files of a sweep (compact)."""


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@results_group.command(name="compact")
@click.option("--results", "root", default="", help="results root [default: $COMPRESS_RESULTS or results]")
@click.option("--max-mb", default=64, show_default=True, type=click.IntRange(min=1),
              help="input MB merged into one compact file")
@click.option("--dry-run", is_flag=True, help="say what would be merged; change nothing")
def results_compact(root: str, max_mb: int, dry_run: bool) -> None:
    """Merge each table's small Parquet files into compact-<time>-<k>.parquet files (compress/compact.py).

    Rows are the same before and after, and read once at every moment; a crash midway loses nothing
    and the next run finishes it. Refused while a run under the root has a live lease (a job may
    still write there). Merged: PTQ task files, and the phase/epoch/module rows of runs that will
    not write them again (finished, or phases they have moved past).
    """
    from compress.compact import CompactBusy, CompactError, compact_results
    from compress.results import TABLES, default_root
    from jobs.lease import live_leases
    from jobs.runs import settled

    path = Path(root or default_root())
    if not path.is_dir():
        fail(f"results root {path} does not exist")
    live = live_leases(path)
    if live:
        run_id, held, why = live[0]
        more = f" (and {len(live) - 1} more run(s))" if len(live) > 1 else ""
        line = (f"results root {path} is in use: run {run_id} is held by {held.get('owner')} ({why}){more}; "
                f"compact when no job writes there")
        if not dry_run:
            fail(line)
        click.echo(f"note: {line}")
    try:
        done = compact_results(path, TABLES, settled(path), max_mb * 10**6, dry_run)
    except (CompactBusy, CompactError) as e:
        fail(str(e))
    for t in done:
        click.echo(f"{t.table}: {t.files_before} -> {t.files_after} files, {t.rows:,} rows, "
                   f"{_mb(t.bytes_before)} -> {'~' if dry_run else ''}{_mb(t.bytes_after)}, {t.seconds:.2f} s"
                   + (f" ({t.leftovers} leftover(s) of a stopped compaction removed)" if t.leftovers else "")
                   + (" [dry run]" if dry_run else ""))
    if not done:
        click.echo(f"no result tables under {path}")


for command in (prune, train, ptq, tune):
    cli.add_command(command)

if __name__ == "__main__":
    cli()
