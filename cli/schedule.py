"""``prune`` and ``train``: a schedule of phases as one resumable run per spec (``jobs/training.py``).

Both take their spec's fields as options, ``--seeds`` (one run each, one job array on SLURM),
``--resume`` (runs by id, with their stored specs), ``--run`` (start from a finished run's model),
``--download`` and ``--dry-run``, and go out through ``cli.submit``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import rich_click as click

from cli.options import USER_ERRORS, executor_options, fail, given_on_command_line, job_inputs, spec_options
from cli.submit import Work, submit
from compress.results import check_results_root
from jobs.runs import RUN_STATES, check_run, new_specs, run_dir
from jobs.slurm_options import ExecutorOptions
from jobs.specs import PruneSpec, TrainSpec

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


def preflight(spec: Any, download: bool = False,
              executor: ExecutorOptions | None = None) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Check what a user can get wrong before anything is written: data, model and weights must load and fit.

    The model is built here (a user's factory imported, a timm name looked up), its output width
    checked against the data's classes, and a prune spec's kept-dense names and budget against its
    layers. With ``download``, CIFAR-10 is fetched into the data root first (here, so a SLURM job
    finds it). The device is checked where the job runs (``executor``: on SLURM by the node, here by
    this process). Returns the (training, test) sizes and the image shape; raises on bad input.
    """
    from jobs.inputs import check_job

    data, model = check_job(spec, download, executor)
    # state.prev.pt and state.pt (weights, optimizer moments, masks) while a new one is written, then final.pt
    param_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_results_root(spec.results, 10 * param_bytes + 2**20)
    return (len(data.train), len(data.test)), data.image_shape


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


def echo_summary(summary: dict[str, Any]) -> None:
    click.echo(summary["table"])
    click.echo(f"final: top-1 {summary['top1']:.2f}% (start {summary['dense_top1']:.2f}%), "
               f"sparsity {100 * summary['sparsity']:.2f}%, checkpoint {summary['checkpoint']}")


def run_schedules(specs: list[Any], fn: Any, dry_run: bool, executor: ExecutorOptions, download: bool = False) -> None:
    """Submit one run per spec: here one after another, on SLURM one job (array) with a lease per run."""
    checked: dict[str, Any] = {}

    def check() -> None:
        checked["sizes"] = preflight(specs[0], download, executor)
        checked["states"] = [check_run(spec) for spec in specs]  # another spec's run under this id: refused

    def before(i: int) -> None:
        spec, state = specs[i], checked["states"][i]
        click.echo(f"run {spec.run_id} ({RUN_STATES[state]}): results under {spec.results}/")
        if state == "new":
            click.echo(_plan_line(spec, checked["sizes"]))

    def texts(i: int) -> tuple[str, str]:
        spec = specs[i]
        resume = f"python -m jobs.launch {spec.kind()} --resume {spec.run_id} --results {spec.results}"
        return (f"the run stopped at its last saved epoch: once the cause is gone, resume with: {resume}",
                f"run {spec.run_id} keeps its last saved epoch (the one in flight is redone); resume with: {resume}")

    def labels() -> list[str]:
        return [f"run {s.run_id} ({RUN_STATES[st]})" for s, st in zip(specs, checked["states"], strict=True)]

    work = Work(fn=fn, args=[(spec, None, None) for spec in specs], labels=labels,
                shown=[dataclasses.asdict(s) for s in specs], echo=echo_summary,
                shared=sorted({s.results for s in specs}), inputs=job_inputs(specs),
                leases=[run_dir(s) for s in specs], before=before, per_call_text=texts)
    submit(work, executor, dry_run, check)


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
            try:
                specs = new_specs(spec_cls, options, seeds, resume, run, given_on_command_line(options))
            except USER_ERRORS as e:
                fail(str(e))
            import jobs.training  # the job (and torch) loads when the command runs, not for --help

            run_schedules(specs, getattr(jobs.training, job), dry_run, executor, download)

        return command

    return decorate


@click.command()
@_schedule_command(PruneSpec, "run_prune")
def prune() -> None:
    """Run a prune/retrain schedule (BN-gamma filters once, then global L1 magnitude phases)."""


@click.command()
@_schedule_command(TrainSpec, "run_train")
def train() -> None:
    """Train a dense model (from scratch, or fine-tune --weights)."""
