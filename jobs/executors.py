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
cluster (``sinfo``: the partition exists, it has the GPUs asked for; the job folder is writable; a
node of the partition sees the job folder and the results root: ``check_nodes_see``).
Each failure is one ``ExecutorError`` line; the CLI turns it into exit code 2.

GPUs go to sbatch as ``--gpus-per-node=N`` (SLURM's ``select/cons_tres``) or ``--gres=gpu:N`` (any
select plugin, and the only form older ``select/cons_res`` clusters take): ``--gpu-request``, by
default ``auto``, which reads ``SelectType`` from ``scontrol show config`` (``gpu_flag``).

The job folder (``--folder``) holds each job's sbatch script, pickled function and arguments, result
pickle and log, one sub-folder per job id. It must be on a filesystem that the submitting machine
and every compute node see (home or project space, not ``/tmp``), and so must ``--results``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
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
RESOURCES = ("gpus", "gpu_request", "cpus", "nodes", "mem", "time", "account", "qos", "sbatch", "setup")
# how a job asks for its GPUs: sbatch --gpus-per-node=N, --gres=gpu:N, or the one the cluster takes
GPU_REQUESTS = ("auto", "gpus-per-node", "gres")
# select plugins that know --gpus-per-node (the others take GPUs as --gres=gpu:N only)
TRES_SELECT = ("select/cons_tres",)
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
    """Refuse a job folder or results root in memory (tmpfs, ramfs): local to this machine by nature.

    One line, before anything is created: ``--results /dev/shm/r`` -> "results='/dev/shm/r' is
    invalid: on tmpfs, local to this machine...". Any other filesystem may be local or shared: only
    a node can tell (``check_nodes_see``).
    """
    p = Path(path).expanduser().resolve()
    probe = next((q for q in (p, *p.parents) if q.exists()), Path("/"))
    kind = filesystem_type(probe)
    check(kind not in NODE_LOCAL_FS, name, str(path),
          f"on {kind}, local to this machine: compute nodes cannot see it; use a shared filesystem "
          f"(the one your home or project space is on)")


def warn_if_tmp(name: str, path: str | os.PathLike) -> None:
    """A warning for a path under /tmp, usually node-local, where no node was asked about it."""
    p = Path(path).expanduser().resolve()
    if str(p).startswith(("/tmp/", "/var/tmp/")):
        log.warning("%s %s is usually node-local: compute nodes must see it", name, p)


# seconds the node check waits for a free node (srun --immediate); a busy partition is a warning, not an error
NODE_CHECK_WAIT = 15
# a folder that a node of a partition saw is not checked again from this machine for that long
NODE_CHECK_TTL = 24 * 3600
NODE_CHECK_CACHE = ".nodes-see-this.json"
# environment of the job this launcher may itself run in: hidden from the check's srun so that it asks
# for a new allocation instead of starting a step in that job (the prefixes of submitit.helpers.clean_env,
# which changes os.environ in place; SLURM_CONF is kept: it says which cluster)
_JOB_ENV = ("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_")
# sbatch flags that choose among a partition's nodes: the check goes where the job could go
_PLACEMENT = ("constraint", "reservation", "exclude", "nodelist", "clusters")
# run by sh on the node: for a marker file written into a folder here, "seen|readonly|missing <node> <marker>"
# (seen: found, and an answer written beside it); for "?<path>" of an input, "present|absent <node> <path>"
_NODE_SCRIPT = r"""node=${SLURMD_NODENAME:-$(hostname)}
for m in "$@"; do
  case "$m" in
    "?"*) p=${m#?}
          if [ -r "$p" ]; then echo "present $node $p"; else echo "absent $node $p"; fi ;;
    *) if [ ! -e "$m" ]; then echo "missing $node $m"
       elif echo "$node" > "$m.node"; then echo "seen $node $m"
       else echo "readonly $node $m"; fi ;;
  esac
done"""


@dataclass(frozen=True)
class _Checked:
    """One thing the node check asks about: a folder (a marker goes in) or an input (it must be there)."""

    name: str        # the option: folder, results, data_root, weights
    given: str       # as the user wrote it, for the error line
    path: Path       # resolved here
    cache: Path      # the folder whose NODE_CHECK_CACHE remembers it
    key: str         # its entry there
    is_input: bool
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def probe(self) -> Path:
        """The input itself, or the marker file that goes into the folder."""
        return self.path if self.is_input else self.path / f".node-check-{self.token}"


