"""The SLURM options of a job (``ExecutorOptions``) and the sbatch script they render to.

The options (one click option per field through ``cli.options.executor_options``) are checked for their
form when they are parsed, here; ``jobs.cluster`` then checks them against the cluster before anything
is submitted.

GPUs go to sbatch as ``--gpus-per-node=N`` (SLURM's ``select/cons_tres``) or ``--gres=gpu:N`` (any
select plugin, and the only form older ``select/cons_res`` clusters take): ``--gpu-request``, by
default ``auto``, which reads ``SelectType`` from ``scontrol show config`` (``gpu_flag``).

``render_sbatch`` (what ``--dry-run`` prints) renders through submitit's private
``_make_sbatch_string``; submitit is pinned exactly in ``setup.cfg`` for it.
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.specs import check, opt

log = logging.getLogger(__name__)

DEFAULT_FOLDER = "slurm-jobs"
# sbatch flags the options above already own: an extra --sbatch must not fight them
MANAGED_FLAGS = {"partition", "time", "gpus-per-node", "gpus", "cpus-per-task", "mem", "account", "qos",
                 "array", "signal", "output", "error", "job-name", "open-mode", "ntasks-per-node", "nodes"}
# options that change what a SLURM job gets; without --partition they would be silently ignored
RESOURCES = ("gpus", "gpu_request", "cpus", "nodes", "mem", "time", "account", "qos", "sbatch", "setup")
# how a job asks for its GPUs: sbatch --gpus-per-node=N, --gres=gpu:N, or the one the cluster takes
GPU_REQUESTS = ("auto", "gpus-per-node", "gres")
# select plugins that know --gpus-per-node (the others take GPUs as --gres=gpu:N only)
TRES_SELECT = ("select/cons_tres",)
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_FLAG = re.compile(r"^(?P<key>[a-z][a-z0-9-]*)(?:=(?P<value>.+))?$")


def parse_time(value: str) -> int:
    """A SLURM time limit in whole minutes (seconds round up).

    Accepts SLURM's formats: ``90`` (minutes), ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``. E.g. ``1:30:00`` -> 90, ``2-00:00:00`` -> 2880, ``45:30`` -> 46.
    """
    m = _TIME.match(str(value).strip())
    if not m:
        raise ValueError(f"time={value!r} is invalid: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    parts = [int(p) for p in m["rest"].split(":")]
    if m["d"] is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        seconds = int(m["d"]) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif len(parts) == 1:
        seconds = parts[0] * 60
    elif len(parts) == 2:
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return math.ceil(seconds / 60)


def parse_sbatch_flags(flags: Sequence[str]) -> dict[str, Any]:
    """``KEY[=VALUE]`` strings (``constraint=a100``, ``exclusive``) as submitit's extra sbatch flags."""
    out: dict[str, Any] = {}
    for flag in flags:
        m = _FLAG.match(flag.strip().removeprefix("--"))
        check(m is not None, "sbatch", flag, "use KEY=VALUE or KEY (an sbatch long option without its --)")
        key = m["key"]
        check(key not in MANAGED_FLAGS, "sbatch", flag,
              f"--{key} has its own option here (--partition, --gpus, --cpus, --mem, --time, --account, --qos)")
        out[key] = m["value"] if m["value"] is not None else True
    return out


