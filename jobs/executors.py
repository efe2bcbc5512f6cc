"""Where a job runs: in this process (no ``--partition``) or on SLURM through submitit.

    python -m jobs.launch prune ... --partition gpu --gpus 1 --time 2:00:00 --folder /shared/me/slurm-jobs
    python -m jobs.launch prune ... --seeds 0,1,2 --partition debug     # one job array, one task per seed
    python -m jobs.launch prune ... --partition gpu --dry-run           # print the sbatch script, submit nothing
    python -m jobs.launch status                                        # state, progress and log of each job

Launchers build a spec, build an executor with ``build_executor`` and submit one module-level job
function; the same function runs in-process, on SLURM and inside a Ray trial. On SLURM every
function goes out wrapped in ``jobs.slurm_jobs.Requeueable``: on preemption or when the time limit
nears, the job is requeued with the same arguments and the function resumes from its own checkpoint.

The options (``ExecutorOptions``, one click option per field through ``jobs.cli.executor_options``) are
checked twice before anything is submitted: their form when they are parsed, then against the
cluster (``sinfo``: the partition exists, it has the GPUs asked for; the job folder is writable).
Each failure is one ``ExecutorError`` line; the CLI turns it into exit code 2.

The job folder (``--folder``) holds each job's sbatch script, pickled function and arguments, result
pickle and log, one sub-folder per job id. It must be on a filesystem that the submitting machine
and every compute node see (home or project space, not ``/tmp``), and so must ``--results``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.slurm_jobs import Requeueable
from jobs.specs import check, opt

log = logging.getLogger(__name__)

DEFAULT_FOLDER = "slurm-jobs"
# sbatch flags the options above already own: an extra --sbatch must not fight them
MANAGED_FLAGS = {"partition", "time", "gpus-per-node", "gpus", "cpus-per-task", "mem", "account", "qos",
                 "array", "signal", "output", "error", "job-name", "open-mode", "ntasks-per-node", "nodes"}
# options that change what a SLURM job gets; without --partition they would be silently ignored
RESOURCES = ("gpus", "cpus", "nodes", "mem", "time", "account", "qos", "sbatch", "setup")
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_FLAG = re.compile(r"^(?P<key>[a-z][a-z0-9-]*)(?:=(?P<value>.+))?$")
_GPU_GRES = re.compile(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)")


class ExecutorError(ValueError):
    """The cluster cannot take the job as asked (unknown partition, too many GPUs, unwritable folder)."""


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
    gpus: int = opt(0, "GPUs per job (sbatch --gpus-per-node)")
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

    def __post_init__(self) -> None:
        check(self.gpus >= 0, "gpus", self.gpus, "must be >= 0")
        check(self.cpus >= 1, "cpus", self.cpus, "must be >= 1")
        check(self.nodes >= 1, "nodes", self.nodes, "must be >= 1")
        check(not self.mem or bool(_MEM.match(self.mem)), "mem", self.mem, "use a number with K, M, G or T, e.g. 4G")
        parse_time(self.time)
        check(parse_time(self.time) >= 1, "time", self.time, "must be at least one minute")
        check(self.array_parallelism >= 1, "array_parallelism", self.array_parallelism, "must be >= 1")
        check(self.signal_delay >= 0, "signal_delay", self.signal_delay, "must be >= 0 seconds")
        check(self.max_requeues >= 0, "max_requeues", self.max_requeues, "must be >= 0")
        check(bool(self.folder), "folder", self.folder, "must be a folder")
        parse_sbatch_flags(self.sbatch)
        if not self.partition:  # resources asked for but no cluster: the job would run here without them
            fields = ExecutorOptions.__dataclass_fields__
            given = [f"--{n}" for n in RESOURCES if getattr(self, n) != fields[n].default]
            check(not given, "partition", self.partition,
                  f"SLURM option(s) {', '.join(given)} given without --partition (without it the job runs here)")

    @property
    def local(self) -> bool:
        return not self.partition

    @property
    def timeout_min(self) -> int:
        return parse_time(self.time)


def slurm_parameters(options: ExecutorOptions) -> dict[str, Any]:
    """The submitit ``SlurmExecutor.update_parameters`` keywords for the options.

    One log per job (stderr joined to stdout); ``--signal=USR2@<signal_delay>`` is how the job
    learns that its time is nearly up and requeues itself.
    """
    params: dict[str, Any] = {
        "partition": options.partition,
        "time": options.timeout_min,
        "cpus_per_task": options.cpus,
        "array_parallelism": options.array_parallelism,
        "signal_delay_s": options.signal_delay,
        "stderr_to_stdout": True,
        "job_name": "compress",
    }
    if options.gpus:
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
    extra = parse_sbatch_flags(options.sbatch)
    if options.nodes > 1:
        # as a raw flag, not submitit's ``nodes``: submitit would wait for a result from every node's
        # task, while only the driver runs one; --no-kill: losing a node costs its trials, not the search
        extra = {"nodes": options.nodes, "no-kill": True, **extra}
    if extra:
        params["additional_parameters"] = extra
    return params


def render_sbatch(options: ExecutorOptions, command: str = "<python> -u -m submitit.core._submit <folder>") -> str:
    """The sbatch script submitit would write for these options (what ``--dry-run`` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=str(Path(options.folder) / "%j"), **slurm_parameters(options))


