"""Ray Tune searches that call the same job functions as the launcher.

    python -m jobs.launch tune prune --space lr=loguniform:3e-4:3e-3 --space phases=choice:2,3 \
        --num-samples 4 --max-concurrent 2 --phases 3 --epochs 2 --final-sparsity 0.8

A trial builds the job's spec from the base spec plus its sampled values and calls ``run_prune`` or
``run_ptq`` with a ``report`` callback, so its rows land in the same Parquet tables as every other
job, tagged with ``search_id`` and ``trial_id``. The prune trial reports after every phase, so ASHA
can stop a poor trial between phases.

Ray runs on this machine by default. Inside a SLURM job (``--partition``) it is sized from the
``SLURM_*`` variables (CPUs, GPUs, memory), keeps its temp dir in the job folder, runs without the
dashboard, and starts workers on the other nodes of the allocation with ``srun``.

Each trial gets a share of what Ray has (``sweeps/resources.py``), so ``--max-concurrent`` trials run
at once. A search whose every trial failed raises ``SearchFailed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.results import SUMMARY, run_folder
from jobs.specs import PruneSpec, PTQSpec, TuneSpec, check
from jobs.text import error_line
from sweeps.resources import check_devices, trial_resources
from sweeps.space import Dimension, apply_config, parse_space

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class JobKind:
    """What a search of one job kind runs: its spec class, job function and objective."""

    spec_cls: type
    run: Callable[..., dict[str, Any]]
    objective: Callable[[dict[str, Any], TuneSpec], float]
    metric_doc: str


# The job functions import torch: they are imported when a trial runs, inside these two, so building the
# ``tune`` commands for ``--help`` stays fast; the imports are still statements the import linter sees.
def run_prune_trial(spec: PruneSpec, report: Callable[[dict[str, Any]], None] | None = None,
                    tags: dict[str, str] | None = None) -> dict[str, Any]:
    from jobs.training import run_prune

    return run_prune(spec, report=report, tags=tags)


def run_ptq_trial(spec: PTQSpec, report: Callable[[dict[str, Any]], None] | None = None,
                  tags: dict[str, str] | None = None) -> dict[str, Any]:
    from jobs.ptq import run_ptq_sweep

    return run_ptq_sweep(spec, report=report, tags=tags)


def prune_score(row: dict[str, Any], tune_spec: TuneSpec) -> float:
    """Highest sparsity within the allowed drop: 100 * sparsity, minus 10 per point beyond the drop.

    E.g. max_drop 1.5: 93% sparse at a 1.2-point drop -> 93.0; at a 2.0-point drop -> 88.0.
    """
    drop = row["dense_top1"] - row["top1"]
    return 100 * row["sparsity"] - 10 * max(0.0, drop - tune_spec.max_drop)


def ptq_score(row: dict[str, Any], tune_spec: TuneSpec) -> float:
    """A PTQ trial's objective: int8 top-1 of its best configuration, in percent."""
    return float(row["int8_top1"])


def job_kinds() -> dict[str, JobKind]:
    return {
        "prune": JobKind(PruneSpec, run_prune_trial, prune_score,
                         "100*sparsity - 10*(points of top-1 lost beyond --max-drop)"),
        "ptq": JobKind(PTQSpec, run_ptq_trial, ptq_score, "int8 top-1 of the trial's best configuration"),
    }


def job_kind(name: str) -> JobKind:
    kinds = job_kinds()
    if name not in kinds:
        raise ValueError(f"unknown search kind {name!r}; known: {', '.join(kinds)}")
    return kinds[name]


