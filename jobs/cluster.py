"""Checks of a job's SLURM options against the cluster, made before anything is submitted.

``sinfo``: the partition exists and a node of it has the GPUs asked for (``check_cluster``). The job
folder and the results root are not in memory (``check_shared``) and are writable (``check_folder``),
and a node of the partition sees them and the job's inputs (``check_nodes_see``: one short ``srun``
step, its answer cached a day in ``NODE_CHECK_CACHE``). ``scontrol``: how many tasks one job array
may hold (``max_array_size``). Each failure is one ``ExecutorError`` line; the CLI turns it into exit
code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.slurm_options import ExecutorOptions, parse_sbatch_flags
from jobs.specs import check

log = logging.getLogger(__name__)

_GPU_GRES = re.compile(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)")


class ExecutorError(ValueError):
    """The cluster cannot take the job as asked (unknown partition, too many GPUs, unwritable folder)."""


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
    and each input (a data file, the weights) where this machine has it (``cli.options.job_inputs``).

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