def max_array_size(default: int = 1001) -> int:
    """Tasks one job array may hold: the cluster's ``MaxArraySize`` minus one (indices start at 0).

    One ``scontrol show config`` call; SLURM's default (1001) where it cannot be read.
    """
    try:
        res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return default - 1
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", res.stdout, re.M)
    return max(int(m.group(1)) - 1, 1) if m else default - 1


def parse_sinfo(text: str) -> dict[str, int]:
    """Partitions and their most GPUs on one node, from ``sinfo -h -o '%R|%G'`` lines.

    ``gpu|gpu:2`` -> {"gpu": 2}; ``a100|gpu:a100:4(S:0-1),shard:8`` -> {"a100": 4}; ``(null)`` -> 0.
    """
    out: dict[str, int] = {}
    for line in text.splitlines():
        if "|" not in line:
            continue
        name, gres = line.strip().split("|", 1)
        gpus = sum(int(n) for n in _GPU_GRES.findall(gres))
        out[name] = max(out.get(name, 0), gpus)
    return out


def cluster_partitions() -> dict[str, int]:
    """Partitions of the reachable SLURM cluster and GPUs per node in each (runs ``sinfo``)."""
    if shutil.which("sinfo") is None:
        raise ExecutorError("no SLURM here: sinfo is not on PATH (drop --partition to run on this machine)")
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%R|%G"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        raise ExecutorError("SLURM did not answer: sinfo timed out after 30 s") from e
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExecutorError(f"SLURM is not reachable: sinfo failed: {msg}")
    return parse_sinfo(res.stdout)


def check_cluster(options: ExecutorOptions, partitions: dict[str, int]) -> None:
    """The partition exists and a node of it has the GPUs asked for."""
    if options.partition not in partitions:
        raise ExecutorError(f"partition={options.partition!r} is unknown; known: {', '.join(sorted(partitions))}")
    have = partitions[options.partition]
    if options.gpus > have:
        raise ExecutorError(f"gpus={options.gpus} is more than a node of partition {options.partition!r} has "
                            f"({have}); partitions with GPUs: "
                            f"{', '.join(f'{p} ({n})' for p, n in sorted(partitions.items()) if n) or 'none'}")


# filesystems that live in one machine's memory: a path on them is never visible from another node
NODE_LOCAL_FS = {"tmpfs", "ramfs", "devtmpfs"}


def filesystem_type(path: str | os.PathLike) -> str:
    """The type of the filesystem ``path`` lies on (its longest mount point in /proc/self/mounts)."""
    target = Path(path).expanduser().resolve()
    best, kind = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, point, fstype, *_ = line.split()
            point = point.replace("\\040", " ")
            if (target == Path(point) or Path(point) in target.parents) and len(point) > len(best):
                best, kind = point, fstype
    return kind


def check_shared(name: str, path: str | os.PathLike) -> None:
    """Refuse a job folder or results root that compute nodes cannot see (one line, before submitting).

    A path in memory (tmpfs, ramfs) is local to this machine by nature; a path under /tmp on a local
    disk usually is too, but cannot be told from a shared one here, so it is only warned about. E.g.
    ``--results /dev/shm/r`` -> "results='/dev/shm/r' is invalid: on tmpfs, local to this machine...".
    """
    p = Path(path).expanduser().resolve()
    probe = next((q for q in (p, *p.parents) if q.exists()), Path("/"))
    kind = filesystem_type(probe)
    check(kind not in NODE_LOCAL_FS, name, str(path),
          f"on {kind}, local to this machine: compute nodes cannot see it; use a shared filesystem "
          f"(the one your home or project space is on)")
    if str(p).startswith(("/tmp/", "/var/tmp/")):
        log.warning("%s %s is usually node-local: compute nodes must see it", name, p)


def check_folder(folder: str | os.PathLike) -> Path:
    """Create the job folder and prove it writable with a probe file (root bypasses mode bits)."""
    path = Path(folder).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        raise ExecutorError(f"folder={str(folder)!r} is not writable: {e.strerror or e}") from e
    return path


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
                   **fields: Any) -> LocalExecutor | SlurmExecutor:
    """The executor for the launch options; no partition means this machine.

    ``fields`` override single options (``build_executor(partition="gpu", gpus=1)``). For SLURM the
    cluster is asked first (``sinfo``), the job folder and the ``shared`` results roots must be on a
    filesystem the nodes see (``check_shared``), and the job folder is created; any problem raises
    ``ExecutorError`` before anything is submitted.
    """
    options = options or ExecutorOptions()
    if fields:
        options = dataclasses.replace(options, **fields)
    if options.local:
        return LocalExecutor()
    check_cluster(options, cluster_partitions())
    check_shared("folder", options.folder)
    for path in shared:
        check_shared("results", path)
    check_folder(options.folder)
    return SlurmExecutor(options)
