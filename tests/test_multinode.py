"""Against the multi-node dev cluster (``SLURM_DEV_NODES=3 bash slurm/dev-cluster.sh start``).

Each node there is a real ``slurmd`` in its own network and UTS namespace (its own hostname and
address on a bridge), so placement and node failure are real. What is tested is this project's
behaviour on them, not SLURM's: a seeds array spreads over the nodes, a prune job on a node that
dies resumes elsewhere with the rows of an uninterrupted run (``dev-cluster.sh node-down`` kills the
node's slurmd and every process in its namespace; ``node-up`` brings it back), a search survives
losing a worker node, and a launcher on one of the nodes has another node check its folders.
Real sbatch, sacct and node failure, nothing mocked. Every test skips, saying why, unless the
running cluster has three nodes or more.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.multinode, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
DEV_CLUSTER = REPO / "slurm" / "dev-cluster.sh"
START = "SLURM_DEV_NODES=3 bash slurm/dev-cluster.sh start"
IN_SERVICE = {"idle", "mixed", "allocated"}   # sinfo %T of a responding node that takes jobs
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"}


def run(*cmd: str, timeout: float = 60) -> str:
    """stdout of a command that must succeed."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@pytest.fixture(scope="module")
def nodes() -> dict[str, int]:
    """The cluster's responding nodes and their CPUs; skips unless there are three or more."""
    try:
        info = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c %T"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip(f"no SLURM client (sinfo); start the multi-node dev cluster: {START}")
    if info.returncode != 0:
        pytest.skip(f"no SLURM reachable ({info.stderr.strip()}); start the multi-node dev cluster: {START}")
    rows = {name: (int(cpus), state) for name, cpus, state in (line.split() for line in info.stdout.splitlines())}
    if len(rows) < 3:
        pytest.skip(f"needs a cluster of 3 nodes or more, found {sorted(rows)}: {START}")
    bad = {name: state for name, (_, state) in rows.items() if state not in IN_SERVICE}
    if bad:
        pytest.skip(f"nodes not in service: {bad} (bash slurm/dev-cluster.sh node-up <node>, or restart the cluster)")
    if subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True).returncode != 0:
        pytest.skip("SLURM accounting (sacct) is not available: job states and nodes cannot be read")
    return {name: cpus for name, (cpus, _) in rows.items()}