def check_search(kind: str, base: Any, tune_spec: TuneSpec) -> list[Dimension]:
    """Validate everything before Ray starts: the space, the devices, and one sampled spec per dimension's bounds."""
    jk = job_kind(kind)
    check_devices(base.device, tune_spec)
    dims = parse_space(tune_spec.space, jk.spec_cls)
    if tune_spec.searcher == "grid":
        bad = [d.field for d in dims if d.dist not in ("grid", "choice")]
        check(not bad, "searcher", "grid", f"needs grid/choice dimensions, not {bad}")
    if tune_spec.searcher == "optuna" and any(d.dist == "grid" for d in dims):
        raise ValueError("searcher='optuna' cannot take grid dimensions; use choice")
    for d in dims:  # each bound/value must make a valid spec (the spec's own checks)
        values = d.args if d.dist in ("choice", "grid") else d.args[:2]
        for v in values:
            apply_config(base, {d.field: v})
    return dims


def _ray_param_space(dims: list[Dimension], searcher: str) -> dict[str, Any]:
    if searcher == "grid":
        dims = [dataclasses.replace(d, dist="grid") for d in dims]
    return {d.field: d.to_ray() for d in dims}


def trial(config: dict[str, Any], kind: str, base: Any, tune_spec: TuneSpec) -> None:
    """One Ray Tune trial: the job function on the base spec with the sampled values."""
    import torch
    from ray import tune

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cpus = ctx.get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))  # a share below one CPU still runs one thread
    jk = job_kind(kind)
    spec = dataclasses.replace(apply_config(base, config), run_id=f"{tune_spec.search_id}-{trial_id}")

    def report(row: dict[str, Any]) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, int | float) and v == v}
        tune.report({**metrics, "score": jk.objective(row, tune_spec)})

    jk.run(spec, report=report, tags={"search_id": tune_spec.search_id, "trial_id": trial_id})


def _slurm_resources() -> dict[str, Any]:
    """Ray's limits from the SLURM allocation of this node (Ray ignores SLURM's otherwise)."""
    env = os.environ
    cpus = int(env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1)
    gpus = len([g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g])
    res: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    mem_mb = int(env.get("SLURM_MEM_PER_NODE") or 0) or int(env.get("SLURM_MEM_PER_CPU") or 0) * cpus
    if mem_mb:
        res["_memory"] = int(mem_mb * 2**20 * 0.7)
        res["object_store_memory"] = int(mem_mb * 2**20 * 0.3)
    return res


# Ray puts unix sockets at <temp>/session_<date>_<time>_<pid>/sockets/plasma_store (62 characters
# below <temp>), and a socket path may not exceed 107 bytes
_MAX_TEMP_DIR = 107 - 62


def _job_folder(default: Path) -> Path:
    """The submitit job folder when running as a SLURM job, else ``default``."""
    if "SLURM_JOB_ID" in os.environ:
        try:
            import submitit

            return Path(submitit.JobEnvironment().paths.folder)
        except RuntimeError:  # a SLURM job not started by submitit
            pass
    return default


def _temp_dir(folder: Path) -> str:
    """Ray's temp dir ``<folder>/ray``; where that path is too long for Ray's sockets, a short
    private directory under /tmp, linked from ``<folder>/ray`` so it is still found from the job."""
    path = folder / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    if len(str(path)) <= _MAX_TEMP_DIR:
        path.mkdir(exist_ok=True)
        return str(path)
    short = Path(tempfile.mkdtemp(prefix=f"ray-{os.environ.get('SLURM_JOB_ID', os.getpid())}-"))
    if path.is_symlink() or not path.exists():
        path.unlink(missing_ok=True)
        path.symlink_to(short, target_is_directory=True)
    log.info("Ray temp dir %s (linked from %s: the job folder's path is too long for Ray's sockets)", short, path)
    return str(short)


DRIVER = "driver.pid"


