"""Click options generated from spec dataclasses, so the CLI and the spec cannot drift apart.

Each spec field becomes ``--field-name`` with the field's default and help; bool fields become
``--flag/--no-flag``; tuple fields take a comma-separated list. ``spec_from_options`` builds the
frozen spec back from the parsed values, and its ``ValueError`` becomes one line and exit code 2.

``--help`` groups the options in panels (rich-click) by the spec class that declares them (run,
model and data, training, pruning, distillation, quantization, search, SLURM); a field whose
default comes from an environment variable shows that variable as its default. ``Cli`` is the
command group: a usage error (unknown option, a value of the wrong type) is one ``error:`` line
and exit 2 like every other bad input, and Ctrl-C is exit 130.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import rich_click as click
from rich_click import RichGroup

from jobs.executors import LocalExecutor, SlurmExecutor, build_executor
from jobs.slurm_jobs import final_report
from jobs.slurm_options import ExecutorOptions
from jobs.specs import base_type, spec_from_options
from jobs.text import error_line

# the --help panel of a field: by the spec class that declares it, then these fields by name
PANELS = {"RunFields": "Run", "TrainFields": "Training", "PruneSpec": "Pruning", "PTQSpec": "Quantization",
          "TuneSpec": "Search", "ExecutorOptions": "SLURM (with --partition; without it the job runs here)",
          "ExportSpec": "Export"}
FIELD_PANELS = {**{k: "Model and data" for k in ("model", "model_args", "weights", "data", "data_root", "image_size",
                                                  "data_mean", "data_std")},
                "kd_weight": "Distillation", "kd_temperature": "Distillation", "teacher": "Distillation"}


def panel_of(spec_cls: type, name: str) -> str:
    """The help panel of field ``name`` of ``spec_cls`` (see ``PANELS``)."""
    if name in FIELD_PANELS:
        return FIELD_PANELS[name]
    for cls in reversed(spec_cls.__mro__):  # the most basic class that declares the field
        if name in cls.__dict__.get("__annotations__", {}):
            return PANELS.get(cls.__name__, "Options")
    return "Options"


def spec_options(spec_cls: type, skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of ``spec_cls`` (in field order), in its help panel."""
    hints = typing.get_type_hints(spec_cls)

    def decorate(fn: Callable) -> Callable:
        # distillation modifies the training (of a prune run: the retraining), so its panel comes after both
        fields = sorted(dataclasses.fields(spec_cls), key=lambda f: panel_of(spec_cls, f.name) == "Distillation")
        for f in reversed(fields):
            if f.name in skip:
                continue
            tp = base_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            env = f.metadata.get("env")
            common = {"help": help_, "panel": panel_of(spec_cls, f.name),
                      "show_default": f"${env}" if env else f.default not in ("", ())}
            if tp is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, **common)(fn)
            elif f.metadata.get("multiple"):
                fn = click.option(flag, f.name, multiple=True, default=f.default,
                                  **{**common, "help": help_ + " (repeatable)", "show_default": False})(fn)
            elif typing.get_origin(tp) is tuple or tp is tuple:
                default = ",".join(map(str, f.default))
                fn = click.option(flag, f.name, default=default, **common)(fn)
            else:
                # choices are checked by the spec itself so the error lists them in one line
                if choices:
                    common["help"] = f"{help_} [{'|'.join(choices)}]"
                fn = click.option(flag, f.name, type=tp, default=f.default, **common)(fn)
        return fn

    return decorate


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """One clear line on stderr and an exit code: 2 (click's usage-error code) for bad input, 1 for a failed run."""
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


class Cli(RichGroup):
    """The command group: click's usage errors become one ``error:`` line (exit 2), Ctrl-C exit 130."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        import sys

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.ClickException as e:  # UsageError, BadParameter, NoSuchOption...
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            rv = e.exit_code
        except click.exceptions.Abort:  # Ctrl-C outside a job (a job says how to resume it itself)
            click.echo("\ninterrupted", err=True)
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


# --- the commands' shared steps: executor options, opening an executor, waiting for jobs ---------------------

def executor_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Click decorator: one option per ``ExecutorOptions`` field, handed to the command as ``executor``.

    A bad value (``--time 1h``, ``--gpus 1`` without ``--partition``) is one line and exit code 2.
    """
    names = [f.name for f in dataclasses.fields(ExecutorOptions)]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        given = {n: kwargs.pop(n) for n in names}
        try:
            options = spec_from_options(ExecutorOptions, given)
        except ValueError as e:
            fail(str(e))
        return fn(executor=options, **kwargs)

    return spec_options(ExecutorOptions)(command)