def _node_check_key(partition: str) -> str:
    return f"{this_host()} {partition}"


def _read_cache(path: Path) -> dict[str, Any]:
    """The entries of ``path``'s NODE_CHECK_CACHE; none when it is missing or not ours (it is only a cache)."""
    try:
        entries = json.loads((path / NODE_CHECK_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _seen_recently(path: Path, key: str) -> bool:
    entry = _read_cache(path).get(key)
    return isinstance(entry, dict) and time.time() - float(entry.get("checked", 0)) < NODE_CHECK_TTL


def _remember_seen(path: Path, key: str, node: str) -> None:
    cache = path / NODE_CHECK_CACHE
    entries = {**_read_cache(path), key: {"node": node, "checked": time.time()}}
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(cache)  # atomic: two launchers at once leave one whole file
    except OSError:
        tmp.unlink(missing_ok=True)  # only a cache: the next submission checks again


def _appears(path: Path, seconds: float = 5.0) -> bool:
    """``path`` exists here, within ``seconds`` (an NFS client may cache a directory's listing a while)."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def this_host() -> str:
    """This machine's short host name, as SLURM names a node."""
    return socket.gethostname().split(".")[0]


def partition_nodes(partition: str) -> list[str]:
    """The node names of ``partition`` (``sinfo -N``: one line per node, no hostlist to expand); [] unknown."""
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted({line.strip() for line in res.stdout.splitlines() if line.strip()}) if res.returncode == 0 else []


def node_check_command(options: ExecutorOptions, probes: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The ``srun`` that runs ``_NODE_SCRIPT`` over ``probes`` on one node of the partition (one CPU, 1 min).

    ``probes``: marker files, and ``?<path>`` for inputs. ``exclude``: nodes it must not run on (this
    machine, when it is itself a node of the partition).
    """
    cmd = ["srun", f"--partition={options.partition}", f"--immediate={NODE_CHECK_WAIT}", "--nodes=1",
           "--ntasks=1", "--cpus-per-task=1", "--mem=256M", "--time=1", "--job-name=compress-check", "--quiet"]
    cmd += [f"--account={options.account}"] * bool(options.account) + [f"--qos={options.qos}"] * bool(options.qos)
    placement = {k: v for k, v in parse_sbatch_flags(options.sbatch).items() if k in _PLACEMENT}
    if exclude:
        placement["exclude"] = ",".join([*exclude, *filter(None, [placement.get("exclude")])])
    cmd += [f"--{key}={value}" for key, value in placement.items()]
    return [*cmd, "sh", "-c", _NODE_SCRIPT, "sh", *map(str, probes)]


def check_nodes_see(options: ExecutorOptions, folders: Sequence[tuple[str, str | os.PathLike]],
                    inputs: Sequence[tuple[str, str | os.PathLike]] = ()) -> bool:
    """Prove that a node of the partition sees each folder (``(option name, path)``) as this machine does,
    and each input (a data file, the weights) where this machine has it (``jobs.cli.job_inputs``).

    A marker file is written into each folder here; one short ``srun`` step (one CPU, ``--immediate``)
    on a node of the partition looks for it and writes an answer beside it, which must then appear
    here; the same step looks for each input. A folder that is missing on the node, or that the node
    cannot write to, or an input that is not there, is one ``ExecutorError`` line, and the folders
    this check created are removed again: e.g. a disk local to the login node mounted at the same
    path on no node. When this machine is itself a node of the partition, another node is asked (a
    disk local to this node would pass here and fail there). A partition with no free node within
    ``NODE_CHECK_WAIT`` seconds, or a cluster that refuses the step, is a warning: nothing could be
    checked, the job is submitted as asked, and the result is False. What a node saw is remembered
    (``NODE_CHECK_CACHE`` in each folder; the inputs in the first, the job folder) for a day per
    submitting machine and partition, so a second submission runs no step. One node is asked, not
    every node.
    """
    key = _node_check_key(options.partition)
    items: list[_Checked] = []
    created: list[Path] = []
    try:
        for name, given in folders:
            path = Path(given).expanduser().resolve()
            created += reversed([q for q in (path, *path.parents) if not q.exists()])
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ExecutorError(f"{name}={str(given)!r} is not writable: {e.strerror or e}") from e
            items.append(_Checked(name, str(given), path, path, key, False))
        for name, given in inputs:
            path = Path(given).expanduser().resolve()
            items.append(_Checked(name, str(given), path, items[0].path, f"{key} {path}", True))
        todo = [item for item in items if not _seen_recently(item.cache, item.key)]
        return not todo or _ask_a_node(options, todo)
    except ExecutorError:
        for q in reversed(created):  # deepest first; only what is still empty
            with contextlib.suppress(OSError):
                q.rmdir()
        raise


def _ask_a_node(options: ExecutorOptions, todo: Sequence[_Checked]) -> bool:
    nodes = partition_nodes(options.partition)
    exclude = [this_host()] if this_host() in nodes and len(nodes) > 1 else []
    env = {k: v for k, v in os.environ.items() if k == "SLURM_CONF" or not k.startswith(_JOB_ENV)}
    what = ", ".join(dict.fromkeys(f"--{item.name.replace('_', '-')}" for item in todo))
    unchecked = (f"{what} not checked from a node of partition {options.partition!r}: make sure every node "
                 "sees them at the same paths")
    markers = [item.probe for item in todo if not item.is_input]
    try:
        for item in todo:
            if not item.is_input:
                try:
                    item.probe.write_text(f"{this_host()}\n")
                except OSError as e:
                    raise ExecutorError(f"{item.name}={item.given!r} is not writable: {e.strerror or e}") from e
        probes = [f"?{item.path}" if item.is_input else str(item.probe) for item in todo]
        try:
            res = subprocess.run(node_check_command(options, probes, exclude), capture_output=True, text=True,
                                 env=env, timeout=NODE_CHECK_WAIT + 90)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("%s (srun: %s)", unchecked, e)
            return False
        answers = {}
        for line in res.stdout.splitlines():
            verdict, _, rest = line.partition(" ")
            node, _, probe = rest.partition(" ")
            answers[probe] = (verdict, node)
        if res.returncode != 0 or not all(str(item.probe) in answers for item in todo):
            why = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
            log.warning("%s (%s)", unchecked, why.removeprefix("srun: error: "))
            return False
        for item in todo:
            verdict, node = answers[str(item.probe)]
            where = f"on node {node} of partition {options.partition!r}"
            problem = {
                "absent": f"is not there {where} (the job reads it there): put it on a filesystem every node "
                          f"mounts, or copy it to each node at the same path",
                "missing": f"is not visible {where}: a file written into it here is not there; use a filesystem "
                           f"every node mounts at this path",
                "readonly": f"is not writable {where}",
            }.get(verdict)
            if problem is None and not item.is_input and not _appears(item.probe.with_name(item.probe.name + ".node")):
                problem = (f"is not the same folder {where}: what the node wrote into it does not appear here; use "
                           f"a filesystem every node mounts at this path")
            if problem:
                raise ExecutorError(f"{item.name}={item.given!r} {problem}")
        for item in todo:  # all seen: remembered, none before
            _remember_seen(item.cache, item.key, answers[str(item.probe)][1])
        return True
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
            marker.with_name(marker.name + ".node").unlink(missing_ok=True)


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
                   inputs: Sequence[tuple[str, str | os.PathLike]] = (),
                   **fields: Any) -> LocalExecutor | SlurmExecutor:
    """The executor for the launch options; no partition means this machine.

    ``fields`` override single options (``build_executor(partition="gpu", gpus=1)``). For SLURM the
    cluster is asked first (``sinfo``), the job folder and the ``shared`` results roots must be on a
    filesystem the nodes see (not in memory: ``check_shared``; seen from a node of the partition:
    ``check_nodes_see``, unless ``check_nodes`` is off, which also looks for the ``inputs``, e.g.
    ``("data_root", "/shared/cifar")``, on the node), and the job folder is created; any problem
    raises ``ExecutorError`` before anything is submitted.
    """
    options = options or ExecutorOptions()
    if fields:
        options = dataclasses.replace(options, **fields)
    if options.local:
        return LocalExecutor()
    check_cluster(options, cluster_partitions())
    folders = [("folder", options.folder), *(("results", path) for path in shared)]
    for name, path in folders:
        check_shared(name, path)
    seen = False
    if options.check_nodes:  # creates the folders and writes into each: check_folder's work, and a node's
        seen = check_nodes_see(options, folders, inputs)
    else:
        check_folder(options.folder)
    if not seen:
        for name, path in folders:
            warn_if_tmp(name, path)
    return SlurmExecutor(options)
