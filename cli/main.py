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
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import rich_click as click

from compress.results import check_results_root
from jobs import lease
from jobs.cli import (
    USER_ERRORS,
    Cli,
    echo_submitted,
    executor_options,
    fail,
    job_inputs,
    open_executor,
    run_here,
    spec_from_options,
    spec_options,
    wait_for,
)
from jobs.runs import check_run, run_dir
from jobs.slurm_jobs import setup_logging
from jobs.slurm_options import DEFAULT_FOLDER, ExecutorOptions, render_sbatch
from jobs.specs import PruneSpec, PTQSpec, TrainSpec
from jobs.tune_cmd import tune

# bad input of every kind (specs, data, weights, a run of another spec, a busy run) is a ValueError
RUN_STATES = {"new": "new run", "resumes": "resuming where it stopped", "finished": "already finished"}


def _build_spec(cls: type, options: dict[str, Any]):
    try:
        return spec_from_options(cls, options).with_defaults()
    except ValueError as e:
        fail(str(e))


def _preflight(spec: Any, download: bool = False,
               executor: ExecutorOptions | None = None) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Check what a user can get wrong before anything is written: data, model and weights must load and fit.

    The model is built here (a user's factory imported, a timm name looked up), its output width
    checked against the data's classes, and a prune spec's kept-dense names and budget against its
    layers. With ``download``, CIFAR-10 is fetched into the data root first (here, so a SLURM job
    finds it). The device is checked where the job runs (``executor``: on SLURM by the node, here by
    this process). Returns the (training, test) sizes and the image shape.
    """
    from jobs.inputs import check_job

    try:
        data, model = check_job(spec, download, executor)
        # state.prev.pt and state.pt (weights, optimizer moments, masks) while a new one is written, then final.pt
        param_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        check_results_root(spec.results, 10 * param_bytes + 2**20)
    except USER_ERRORS as e:
        fail(str(e))
    return (len(data.train), len(data.test)), data.image_shape


def _seed_specs(cls: type, options: dict[str, Any], seeds: str) -> list[Any]:
    """One spec per seed of ``--seeds 0,1,2`` (a given ``--run-id`` gets ``-s<seed>``), else one spec."""
    if not seeds:
        return [_build_spec(cls, options)]
    try:
        values = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"seeds={seeds!r} is invalid: use comma-separated integers, e.g. 0,1,2")
    if not values or len(set(values)) != len(values):
        fail(f"seeds={seeds!r} is invalid: give distinct seeds, e.g. 0,1,2")
    run_id = options.get("run_id") or ""
    return [_build_spec(cls, {**options, "seed": s, "run_id": f"{run_id}-s{s}" if run_id else ""}) for s in values]


def _given_on_command_line(options: dict[str, Any]) -> set[str]:
    """The options the user typed (not defaults, not environment variables)."""
    ctx = click.get_current_context()
    return {k for k in options if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}


def _closest(name: str, known: list[str]) -> list[str]:
    """Up to three known run ids that look like ``name`` (for a typo's error line)."""
    import difflib

    return difflib.get_close_matches(name, known, n=3, cutoff=0.5)


def _from_run(options: dict[str, Any], run: str) -> dict[str, Any]:
    """Options for a job that consumes a run's model: ``--run ID`` (its final.pt), or ``--weights`` of a run's file.

    The model (string and arguments), the data (source, image size, normalisation) and the data root
    come from that run's spec.json unless given on the command line (the data root only while that
    folder exists; else $COMPRESS_DATA as usual).
    """
    from compress.results import default_root

    results = Path(options.get("results") or default_root())
    if run:
        final = results / "runs" / run / "final.pt"
        if not final.is_file():
            known = sorted(p.parent.name for p in results.glob("runs/*/final.pt"))
            close = _closest(run, known)
            fail(f"no finished run {run!r} under {results}/runs (a run has final.pt once it finished)" +
                 (f"; the closest: {', '.join(close)}" if close else ""))
        if options.get("weights"):
            fail("--run and --weights both name the starting model: give one")
        options = {**options, "weights": str(final)}
    weights = Path(options.get("weights") or "")
    source = weights.parent / "spec.json" if weights.name else None
    if source is None or not source.is_file():
        return options
    stored = json.loads(source.read_text())
    given = _given_on_command_line(options)
    out = dict(options)
    for name in ("model", "model_args", "data", "image_size", "data_mean", "data_std"):  # what built the model
        if name in options and name not in given and stored.get(name):
            value = stored[name]
            out[name] = ",".join(map(str, value)) if isinstance(value, list) else value
    if "data_root" not in given and stored.get("data_root") and Path(stored["data_root"]).exists():
        out["data_root"] = stored["data_root"]
    return out


def _resume_specs(cls: type, ids: str, options: dict[str, Any]) -> list[Any]:
    """The stored specs of ``--resume a,b``: an id not under the results root is refused, with the closest ones.

    Spec options given on the command line must agree with the stored spec (a resumed run keeps it).
    """
    from compress.results import default_root

    results = Path(options.get("results") or default_root())
    known = sorted(p.parent.name for p in results.glob("runs/*/spec.json"))
    given = _given_on_command_line(options)
    specs = []
    for run_id in [r.strip() for r in ids.split(",") if r.strip()]:
        if run_id not in known:
            close = _closest(run_id, known)
            fail(f"no run {run_id!r} under {results}/runs to resume" +
                 (f"; the closest: {', '.join(close)}" if close else f" ({len(known)} run(s) there)"))
        stored = json.loads((results / "runs" / run_id / "spec.json").read_text())
        kind = cls.__name__.removesuffix("Spec").lower()
        # A run started by an older version lacks the fields added since: those take their defaults,
        # which is what that version did. Fields this kind does not have mean another kind of run.
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n in fields.keys() - set(stored)
                   if fields[n].default is dataclasses.MISSING and fields[n].default_factory is dataclasses.MISSING]
        if set(stored) - fields.keys() or missing:
            fail(f"run {run_id} is not a {kind} run (its spec.json has other fields): resume it with the command "
                 f"that started it")
        try:
            spec = spec_from_options(cls, {**stored, "results": str(results)})
        except (TypeError, ValueError) as e:
            fail(f"run {run_id}'s spec.json cannot be read back: {e}")
        differs = [f"--{k.replace('_', '-')}" for k in sorted(given - {"results", "run_id"})
                   if k in stored and spec_from_options(cls, {**stored, k: options[k]}) != spec]
        if differs:
            fail(f"{', '.join(differs)} differ(s) from run {run_id}'s spec: a resumed run keeps its spec "
                 f"(start a new run with another --run-id to change it)")
        specs.append(spec)
    return specs


def _new_specs(cls: type, options: dict[str, Any], seeds: str, resume: str, run: str) -> list[Any]:
    """The specs a prune/train command runs: resumed ones, or new ones whose run ids are not taken yet."""
    if resume:
        if seeds or options.get("run_id") or run:
            fail("--resume takes the run ids to resume (comma-separated); --seeds, --run-id and --run do not go "
                 "with it")
        return _resume_specs(cls, resume, options)
    specs = _seed_specs(cls, _from_run(options, run), seeds)
    for spec in specs:
        try:
            state = check_run(spec)
        except USER_ERRORS as e:
            fail(str(e))
        if state != "new":
            fail(f"run {spec.run_id} already exists under {spec.results} ({RUN_STATES[state]}): resume it with "
                 f"--resume {spec.run_id}, or choose another --run-id")
    return specs


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


def _plan_line(spec: Any, data: tuple[tuple[int, int], tuple[int, int, int]]) -> str:
    """What a new local run is about to do and roughly how long it takes on this machine."""
    from jobs.training import estimate_seconds

    seconds, how = estimate_seconds(spec, *data)
    line = f"plan: about {_duration(seconds)} here ({how})"
    if seconds > 3600:
        line += "; Ctrl-C stops it at the last finished epoch, --resume continues; --partition runs it on SLURM"
    return line


def _echo_summary(summary: dict[str, Any]) -> None:
    click.echo(summary["table"])
    click.echo(f"final: top-1 {summary['top1']:.2f}% (start {summary['dense_top1']:.2f}%), "
               f"sparsity {100 * summary['sparsity']:.2f}%, checkpoint {summary['checkpoint']}")


def _run(specs: list[Any], fn: Any, dry_run: bool, executor: ExecutorOptions, download: bool = False) -> None:
    if dry_run:
        for spec in specs:
            click.echo(json.dumps(dataclasses.asdict(spec), indent=2))
        if not executor.local:
            click.echo(render_sbatch(executor))
        return
    sizes = _preflight(specs[0], download, executor)
    try:
        states = [check_run(spec) for spec in specs]  # another spec's run under this id: refused before anything
    except USER_ERRORS as e:
        fail(str(e))
    ex = open_executor(executor, shared=sorted({s.results for s in specs}), inputs=job_inputs(specs))
    if ex.local:
        for spec, state in zip(specs, states, strict=True):
            click.echo(f"run {spec.run_id} ({RUN_STATES[state]}): results under {spec.results}/")
            if state == "new":
                click.echo(_plan_line(spec, sizes))
            resume = f"python -m jobs.launch {spec.kind()} --resume {spec.run_id} --results {spec.results}"
            summary = run_here(lambda spec=spec: ex.submit(fn, spec).result(),
                               f"the run stopped at its last saved epoch: once the cause is gone, resume with: "
                               f"{resume}",
                               f"run {spec.run_id} keeps its last saved epoch (the one in flight is redone); resume "
                               f"with: {resume}")
            _echo_summary(summary)
        return
    tokens: list[tuple[Path, str]] = []
    try:
        for spec in specs:  # each run's lease, before sbatch: a second submission of one run id is refused here
            tokens.append((run_dir(spec), lease.claim(run_dir(spec))))
        claims = [t for _, t in tokens]
        nones = [None] * len(specs)
        jobs = (ex.map_array(fn, specs, nones, nones, claims) if len(specs) > 1
                else [ex.submit(fn, specs[0], None, None, claims[0])])
    except BaseException as e:
        for folder, token in tokens:
            lease.release(folder, token)
        if isinstance(e, USER_ERRORS):
            fail(str(e))
        raise
    for job, (folder, token) in zip(jobs, tokens, strict=True):
        lease.hand_over(folder, token, job.job_id)
    echo_submitted(jobs, [f"run {s.run_id} ({RUN_STATES[st]})" for s, st in zip(specs, states, strict=True)],
                   executor.folder)
    if executor.wait:
        wait_for(jobs, _echo_summary)


@click.group(cls=Cli)
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def cli(verbose: bool) -> None:
    """Compress CIFAR ResNets: prune, retrain and quantize as resumable jobs."""
    setup_logging(sys.stderr, logging.DEBUG if verbose else logging.INFO)


SEEDS_HELP = "comma-separated seeds: one run per seed (one job array on SLURM); overrides --seed"
resume_option = click.option(
    "--resume", default="", panel="Run",
    help="continue these runs (comma-separated run ids under --results) with their own stored specs; without "
         "it, a --run-id that exists is refused")
run_option = click.option(
    "--run", default="", panel="Run",
    help="start from this finished run's final model (instead of --weights), with its model and data root "
         "unless given")
download_option = click.option(
    "--download", is_flag=True, panel="Run",
    help="fetch CIFAR-10 (python version, 163 MB, checksum-verified by torchvision) into --data-root when it "
         "holds neither layout")


def _schedule_command(spec_cls: type, job: str) -> Any:
    """The options and body prune and train share: spec fields, seeds, SLURM, resume, --run, download, dry run."""

    def decorate(fn: Any) -> Any:
        @spec_options(spec_cls)
        @click.option("--seeds", default="", help=SEEDS_HELP, panel="Run")
        @executor_options
        @resume_option
        @run_option
        @download_option
        @click.option("--dry-run", is_flag=True, help="print the spec (and the sbatch script) and exit", panel="Run")
        @functools.wraps(fn)
        def command(dry_run: bool, download: bool, resume: str, run: str, seeds: str, executor: ExecutorOptions,
                    **options: Any) -> None:
            specs = _new_specs(spec_cls, options, seeds, resume, run)
            import jobs.training  # the job (and torch) loads when the command runs, not for --help

            _run(specs, getattr(jobs.training, job), dry_run, executor, download)

        return command

    return decorate


@cli.command()
@_schedule_command(PruneSpec, "run_prune")
def prune() -> None:
    """Run a prune/retrain schedule (BN-gamma filters once, then global L1 magnitude phases)."""


@cli.command()
@_schedule_command(TrainSpec, "run_train")
def train() -> None:
    """Train a dense model (from scratch, or fine-tune --weights)."""


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
    run_targets = [t for t in targets if (root / "runs" / t).is_dir()]
    job_targets = [t for t in targets if t not in run_targets]
    runs = [inspect_run(root / "runs" / t) for t in run_targets] if targets else inspect_runs(root, last)
    searches = inspect_searches(runs) if not targets else []
    jobs: list[Any] = []
    if job_targets or (not targets and Path(folder).is_dir()):
        try:
            jobs = inspect_jobs(job_targets, folder, 0 if job_targets else last)
        except FileNotFoundError as e:
            fail(f"{e}; and no run of that id under {root}/runs" if job_targets else str(e))
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

EXPORT_HELP = ("which row to export: best (highest int8 top-1), smallest (smallest .pt2pack), max-drop=PP "
               "(within PP points of float) and COLUMN=VALUE filters, comma-separated, e.g. max-drop=0.3,smallest")


def _export(spec: Any) -> None:
    """Run an export in this process and print what it chose and wrote; a user error is one line, exit 2."""
    from jobs.export import run_export

    try:
        out = run_export(spec)
    except USER_ERRORS as e:
        fail(str(e))
    click.echo(f"export {out['run_id']}: {out['reason']}")
    for w in out["warnings"]:
        click.echo(f"warning: {w}", err=True)
    for f in out["files"]:
        click.echo(f"  {f['path']}  {f['bytes']:,} B  top-1 {f['top1']:.2f}% (read back: same predictions)  "
                   f"manifest {f['path']}.json")


@cli.command()
@click.argument("run")
@click.option("--select", "select", default="best", show_default=True, help=EXPORT_HELP)
@click.option("--results", default="", help="results root [default: $COMPRESS_RESULTS or results]")
@click.option("--data-root", default="", help="CIFAR-10 root [default: the run's own, else $COMPRESS_DATA]")
@click.option("--device", default="auto", show_default=True, help="where calibration runs (int8 is CPU-only)")
def export(run: str, select: str, results: str, data_root: str, device: str) -> None:
    """Write the model RUN chose as files to deploy: its int8 program (.pt2pack, packed small, and .pt2), or
    the packed sparse float model.

    RUN is a PTQ run (one row is chosen with --select and rebuilt) or a prune/train run (its final
    model, packed). Each file gets a JSON manifest with its sha256 and expected top-1, and is read
    back and checked image by image before the command returns. Beside a .pt2pack goes pt2pack.py,
    its loader, which needs torch and torchao only.
    """
    from compress.results import default_root
    from jobs.export import plan_export
    from jobs.specs import ExportSpec

    try:
        spec = ExportSpec(run=run, select=select, results=results or default_root(),
                          data_root=data_root or os.environ.get("COMPRESS_DATA", ""), device=device)
        plan_export(spec)  # unknown run, bad selector, nothing matching: one line before any work
    except ValueError as e:
        fail(str(e))
    _export(spec)


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


@cli.command()
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

    specs = _seed_specs(PTQSpec, _from_run(options, run), seeds)
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
    if dry_run:
        click.echo(json.dumps(dataclasses.asdict(spec), indent=2))
        names = [t.task_name() if len(specs) == 1 else f"{t.run_id}/{t.task_name()}" for t in tasks]
        click.echo(f"{len(tasks)} task(s): {', '.join(names)}")
        if not executor.local:
            click.echo(render_sbatch(executor))
        return
    try:
        check_job(spec, download, executor)
        check_results_root(spec.results, 2**20)
    except USER_ERRORS as e:
        fail(str(e))
    ex = open_executor(executor, shared=[spec.results], inputs=job_inputs(specs))
    click.echo(f"run{'s' if len(specs) > 1 else ''} {', '.join(s.run_id for s in specs)}: {len(tasks)} task(s), "
               f"results under {spec.results}/ptq/")

    def echo(summary: dict[str, Any] | list[dict[str, Any]]) -> None:
        for one in summary if isinstance(summary, list) else [summary]:
            click.echo(f"task {one['task']} -> {one['path']}")
            click.echo(format_rows(one["rows"]))

    if ex.local:
        jobs = run_here(lambda: ex.map_array(run_ptq, tasks), "run the same command again once the cause is gone",
                        "the tasks that finished keep their rows; the same command redoes the rest")
        for job in jobs:
            echo(job.result())
        if export_spec is not None:
            _export(export_spec)
        return
    chunks = [tasks[i:i + tasks_per_job] for i in range(0, len(tasks), tasks_per_job)]
    jobs = ex.map_array(run_ptq_tasks, chunks) if tasks_per_job > 1 else ex.map_array(run_ptq, tasks)
    echo_submitted(jobs, [f"task {', '.join(t.task_name() for t in c)}" for c in chunks], executor.folder)
    if executor.wait:
        wait_for(jobs, echo)
        if export_spec is not None:
            _export(export_spec)
    elif export_spec is not None:
        click.echo(f"export when done: python -m jobs.launch export {spec.run_id} --select '{export_select}' "
                   f"--results {spec.results}")


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
    from compress.results import default_root
    from jobs.lease import live_leases
    from jobs.runs import settled
    from jobs.tables import TABLES

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


cli.add_command(tune)

if __name__ == "__main__":
    cli()