@dataclass(frozen=True)
class ExecutorOptions:
    """Where and with what resources a job runs. No partition: in this process, on this machine."""

    partition: str = opt("", "SLURM partition to submit to (checked with sinfo); empty: run here")
    gpus: int = opt(0, "GPUs per job; a prune, train or PTQ job runs on one (more sit idle unless your own "
                       "model code uses them), a search runs trials side by side on them")
    gpu_request: str = opt("auto", "how the GPUs are asked for: gpus-per-node (sbatch --gpus-per-node=N, "
                                   "select/cons_tres), gres (--gres=gpu:N, any cluster, older select/cons_res "
                                   "ones too) or auto (gres unless scontrol's SelectType is select/cons_tres)",
                           choices=GPU_REQUESTS)
    cpus: int = opt(1, "CPUs per job (sbatch --cpus-per-task; torch uses as many threads)")
    nodes: int = opt(1, "nodes per job: a search starts Ray on each (sbatch --nodes); other jobs use one")
    mem: str = opt("", "memory per job, SLURM form: 4G, 500M (empty: the partition default)")
    time: str = opt("60", "time limit: minutes, HH:MM:SS or D-HH:MM:SS; the job requeues itself before it")
    array_parallelism: int = opt(16, "tasks of one job array running at once")
    account: str = opt("", "SLURM account to charge (sbatch --account)")
    qos: str = opt("", "quality of service (sbatch --qos)")
    sbatch: tuple[str, ...] = opt((), "extra sbatch flag KEY=VALUE or KEY, e.g. constraint=a100", multiple=True)
    setup: tuple[str, ...] = opt((), "shell line run in the job before Python, e.g. 'module load cuda'",
                                 multiple=True)
    folder: str = opt(DEFAULT_FOLDER, "job scripts, pickles and logs, one sub-folder per job; must be on a "
                                      "filesystem every node sees (not /tmp)")
    signal_delay: int = opt(90, "seconds before the time limit when the job checkpoints and requeues")
    max_requeues: int = opt(5, "times a job may requeue itself after a timeout (preemptions do not count "
                               "when --time is over ~50 min)")
    wait: bool = opt(False, "wait for SLURM jobs to finish and print their summaries")
    check_nodes: bool = opt(True, "before submitting, run a short step on a node of the partition to check that "
                                  "it sees --folder, --results, the data and the weights (remembered a day)")

    def __post_init__(self) -> None:
        check(self.gpus >= 0, "gpus", self.gpus, "must be >= 0")
        check(self.gpu_request in GPU_REQUESTS, "gpu_request", self.gpu_request,
              f"use one of {', '.join(GPU_REQUESTS)}")
        check(self.cpus >= 1, "cpus", self.cpus, "must be >= 1")
        check(self.nodes >= 1, "nodes", self.nodes, "must be >= 1")
        check(not self.mem or bool(_MEM.match(self.mem)), "mem", self.mem, "use a number with K, M, G or T, e.g. 4G")
        parse_time(self.time)
        check(parse_time(self.time) >= 1, "time", self.time, "must be at least one minute")
        check(self.array_parallelism >= 1, "array_parallelism", self.array_parallelism, "must be >= 1")
        check(self.signal_delay >= 0, "signal_delay", self.signal_delay, "must be >= 0 seconds")
        check(self.max_requeues >= 0, "max_requeues", self.max_requeues, "must be >= 0")
        check(bool(self.folder), "folder", self.folder, "must be a folder")
        gres = parse_sbatch_flags(self.sbatch).get("gres")
        check(not (self.gpus and gres_gpus(gres)), "sbatch", f"gres={gres}",
              f"it asks for GPUs and so does --gpus {self.gpus}: give them once (--gpus N, or gres=gpu:TYPE:N "
              f"alone for a GPU type)")
        if not self.partition:  # resources asked for but no cluster: the job would run here without them
            fields = ExecutorOptions.__dataclass_fields__
            given = [f"--{n.replace('_', '-')}" for n in RESOURCES if getattr(self, n) != fields[n].default]
            check(not given, "partition", self.partition,
                  f"SLURM option(s) {', '.join(given)} given without --partition (without it the job runs here)")

    @property
    def local(self) -> bool:
        return not self.partition

    @property
    def timeout_min(self) -> int:
        return parse_time(self.time)

    @property
    def job_gpus(self) -> int:
        """GPUs per node the job gets: ``--gpus``, or those a ``--sbatch gres=gpu:TYPE:N`` names."""
        return self.gpus or gres_gpus(parse_sbatch_flags(self.sbatch).get("gres"))


def gres_gpus(gres: Any) -> int:
    """GPUs in an sbatch ``--gres`` value: ``gpu:2`` -> 2, ``gpu:a100:1,nvme:1`` -> 1, ``gpu`` -> 1, None -> 0."""
    if not isinstance(gres, str):
        return 0
    total = 0
    for entry in gres.split(","):
        name, *rest = entry.strip().split(":")
        if name == "gpu":
            total += int(rest[-1]) if rest and rest[-1].isdigit() else 1
    return total