def job_inputs(specs: Sequence[Any]) -> list[tuple[str, str]]:
    """What the specs' jobs read from disk, as this machine has it: ``(option name, path)``.

    The data (its test-split file under the data root, the option or ``$COMPRESS_DATA``; an image
    folder's val/ folder; a data factory's source file), the weights, the teacher file and a model
    factory's source file (the job imports it there); a node must see each at the same path
    (``check_nodes_see``). A name that is no path here ('pretrained', downloaded by the job) is left out.
    """
    from compress.data import ENV_DATA  # here: compress.data imports torch; --help and status need not
    from compress.datasets import data_probe_for
    from compress.registry import factory_source, parse_model

    out: dict[tuple[str, str], None] = {}
    for spec in specs:
        root = getattr(spec, "data_root", "") or os.environ.get(ENV_DATA, "")
        kind = getattr(spec, "data", "cifar10")
        probe = str(data_probe_for(kind, root)) if (root or kind != "cifar10") else ""
        source = factory_source(parse_model(spec.model))  # a user's model module: the nodes import it
        values = {"data" if kind != "cifar10" else "data_root": probe, "weights": getattr(spec, "weights", ""),
                  "teacher": getattr(spec, "teacher", ""), "model": str(source or "")}
        for name, value in values.items():
            if value and Path(value).expanduser().exists():
                out[(name, str(Path(value).expanduser().resolve()))] = None
    return list(out)


def open_executor(options: ExecutorOptions, spans_nodes: bool = False, shared: Sequence[str] = (),
                  inputs: Sequence[tuple[str, str]] = ()) -> LocalExecutor | SlurmExecutor:
    """``build_executor`` for the CLI: a cluster problem is one line and exit code 2.

    Only a search (``spans_nodes``) uses more than one node, or more than one GPU: its trials run
    side by side. Other jobs spread over nodes and GPUs as arrays; one of them given several GPUs
    runs on the first (one warning line once the executor is built: the job goes out as asked, since
    a user's own model code may use the others). ``inputs`` (``job_inputs``): files the jobs read,
    checked from a node with the folders.
    """
    if options.nodes > 1 and not spans_nodes:
        fail(f"nodes={options.nodes} is invalid: only a search (tune) spans nodes; this job runs on one node "
             f"(spread runs over nodes with --seeds, an array)")
    try:
        ex = build_executor(options, shared=shared, inputs=inputs)
    except ValueError as e:
        fail(str(e))
    gpus = options.job_gpus
    if gpus > 1 and not spans_nodes:
        click.echo(f"warning: {gpus} GPUs per job: a prune, train or PTQ job runs on one of them (its --device; "
                   f"cuda is cuda:0), the other {gpus - 1} sit idle unless your own model code uses them; for runs "
                   f"side by side use --seeds (an array of one-GPU jobs) or a search (tune)", err=True)
    return ex


USER_ERRORS = (ValueError, FileNotFoundError, PermissionError)  # what a user's input can cause: exit 2


def run_here(call: Callable[[], Any], redo: str, interrupted: str) -> Any:
    """``call()`` in this process, as a command runs a job without ``--partition``.

    A user error is one line, exit 2; a failed write (full disk, folder gone or read-only) one line,
    exit 1, saying how to carry on (``redo``); Ctrl-C exit 130 after saying what was kept.
    """
    try:
        return call()
    except USER_ERRORS as e:
        fail(str(e))
    except OSError as e:  # what finished is kept (rows, the last saved epoch)
        fail(f"{e.strerror or e}; {redo}", code=1)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: {interrupted}", err=True)
        raise click.exceptions.Exit(130) from None


def echo_submitted(jobs: list[Any], labels: list[str], folder: str) -> None:
    """One line per submitted job (up to 20), the arrays, and the status command to watch them."""
    if len(jobs) <= 20:
        for job, label in zip(jobs, labels, strict=True):
            click.echo(f"submitted job {job.job_id}: {label}, log {job.paths.stdout}")
    arrays = sorted({j.job_id.split("_")[0] for j in jobs}, key=int)
    if len(jobs) > 1:
        click.echo(f"submitted {len(jobs)} job(s) in {len(arrays)} array(s): {', '.join(arrays)}")
    click.echo(f"watch: python -m jobs.launch status {' '.join(arrays)} --folder {folder}")


def wait_for(jobs: list[Any], echo: Callable[[Any], None]) -> None:
    """Wait for submitted jobs; echo each result, a failed job's final state and error; exit 1 if any failed."""
    failed = 0
    for job in jobs:
        try:
            echo(job.result())
        except Exception as e:  # submitit raises FailedJobError/UncompletedJobError with the job's traceback
            failed += 1
            r = final_report(job)
            last = r.error or error_line(str(e)) or type(e).__name__
            click.echo(f"job {job.job_id} {r.state}: {last} (log {job.paths.stdout})", err=True)
    if failed:
        raise click.exceptions.Exit(1)


def given_on_command_line(options: dict[str, Any]) -> set[str]:
    """The options the user typed (not defaults, not environment variables)."""
    ctx = click.get_current_context()
    return {k for k in options if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