def accounting(job_id: str) -> list[tuple[str, str, str]]:
    """(job id, state, node list) of each run of the job or its array tasks, requeued runs included."""
    out = run("sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "JobID,State,NodeList")
    return [(jid, state.split()[0], nodelist) for jid, state, nodelist in
            (line.split("|") for line in out.splitlines() if line)]


def wait_finished(job_id: str, tasks: int, timeout: float) -> list[tuple[str, str, str]]:
    """The accounting rows once ``tasks`` tasks have ended; cancels the job and fails after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rows = accounting(job_id)
        final = {jid: state for jid, state, _ in rows}   # the last run of each task
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
        if len(final) == tasks and not ACTIVE & set(final.values()) and not queued:
            return rows
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {accounting(job_id)}")


def test_a_launcher_on_a_node_has_another_node_check_its_folders(nodes, tmp_path):
    """Submitting from a node of the partition (an interactive session): a disk local to that node
    would pass a check made on the node itself, so the folders are checked from another node."""
    if os.geteuid() != 0:
        pytest.skip("entering a node's UTS namespace needs root")
    pid = Path("/run/slurm-dev/slurmd-devnode1.pid")
    if not pid.exists():
        pytest.skip(f"no {pid}: not the dev cluster's devnode1")
    code = ("import json, sys\n"
            "from jobs.cluster import NODE_CHECK_CACHE, check_nodes_see, this_host\n"
            "from jobs.slurm_options import ExecutorOptions\n"
            "o = ExecutorOptions(partition='debug', folder=sys.argv[1])\n"
            "assert check_nodes_see(o, [('folder', sys.argv[1])])\n"
            "cache = json.loads(open(sys.argv[1] + '/' + NODE_CHECK_CACHE).read())\n"
            "print(this_host(), cache[this_host() + ' debug']['node'])")
    answered = []
    for i in range(3):
        out = run("nsenter", f"--uts=/proc/{pid.read_text().strip()}/ns/uts", sys.executable, "-c", code,
                  str(tmp_path / f"jobs{i}"))
        here, node = out.split()
        assert here == "devnode1"
        answered.append(node)
    assert set(answered) <= set(nodes) - {"devnode1"}, answered


# --- the project's own jobs across nodes -------------------------------------------------------

def launch(*args: str) -> Any:
    from click.testing import CliRunner

    from cli.main import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_prune_seeds_array_spreads_over_the_nodes_with_the_host_in_its_rows(
        nodes, synthetic_cifar, synthetic_weights, tmp_path):
    """``prune --seeds 0,1,2 --partition debug --cpus <a whole node>``: one array, one task per node."""
    from compress.results import read_table

    results, folder = tmp_path / "results", tmp_path / "jobs"
    res = launch("prune", "--weights", str(synthetic_weights), "--data-root", str(synthetic_cifar),
                 "--results", str(results), "--phases", "1", "--epochs", "1", "--final-sparsity", "0.5",
                 "--batch-size", "25", "--test-size", "100", "--eval-batch-size", "100", "--seeds", "0,1,2",
                 "--run-id", "spread", "--partition", "debug", "--cpus", str(min(nodes.values())),
                 "--time", "10", "--folder", str(folder), "--wait")
    assert res.exit_code == 0, res.output
    (array,) = {line.split("submitted job ", 1)[1].split("_")[0] for line in res.output.splitlines()
                if line.startswith("submitted job ")}
    ran = {jid: n for jid, state, n in wait_finished(array, tasks=3, timeout=60) if state == "COMPLETED"}
    assert len(ran) == 3 and len(set(ran.values())) == 3, ran  # three tasks on three nodes
    phases = read_table(results, "phases").to_pandas()
    assert sorted(phases["run_id"].unique()) == ["spread-s0", "spread-s1", "spread-s2"]
    by_run = phases.groupby("run_id")["host"].agg(set).to_dict()
    assert all(len(h) == 1 for h in by_run.values())  # each run's rows name the one node it ran on
    task_of = {f"spread-s{i}": f"{array}_{i}" for i in range(3)}
    assert {run_id: next(iter(h)) for run_id, h in by_run.items()} == {r: ran[t] for r, t in task_of.items()}


def test_search_runs_trials_on_two_nodes(nodes, synthetic_cifar, synthetic_weights, tmp_path):
    """``tune ptq --nodes 2``: the Ray head on the first node, a worker on the second, trials on both."""
    from compress.results import read_table

    results, folder = tmp_path / "results", tmp_path / "jobs"
    res = launch("tune", "ptq", "--weights", str(synthetic_weights), "--data-root", str(synthetic_cifar),
                 "--results", str(results), "--methods", "manual", "--calib-sizes", "50", "--calib-batch-size", "50",
                 "--eval-batch-size", "100", "--space", "alphas=grid:0.9,0.95,1.0,1.05", "--searcher", "grid",
                 "--scheduler", "fifo", "--num-samples", "1", "--max-concurrent", "4", "--cpus-per-trial", "1",
                 "--partition", "debug", "--nodes", "2", "--cpus", "2", "--folder", str(folder),
                 "--search-id", "two-nodes", "--wait")
    assert res.exit_code == 0, res.output
    job_id = res.output.split("submitted job ", 1)[1].split(":", 1)[0]
    (allocated,) = [n for j, _, n in accounting(job_id) if j == job_id]
    rows = read_table(results, "ptq").to_pandas()
    assert sorted(rows["alpha"]) == [0.9, 0.95, 1.0, 1.05] and set(rows["job_id"]) == {job_id}
    hosts = set(rows["host"])
    assert len(hosts) == 2 and hosts <= set(nodes), hosts  # trials ran on both nodes of the allocation
    assert all(h in run("scontrol", "show", "hostnames", allocated).split() for h in hosts)


def test_prune_job_on_a_dead_node_resumes_elsewhere_with_the_rows_of_an_uninterrupted_run(
        nodes, synthetic_cifar, synthetic_weights, tmp_path):
    """The node under a prune job dies mid-phase: SLURM requeues the job onto another node, where it
    resumes from its checkpoint; each phase and epoch row exists once and equals an uninterrupted run's."""
    if os.geteuid() != 0:
        pytest.skip("node-down/node-up of the dev cluster need root")
    from jobs.executors import build_executor
    from jobs.specs import PruneSpec
    from jobs.training import run_prune
    from tests.helpers import EPOCHS, PHASES, assert_same_rows, mid_phase, wait_until

    def make(run_id: str) -> PruneSpec:
        return PruneSpec(data_root=str(synthetic_cifar), weights=str(synthetic_weights), results=str(tmp_path / "r"),
                         run_id=run_id, phases=PHASES, epochs=EPOCHS, final_sparsity=0.5, batch_size=25,
                         test_size=100, eval_batch_size=100, lr=2e-3)

    ex = build_executor(partition="debug", folder=str(tmp_path / "jobs"), time="10")
    ex.submit(run_prune, make("reference")).result()  # first, so the node taken down runs nothing else of ours
    spec = make("node-fail")
    job = ex.submit(run_prune, spec)
    wait_until("the job to be inside a phase", mid_phase(spec), timeout=120)
    (first,) = {n for _, state, n in accounting(job.job_id) if state == "RUNNING"}
    try:
        run("bash", str(DEV_CLUSTER), "node-down", first)
        runs = wait_finished(job.job_id, tasks=1, timeout=240)
    finally:
        run("bash", str(DEV_CLUSTER), "node-up", first, timeout=120)
    assert [(state, n == first) for _, state, n in runs] == [("NODE_FAIL", True), ("COMPLETED", False)], runs
    assert_same_rows(spec, make("reference"))
    from compress.results import read_table

    phases = read_table(spec.results, "phases").to_pandas()
    assert set(phases[phases["run_id"] == "node-fail"]["host"]) <= set(nodes)


def test_search_survives_losing_a_worker_node(nodes, synthetic_cifar, synthetic_weights, tmp_path):
    """``tune prune --nodes 2 --max-failures 1``: the worker node dies under a trial; the trial is
    retried on the remaining node from its own checkpoint and the search completes with every trial."""
    if os.geteuid() != 0:
        pytest.skip("node-down/node-up of the dev cluster need root")
    import json

    from compress.results import read_table

    results, folder = tmp_path / "results", tmp_path / "jobs"
    res = launch("tune", "prune", "--weights", str(synthetic_weights), "--data-root", str(synthetic_cifar),
                 "--results", str(results), "--phases", "3", "--epochs", "3", "--final-sparsity", "0.5",
                 "--batch-size", "25", "--test-size", "100", "--eval-batch-size", "100", "--no-randaugment",
                 "--space", "lr=grid:0.001,0.002", "--searcher", "grid", "--scheduler", "fifo", "--num-samples", "1",
                 "--max-concurrent", "2", "--cpus-per-trial", "2", "--max-failures", "1", "--partition", "debug",
                 "--nodes", "2", "--cpus", "2", "--folder", str(folder), "--search-id", "lose-a-node")
    assert res.exit_code == 0, res.output
    job_id = res.output.split("submitted job ", 1)[1].split(":", 1)[0]
    def allocated() -> list[str] | None:
        out = run("squeue", "-h", "-j", job_id, "-o", "%T %N").split()
        return run("scontrol", "show", "hostnames", out[1]).split() if out and out[0] == "RUNNING" else None

    from tests.helpers import wait_until

    head, worker = wait_until("the search to start", allocated, timeout=120, every=1)

    def worker_mid_trial() -> bool:  # a trial on the worker node has finished its first epoch
        for lease in results.glob("runs/*/lease.json"):
            progress = lease.parent / "progress.json"
            try:
                if json.loads(lease.read_text())["host"] == worker and json.loads(progress.read_text())["epoch"] >= 1:
                    return True
            except (OSError, ValueError, KeyError):
                continue
        return False

    wait_until(f"a trial to run on {worker}", worker_mid_trial, timeout=240, every=0.5)
    try:
        run("bash", str(DEV_CLUSTER), "node-down", worker)
        runs = wait_finished(job_id, tasks=1, timeout=400)
    finally:
        run("bash", str(DEV_CLUSTER), "node-up", worker, timeout=120)
    assert runs[-1][1] == "COMPLETED", runs
    phases = read_table(results, "phases").to_pandas()
    assert phases["run_id"].nunique() == 2
    for _, trial in phases.groupby("run_id"):
        assert sorted(trial["phase"]) == [0, 1, 2, 3]  # every phase once, the lost trial's too
    lost = phases[phases["host"] == worker]["run_id"].unique()
    assert len(lost) == 1 and set(phases[phases["run_id"] == lost[0]]["host"]) == {head, worker}
