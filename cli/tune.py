"""``python -m jobs.launch tune prune|ptq``: Ray Tune searches over spec fields.

The base spec's options are the job's own (``prune --help`` / ``ptq --help``); ``--space`` entries
override fields per trial. Without ``--partition`` Ray runs on this machine; with it, the whole
search is one SLURM job that starts Ray inside its allocation, and without ``--gpus`` that job asks
for the GPUs its trials need (``--gpus-per-trial`` x ``--max-concurrent``, ``sweeps.resources.job_gpus``).

Exit codes: 2 for bad input (one line, nothing started), 1 when no trial finished (the trials are
listed, then one line says how many failed and where their errors are), 0 when a best trial exists
(failed trials, if any, are one warning line).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import rich_click as click

from cli.options import executor_options, fail, job_inputs, spec_options
from cli.submit import Work, submit
from jobs.slurm_options import ExecutorOptions
from jobs.specs import TuneSpec, spec_from_options
from sweeps.resources import check_job_gpus, job_gpus
from sweeps.search import SearchFailed, check_search, failed_line, job_kind, job_kinds, run_search


def _absolute(spec: Any) -> Any:
    """Paths made absolute: Ray trials run in their own working directories."""
    changes = {}
    for name in ("results", "data_root", "weights"):
        value = getattr(spec, name, "")
        if value and value != "pretrained":
            changes[name] = str(Path(value).expanduser().resolve())
    kind, _, root = getattr(spec, "data", "").partition(":")
    if kind == "imagefolder":
        changes["data"] = f"imagefolder:{Path(root).expanduser().resolve()}"
    return dataclasses.replace(spec, **changes)


def search_specs(kind: str, options: dict[str, Any]) -> tuple[Any, TuneSpec]:
    """(base spec, tune spec) from the parsed options; ValueError on any bad value."""
    jk = job_kind(kind)
    tune_spec = spec_from_options(TuneSpec, options)
    if not tune_spec.search_id:
        tune_spec = dataclasses.replace(tune_spec, search_id=f"tune-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    base_options = {k: v for k, v in options.items() if k not in {f.name for f in dataclasses.fields(TuneSpec)}}
    base = _absolute(spec_from_options(jk.spec_cls, base_options).with_defaults())
    check_search(kind, base, tune_spec)
    return base, tune_spec


def warn_slow_cpu_bf16(spec: Any) -> None:
    """One warning line when a search here asks for --cpu-bf16 on a CPU without bf16 kernels.

    A run says it in its own log (``run_schedule``); a trial's log is not shown here, so the search does.
    """
    if not getattr(spec, "cpu_bf16", False):
        return
    from compress.loops import cpu_bf16_warning, pick_device

    warning = cpu_bf16_warning(pick_device(spec.device))
    if warning:
        click.echo(f"warning: {warning}", err=True)


def slurm_resources(executor: ExecutorOptions, base: Any, tune_spec: TuneSpec) -> ExecutorOptions:
    """The search job's options, with ``--gpus`` derived from the trials' GPUs when it is not given.

    ``--gpus-per-trial 0.25 --max-concurrent 4`` -> ``--gpus 1``; with ``--gpus`` given, fewer GPUs than
    one trial needs is a ``ValueError`` and fewer than the trials at once a warning line.
    """
    if executor.local:
        return executor
    if executor.job_gpus:  # --gpus, or a gres=gpu:TYPE:N through --sbatch
        warning = check_job_gpus(tune_spec, base.device, executor.job_gpus, executor.nodes)
        if warning:
            click.echo(f"warning: {warning}", err=True)
        return executor
    gpus = job_gpus(tune_spec, base.device, executor.nodes)
    if gpus:
        click.echo(f"asking SLURM for --gpus {gpus} per node: {tune_spec.max_concurrent} trial(s) at once of "
                   f"{tune_spec.gpus_per_trial or 1:g} GPU each (give --gpus to choose)", err=True)
    return dataclasses.replace(executor, gpus=gpus)


def echo_summary(summary: dict[str, Any]) -> None:
    res = summary.get("trial_resources")
    at_once = (f", {res['at_once']} at once with {res['cpus']:g} CPU and {res['gpus']:g} GPU each" if res else "")
    click.echo(f"search {summary['search_id']}: {len(summary['trials'])} trials{at_once} "
               f"(Ray start {summary['ray_start_seconds']:.1f} s, search {summary['search_seconds']:.1f} s)")
    for t in sorted(summary["trials"], key=lambda t: -(t["score"] or float("-inf"))):
        status = (f"failed: {t['error']}" if t["error"] else
                  f"score {t['score']:.3f} after {t['iterations']} reports"
                  + (" (stopped early)" if t["stopped_early"] else ""))
        click.echo(f"  {t['trial_id']}: {json.dumps(t['config'])} -> {status}")
    best = summary["best"]
    if best is None:
        click.echo("no trial finished")
        return
    click.echo(f"best: {best['trial_id']} {json.dumps(best['config'])} score {best['score']:.3f} "
               f"({summary['metric']})")
    failed = failed_line(summary)
    if failed:
        click.echo(f"warning: {failed}", err=True)


def _command(kind: str) -> click.Command:
    jk = job_kind(kind)

    @spec_options(TuneSpec)
    @spec_options(jk.spec_cls, skip=("run_id",))
    @executor_options
    @click.option("--dry-run", is_flag=True, help="print the specs (and the sbatch script) and exit", panel="Run")
    def command(dry_run: bool, executor: ExecutorOptions, **options: Any) -> None:
        try:
            base, tune_spec = search_specs(kind, options)
            executor = slurm_resources(executor, base, tune_spec)
        except ValueError as e:
            fail(str(e))
        from jobs.inputs import check_job  # torch: when the command runs, not for --help

        def here() -> dict[str, Any]:
            warn_slow_cpu_bf16(base)
            try:
                return run_search(kind, base, tune_spec)
            except (ValueError, FileNotFoundError) as e:
                fail(str(e))
            except SearchFailed as e:
                if e.summary:
                    echo_summary(e.summary)
                fail(str(e), code=1)

        work = Work(fn=run_search, args=[(kind, base, tune_spec)],
                    labels=lambda: [f"search {tune_spec.search_id} (Ray inside the allocation)"],
                    shown=[{"search": dataclasses.asdict(tune_spec), "base": dataclasses.asdict(base)}],
                    echo=echo_summary, shared=[base.results], inputs=job_inputs([base]), spans_nodes=True, here=here)
        # the model, data and weights of the base spec, before Ray starts or anything is submitted; the device
        # where the job runs (on SLURM, not this login node)
        submit(work, executor, dry_run, lambda: check_job(base, executor=executor))

    command.__doc__ = f"Search {kind} spec fields with Ray Tune (objective: {jk.metric_doc})."
    return click.command(name=kind)(command)


@click.group()
def tune() -> None:
    """Ray Tune searches over spec fields (prune, ptq)."""


for _kind in job_kinds():
    tune.add_command(_command(_kind))