def select_type() -> str:
    """The cluster's node selection plugin, ``SelectType`` of ``scontrol show config`` (e.g.
    ``select/cons_tres``); '' where it cannot be read (no SLURM here, or no answer in 30 s)."""
    try:
        res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"^SelectType\s*=\s*(\S+)", res.stdout, re.M)
    return m.group(1) if m else ""


def gpu_flag(options: ExecutorOptions, select: str | None = None) -> str:
    """How the options' GPUs go to sbatch: ``gpus-per-node`` or ``gres``.

    ``--gpu-request`` as given, or for ``auto`` from the cluster's select plugin (``select``, else
    ``select_type()``): ``--gpus-per-node`` exists only under ``select/cons_tres``, so any other
    (``select/cons_res`` of older SLURM, ``select/linear``) gets ``--gres=gpu:N``, which every plugin
    takes; where the plugin cannot be read, ``gpus-per-node``.
    """
    if options.gpu_request != "auto":
        return options.gpu_request
    plugin = select_type() if select is None else select
    if not plugin or plugin in TRES_SELECT:
        return "gpus-per-node"
    log.info("SelectType is %s: GPUs asked for as --gres=gpu:N (--gpu-request overrides)", plugin)
    return "gres"


def slurm_parameters(options: ExecutorOptions, gpus_as: str = "") -> dict[str, Any]:
    """The submitit ``SlurmExecutor.update_parameters`` keywords for the options.

    One log per job (stderr joined to stdout); ``--signal=USR2@<signal_delay>`` is how the job
    learns that its time is nearly up and requeues itself. GPUs go out as ``gpus_as``
    (``gpus-per-node`` or ``gres``; '' asks ``gpu_flag``); as ``--gres=gpu:N`` they join the entries
    of a ``--sbatch gres=...`` (``gres=nvme:1`` -> ``--gres=gpu:2,nvme:1``).
    """
    extra = parse_sbatch_flags(options.sbatch)
    params: dict[str, Any] = {
        "partition": options.partition,
        "time": options.timeout_min,
        "cpus_per_task": options.cpus,
        "array_parallelism": options.array_parallelism,
        "signal_delay_s": options.signal_delay,
        "stderr_to_stdout": True,
        "job_name": "compress",
    }
    if options.gpus and (gpus_as or gpu_flag(options)) == "gres":
        theirs = extra.pop("gres", None)
        params["gres"] = ",".join([f"gpu:{options.gpus}", *([theirs] if isinstance(theirs, str) else [])])
    elif options.gpus:
        params["gpus_per_node"] = options.gpus
    if options.nodes > 1:
        # one driver task on the first node (it starts Ray's workers on the others with srun)
        params["srun_args"] = ["--nodes=1", "--ntasks=1"]
    if options.mem:
        params["mem"] = options.mem.upper()
    if options.account:
        params["account"] = options.account
    if options.qos:
        params["qos"] = options.qos
    if options.setup:
        params["setup"] = list(options.setup)
    if options.nodes > 1:
        # as a raw flag, not submitit's ``nodes``: submitit would wait for a result from every node's
        # task, while only the driver runs one; --no-kill: losing a node costs its trials, not the search
        extra = {"nodes": options.nodes, "no-kill": True, **extra}
    if extra:
        params["additional_parameters"] = extra
    return params


def render_sbatch(options: ExecutorOptions, command: str = "<python> -u -m submitit.core._submit <folder>",
                  gpus_as: str = "") -> str:
    """The sbatch script submitit would write for these options (what ``--dry-run`` prints).

    Through submitit's private ``_make_sbatch_string``, the function its executor writes scripts with:
    the preview is then the script, not a copy of its layout. submitit is pinned exactly in
    ``setup.cfg`` for this (``tests/test_executors.py`` fails when the installed version moves).
    """
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=str(Path(options.folder) / "%j"),
                               **slurm_parameters(options, gpus_as))
