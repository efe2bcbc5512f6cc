"""Command-line launcher for the compression jobs.

    python -m jobs.launch prune --weights W --data-root D --phases 2 --epochs 1 --final-sparsity 0.5
    python -m jobs.launch train --data-root D --epochs 30
    python -m jobs.launch prune ... --dry-run          # print the spec, run nothing

Without ``--partition`` the job runs in this process on this machine. Every option maps onto one
field of the job's spec (``jobs/specs.py``); a bad value is one line on stderr and exit code 2,
before anything is submitted or written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import click

from compress.data import DataError
from compress.models import WeightsError
from jobs.cli import fail, spec_from_options, spec_options
from jobs.executors import build_executor
from jobs.specs import PruneSpec, TrainSpec
from jobs.training import SpecMismatch, run_prune, run_train
from jobs.tune_cmd import tune

USER_ERRORS = (ValueError, DataError, WeightsError, SpecMismatch, FileNotFoundError, PermissionError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")


def _build_spec(cls: type, options: dict[str, Any]):
    try:
        return spec_from_options(cls, options).with_defaults()
    except ValueError as e:
        fail(str(e))


def _preflight(spec: Any) -> None:
    """Check what a user can get wrong before anything is written: data and weights must load."""
    from compress.data import load_cifar10
    from compress.models import load_model

    try:
        load_cifar10(spec.data_root or None)
        if spec.weights or spec.needs_weights():
            if not spec.weights:
                raise WeightsError(f"{spec.kind()} needs starting weights: pass --weights FILE or set COMPRESS_WEIGHTS")
            load_model(spec.model, spec.weights)
    except USER_ERRORS as e:
        fail(str(e))


def _run(spec: Any, fn: Any, dry_run: bool) -> None:
    if dry_run:
        click.echo(json.dumps(dataclasses.asdict(spec), indent=2))
        return
    _preflight(spec)
    executor = build_executor()
    click.echo(f"run {spec.run_id}: results under {spec.results}/")
    try:
        job = executor.submit(fn, spec)
        summary = job.result()
    except USER_ERRORS as e:
        fail(str(e))
    click.echo(summary["table"])
    click.echo(f"final: top-1 {summary['top1']:.2f}% (start {summary['dense_top1']:.2f}%), "
               f"sparsity {100 * summary['sparsity']:.2f}%, checkpoint {summary['checkpoint']}")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def cli(verbose: bool) -> None:
    """Compress CIFAR ResNets: prune, retrain and quantize as resumable jobs."""
    _setup_logging(verbose)


@cli.command()
@spec_options(PruneSpec)
@click.option("--dry-run", is_flag=True, help="print the spec and exit")
def prune(dry_run: bool, **options: Any) -> None:
    """Run a prune/retrain schedule (BN-gamma filters once, then global L1 magnitude phases)."""
    _run(_build_spec(PruneSpec, options), run_prune, dry_run)


@cli.command()
@spec_options(TrainSpec)
@click.option("--dry-run", is_flag=True, help="print the spec and exit")
def train(dry_run: bool, **options: Any) -> None:
    """Train a dense model (from scratch, or fine-tune --weights)."""
    _run(_build_spec(TrainSpec, options), run_train, dry_run)


cli.add_command(tune)

if __name__ == "__main__":
    cli()