def _processes_under(temp_dir: str) -> list[int]:
    """Pids of processes (other than this one) of the Ray instance in ``temp_dir``.

    Found by their command line or, for those that overwrite it with a title such as
    ``ray::DashboardAgent``, by the files they hold open there (their session logs). Linux only.
    """
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            held = temp_dir in cmdline or any(os.readlink(fd).startswith(temp_dir) for fd in (proc / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        if held:
            pids.append(int(proc.name))
    return pids


def stop_leftovers(temp_dir: str) -> int:
    """Before a search starts Ray in ``temp_dir``: end what a dead driver of that search left behind.

    ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` (and the raylet, GCS...) of a driver that
    was killed outlive it and ignore SIGTERM; they are found by the temp dir on their command lines
    and killed. A driver of the search that is still alive is refused (``ValueError``). Ray starts
    the dashboard agent even with the dashboard off (runtime environments and metrics need it), so it
    is cleaned up, not kept from starting. Returns how many processes were ended.
    """
    import signal

    driver = Path(temp_dir) / DRIVER
    if driver.exists():
        pid = int(driver.read_text().strip() or 0)
        try:
            if pid and pid != os.getpid():
                os.kill(pid, 0)
                raise ValueError(f"the search using {temp_dir} is running (driver process {pid}); wait for it, "
                                 f"or stop it first")
        except ProcessLookupError:
            pass
    pids = _processes_under(str(Path(temp_dir).resolve()))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        log.warning("ended %d process(es) a stopped search left under %s", len(pids), temp_dir)
    return len(pids)


def node_address() -> str:
    """This node's address as SLURM knows it (its ``NodeAddr``), for Ray to bind and advertise.

    Ray's own guess is the source address of a route to the internet, which a compute node in a
    private network may not have (it then falls back to 127.0.0.1 and no other node can reach it).
    E.g. ``NodeAddr=10.77.0.12`` for ``devnode2``; a host name is resolved.
    """
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    out = subprocess.run(["scontrol", "show", "node", name], capture_output=True, text=True, timeout=30)
    m = re.search(r"NodeAddr=(\S+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"SLURM does not know node {name!r}: {out.stderr.strip() or out.stdout.strip()}")
    return socket.gethostbyname(m.group(1))


def ray_ports(job_id: str) -> dict[str, int]:
    """Ray's ports for one search job: a block of 100 chosen by the job id, never Ray's defaults.

    Two searches that share a node would otherwise both take Ray's fixed defaults (the GCS on 6379,
    the dashboard agent on 52365) and the second would fail. The blocks lie in 10000-31999, below
    Linux's ephemeral range (32768+). E.g. job 4711 -> 19100-19199: the GCS on 19100, worker
    processes on 19110-19199 (at most 90 per node).
    """
    base = 10000 + (int(job_id.split("_")[0]) % 220) * 100
    return {"port": base, "node-manager-port": base + 1, "object-manager-port": base + 2,
            "runtime-env-agent-port": base + 3, "dashboard-agent-grpc-port": base + 4,
            "dashboard-agent-listen-port": base + 5, "metrics-export-port": base + 6,
            "min-worker-port": base + 10, "max-worker-port": base + 99}


def _ray_start(ip: str, ports: dict[str, int], res: dict[str, Any], temp_dir: str, head: str = "") -> list[str]:
    """The ``ray start`` command of one node: the head (``head=""``) or a worker joining ``head``."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
           f"--node-ip-address={ip}", f"--num-cpus={res['num_cpus']}", f"--num-gpus={res['num_gpus']}",
           f"--temp-dir={temp_dir}"]
    cmd += [f"--{k}={v}" for k, v in ports.items() if k != "port"]
    return cmd + (["--head", f"--port={ports['port']}", "--include-dashboard=false"] if not head
                  else [f"--address={head}"])


def ray_worker_main(head: str, job_id: str, temp_root: str) -> None:
    """Entry point of the Ray worker step on each other node (``python -m sweeps.search worker ...``)."""
    res = _slurm_resources()
    temp_dir = tempfile.mkdtemp(prefix=f"ray-{job_id}-", dir=temp_root)  # per node: nodes may share /tmp
    cmd = _ray_start(node_address(), ray_ports(job_id), res, temp_dir, head=head)
    os.execv(cmd[0], cmd)


def start_ray(folder: Path) -> list[subprocess.Popen]:
    """Start Ray for a search: here, or across the nodes of a SLURM allocation; returns what to stop after.

    On one node, ``ray.init`` starts a private instance sized from the SLURM allocation (or this
    machine). On several nodes (``SLURM_JOB_NUM_NODES`` > 1) the head starts on this node, on its
    SLURM address and the job's own ports (``ray_ports``), and one ``srun`` step starts a worker on
    every other node of the allocation with that node's CPUs and GPUs; the search waits until all
    have joined (a node that never joins is logged, and its share of trials runs elsewhere).
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a stray ~/.ray/auth_token breaks clients
    in_slurm = "SLURM_JOB_ID" in os.environ
    res = _slurm_resources() if in_slurm else {"num_cpus": os.cpu_count() or 1}
    if (folder / "ray").exists():  # the last start's temp dir (a short one under /tmp is linked from here)
        stop_leftovers(str((folder / "ray").resolve()))
    temp_dir = _temp_dir(folder)
    (Path(temp_dir) / DRIVER).write_text(str(os.getpid()))
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) if in_slurm else 1
    if nodes == 1:
        ray.init(include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 configure_logging=True, logging_level=logging.WARNING, **res)
        log.info("ray up: %s", ray.cluster_resources())
        return []
    job = os.environ["SLURM_JOB_ID"]
    ip, ports = node_address(), ray_ports(job)
    head = f"{ip}:{ports['port']}"
    steps = [subprocess.Popen(_ray_start(ip, ports, {k: res[k] for k in ("num_cpus", "num_gpus")}, temp_dir))]
    deadline = time.time() + 60
    while subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "health-check", f"--address={head}"],
                         capture_output=True).returncode != 0:
        if steps[0].poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the Ray head did not start on {head} (log under {temp_dir})")
        time.sleep(1)
    steps.append(subprocess.Popen(
        ["srun", f"--nodes={nodes - 1}", f"--ntasks={nodes - 1}", "--ntasks-per-node=1", "--overlap",
         f"--exclude={os.environ.get('SLURMD_NODENAME') or socket.gethostname()}",
         sys.executable, "-m", "sweeps.search", "worker", head, job, str(Path(temp_dir).parent)]))
    ray.init(address=head, log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    deadline = time.time() + 120
    while len([n for n in ray.nodes() if n["Alive"]]) < nodes and time.time() < deadline:
        time.sleep(1)
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    log.info("ray up on %d of %d nodes (%s): %s", len(alive), nodes, ", ".join(alive), ray.cluster_resources())
    return steps


class SearchFailed(RuntimeError):
    """No trial of a search finished: its message is the one line a user sees; ``summary`` is
    ``run_search``'s (every trial and its error), for the launcher to print."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary


def failed_line(summary: dict[str, Any]) -> str:
    """How many trials failed, the first error, and where every error is; "" when none failed.

    E.g. "2 of 2 trials failed (first: WeightsError: cannot read ...); each trial's error is in
    results/tune/s1/<trial>/error.txt".
    """
    failed = [t for t in summary["trials"] if t["error"]]
    if not failed:
        return ""
    return (f"{len(failed)} of {len(summary['trials'])} trials failed (first: {failed[0]['error']}); "
            f"each trial's error is in {summary['folder']}/<trial>/error.txt")


def run_search(kind: str, base: Any, tune_spec: TuneSpec) -> dict[str, Any]:
    """Run (or resume) a search to the end; returns the best trial's config and metrics.

    Module-level so the launcher can run it in-process or submit it as one SLURM job. Some trials
    may fail (the summary says which, and ``failed_line`` how many); when no trial finished, it
    raises ``SearchFailed`` (so a SLURM search job ends FAILED, and the launcher exits 1).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    jk = job_kind(kind)
    dims = check_search(kind, base, tune_spec)
    root = Path(base.results).resolve()
    storage = root / "tune"
    folder = storage / tune_spec.search_id
    t0 = time.perf_counter()
    workers = start_ray(_job_folder(folder))
    t_ray = time.perf_counter() - t0
    try:
        res = trial_resources(tune_spec, base.device, [n["Resources"] for n in ray.nodes() if n["Alive"]])
        log.info("each trial: %g CPU, %g GPU; %d at once", res.cpus, res.gpus, res.at_once)
        fn = tune.with_resources(
            tune.with_parameters(trial, kind=kind, base=base, tune_spec=tune_spec),
            {"cpu": res.cpus, "gpu": res.gpus})
        max_t = getattr(base, "phases", 1)
        if any(d.field == "phases" for d in dims):
            max_t = max(int(v) for d in dims if d.field == "phases"
                        for v in (d.args if d.dist in ("choice", "grid") else d.args[:2]))
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max(1, max_t), grace_period=1,
                                   reduction_factor=2)
                     if tune_spec.scheduler == "asha" else FIFOScheduler())
        search_alg = None
        if tune_spec.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=base.seed)
        run_config = tune.RunConfig(name=tune_spec.search_id, storage_path=str(storage),
                                    failure_config=tune.FailureConfig(max_failures=tune_spec.max_failures), verbose=0)
        # a requeued SLURM job (preemption, time limit) carries on with the search it started
        requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        if tune_spec.resume or (requeued and tune.Tuner.can_restore(str(folder))):
            if not tune.Tuner.can_restore(str(folder)):
                raise FileNotFoundError(f"no search to resume at {folder}")
            tuner = tune.Tuner.restore(str(folder), trainable=fn, resume_errored=True)
        else:
            tuner = tune.Tuner(fn, param_space=_ray_param_space(dims, tune_spec.searcher),
                               tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler,
                                                           search_alg=search_alg,
                                                           num_samples=tune_spec.num_samples,
                                                           max_concurrent_trials=tune_spec.max_concurrent),
                               run_config=run_config)
        t1 = time.perf_counter()
        grid = tuner.fit()
        t_fit = time.perf_counter() - t1
    finally:
        ray.shutdown()
        for w in workers:
            w.terminate()
    trials = []
    for r in grid:
        m = r.metrics or {}
        trial_id = m.get("trial_id", r.path.rsplit("_", 1)[0] if r.path else "")
        expected = apply_config(base, r.config).reports_expected() if hasattr(base, "reports_expected") else 1
        # Ray counts the reports since the trial last started; a trial resumed from its own checkpoint
        # (after --resume, a killed driver or a requeue) reports only its remaining phases: its true
        # count is the phase it reached, and a run folder with a summary finished all of them
        iterations = int(m.get("phase", m.get("training_iteration", 0)))
        if (run_folder(root, f"{tune_spec.search_id}-{trial_id}") / SUMMARY).exists():
            iterations = expected
        trials.append({"trial_id": trial_id, "config": r.config, "score": m.get("score"), "iterations": iterations,
                       "stopped_early": not r.error and iterations < expected,
                       "error": error_line(r.error)})
    ok = [t for t in trials if not t["error"] and t["score"] is not None]
    best = max(ok, key=lambda t: t["score"]) if ok else None
    summary = {"search_id": tune_spec.search_id, "kind": kind, "metric": jk.metric_doc, "best": best,
               "trials": trials, "ray_start_seconds": t_ray, "search_seconds": t_fit, "folder": str(folder),
               "trial_resources": dataclasses.asdict(res)}
    if best is None:
        why = failed_line(summary) or f"none of its {len(trials)} trials reported a score"
        raise SearchFailed(f"search {tune_spec.search_id}: {why}", summary)
    return summary


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:  # the srun step of start_ray on the other nodes
    ray_worker_main(*sys.argv[2:5])
