"""Against a real SLURM cluster (the dev cluster: ``bash slurm/dev-cluster.sh start``).

Submission to the ``gpu`` partition with a (fake) GPU, job arrays (multi-seed prune, a PTQ sweep),
a preempted and a timed-out prune job that requeue and resume with rows identical to an
uninterrupted run's, ``scancel``, and bad input that submits nothing. Everything runs on the tiny
synthetic CIFAR-10 with one CPU per job; the whole file takes a few minutes. Every test skips,
saying why, when no SLURM (with accounting, partitions ``debug`` and ``gpu``) is reachable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compress.results import read_table
from jobs.cluster import ExecutorError, cluster_partitions
from jobs.executors import build_executor
from jobs.runs import run_dir
from jobs.slurm_jobs import finished_runs, inspect_jobs
from jobs.specs import PruneSpec
from jobs.training import run_prune
from tests.helpers import EPOCHS, PHASES, assert_same_rows, mid_phase, rows, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# columns that differ between two runs of one spec by design: ids, timings, provenance


@pytest.fixture(scope="module")
def cluster() -> dict[str, int]:
    """The reachable cluster's partitions (GPUs per node); skips when there is none to test against."""
    try:
        partitions = cluster_partitions()
    except ExecutorError as e:
        pytest.skip(f"no SLURM reachable ({e}); start the dev cluster: bash slurm/dev-cluster.sh start")
    if not {"debug", "gpu"} <= set(partitions) or partitions["gpu"] < 1:
        pytest.skip(f"needs partitions debug and gpu with a GPU (the dev cluster); found {partitions}")
    if subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True).returncode != 0:
        pytest.skip("SLURM accounting (sacct) is not available: job states cannot be read")
    return partitions


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def tiny(synthetic_cifar: Path, synthetic_weights: Path, work: Path) -> Callable[..., PruneSpec]:
    """A prune spec on the synthetic set: 250 training images in 10 batches, 100 test images."""

    def make(run_id: str, **changes: Any) -> PruneSpec:
        fields = dict(data_root=str(synthetic_cifar), weights=str(synthetic_weights), results=str(work / "results"),
                      run_id=run_id, phases=PHASES, epochs=EPOCHS, final_sparsity=0.5, batch_size=25,
                      test_size=100, eval_batch_size=100, lr=2e-3)
        fields.update(changes)
        return PruneSpec(**fields)

    return make


@pytest.fixture(scope="module")
def reference(cluster: dict[str, int], tiny: Callable[..., PruneSpec], work: Path) -> Any:
    """An uninterrupted run of the spec the preemption and timeout tests interrupt (submitted once)."""
    ex = build_executor(partition="debug", folder=str(work / "jobs"), time="10")
    return ex.submit(run_prune, tiny("reference"))


def settled(job_id: str, folder: Path) -> Any:
    """The job's report once SLURM has recorded its end (the result pickle comes a moment before)."""

    def ended() -> Any:
        (r,) = inspect_jobs([job_id], folder)
        return r if r.state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "UNKNOWN") else None  # UNKNOWN:
        # accounting has no record yet of a job submitted a moment ago

    return wait_until(f"job {job_id} to end", ended, 60, 0.5)


def report(job: Any, work: Path) -> Any:
    return settled(job.job_id, work / "jobs")


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout


def squeue_ids() -> str:
    """The ids of every queued and running job (to show that nothing was submitted)."""
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout


def launch(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_prune_on_gpu_partition_writes_its_rows(cluster, synthetic_cifar, synthetic_weights, work):
    results, folder = work / "gpu-results", work / "gpu-jobs"
    res = launch("prune", "--partition", "gpu", "--gpus", "1", "--wait", "--folder", str(folder),
                 "--results", str(results), "--run-id", "on-gpu", "--data-root", str(synthetic_cifar),
                 "--weights", str(synthetic_weights), "--phases", "1", "--epochs", "1", "--final-sparsity", "0.5",
                 "--test-size", "100", "--batch-size", "50", "--no-randaugment")
    assert res.exit_code == 0, res.output + res.stderr
    assert "final: top-1" in res.output
    phases = read_table(results, "phases").to_pandas()
    assert sorted(phases["phase"]) == [0, 1] and set(phases["run_id"]) == {"on-gpu"}
    assert len(read_table(results, "modules")) > 0
    (r,) = inspect_jobs([], folder)
    r = settled(r.job_id, folder)
    assert r.state == "COMPLETED" and r.progress.startswith("finished") and r.log.exists()
    assert phases["job_id"].iloc[0] == r.job_id  # provenance names the SLURM job
    tres = subprocess.run(["sacct", "-n", "-X", "-P", "-j", r.job_id, "-o", "AllocTRES"], capture_output=True,
                          text=True, check=True).stdout
    assert "gres/gpu=1" in tres, tres  # SLURM allocated one GPU; torch sees none on the dev cluster, ran on CPU


def test_seeds_go_out_as_one_array(cluster, synthetic_cifar, synthetic_weights, work):
    results, folder = work / "seed-results", work / "seed-jobs"
    res = launch("prune", "--seeds", "0,1,2", "--partition", "debug", "--array-parallelism", "2", "--wait",
                 "--folder", str(folder), "--results", str(results), "--run-id", "seeds",
                 "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights), "--phases", "1",
                 "--epochs", "1", "--test-size", "100", "--batch-size", "50", "--no-randaugment")
    assert res.exit_code == 0, res.output + res.stderr
    reports = [settled(r.job_id, folder) for r in inspect_jobs([], folder)]
    arrays = {r.job_id.split("_")[0] for r in reports}
    assert len(arrays) == 1 and sorted(r.job_id.split("_")[1] for r in reports) == ["0", "1", "2"]
    assert all(r.state == "COMPLETED" for r in reports)
    phases = read_table(results, "phases").to_pandas()
    assert sorted(phases.groupby("run_id")["spec_seed"].first().items()) == [
        ("seeds-s0", 0), ("seeds-s1", 1), ("seeds-s2", 2)]
    assert len(phases) == 3 * 2  # phase 0 and 1 of each seed, once
    array = arrays.pop()
    assert "#SBATCH --array=0-2%2" in (folder / array / f"{array}_submission.sh").read_text()


def test_ptq_sweep_goes_out_as_one_array(cluster, synthetic_cifar, synthetic_weights, work):
    results, folder = work / "ptq-results", work / "ptq-jobs"
    res = launch("ptq", "--partition", "debug", "--array-parallelism", "2", "--wait", "--folder", str(folder),
                 "--results", str(results), "--run-id", "sweep", "--data-root", str(synthetic_cifar),
                 "--weights", str(synthetic_weights), "--methods", "manual", "--observers", "minmax,histogram",
                 "--calib-sizes", "50,100", "--alphas", "0.9,1.0", "--centers", "min,zero", "--test-size", "100",
                 "--eval-batch-size", "100", "--calib-batch-size", "50")
    assert res.exit_code == 0, res.output + res.stderr
    reports = [settled(r.job_id, folder) for r in inspect_jobs([], folder)]
    assert len({r.job_id.split("_")[0] for r in reports}) == 1 and len(reports) == 4  # one array, 4 tasks
    assert all(r.state == "COMPLETED" and r.progress.startswith("task ") for r in reports)
    table = read_table(results, "ptq").to_pandas()
    assert len(table) == 16  # 2 observers x 2 calibration sizes x 2 alphas x 2 centers, each once
    assert not table[["observer", "calib_size", "alpha", "center"]].duplicated().any()
    assert set(table["job_id"]) == {r.job_id for r in reports}  # each task wrote its own rows


USER_MODEL = """
from torch import nn


def small_cnn(num_classes=10, width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
"""


def test_a_users_model_on_an_image_folder_goes_out_as_arrays(cluster, synthetic_cifar, work, monkeypatch):
    """``--model mynets:small_cnn`` (a module outside the repository, on PYTHONPATH) on an ``imagefolder:``:
    a 2-seed train array and a 2-task pt2e PTQ array; the nodes import the module (the node check looks
    for its source file first), and every row names the file's sha256."""
    import hashlib

    from compress.imagefolder import write_imagefolder

    code = work / "usercode"
    code.mkdir()
    (code / "mynets.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setenv("PYTHONPATH", str(code))  # what the jobs inherit (sbatch --export=ALL)
    images = work / "images"
    write_imagefolder(images, synthetic_cifar, 200, 50)
    results, folder = work / "user-results", work / "user-jobs"
    common = ["--model", "mynets:small_cnn", "--data", f"imagefolder:{images}", "--partition", "debug",
              "--array-parallelism", "2", "--wait", "--folder", str(folder), "--results", str(results)]
    res = launch("train", *common, "--seeds", "0,1", "--run-id", "mine", "--epochs", "1", "--batch-size", "50",
                 "--no-randaugment")
    assert res.exit_code == 0, res.output + res.stderr
    phases = read_table(results, "phases").to_pandas()
    assert sorted(phases["run_id"].unique()) == ["mine-s0", "mine-s1"] and len(phases) == 4
    sha = hashlib.sha256((code / "mynets.py").read_bytes()).hexdigest()
    assert set(phases["model_source_sha256"]) == {sha} and set(phases["data_kind"]) == {"imagefolder"}
    assert set(phases["job_id"].str.split("_").str[0]) == {phases["job_id"].iloc[0].split("_")[0]}  # one array
    res = launch("ptq", *common, "--run", "mine-s0", "--run-id", "mine-q", "--methods", "pt2e",
                 "--observers", "minmax,histogram", "--calib-sizes", "100", "--eval-batch-size", "50")
    assert res.exit_code == 0, res.output + res.stderr
    ptq = read_table(results, "ptq").to_pandas()
    assert sorted(ptq["observer"]) == ["histogram", "minmax"] and (ptq["program_bytes"] > 0).all()
    assert set(ptq["spec_model"]) == {"mynets:small_cnn"} and set(ptq["model_source_sha256"]) == {sha}
    assert len(set(ptq["job_id"])) == 2 and ptq["test_images"].iloc[0] == 50


def test_large_ptq_sweep_splits_into_arrays_of_chunked_tasks(cluster, synthetic_cifar, synthetic_weights, work,
                                                             monkeypatch):
    """More tasks than MaxArraySize: several arrays, each job runs a chunk of tasks; every row once."""
    import jobs.executors
    from jobs.cluster import max_array_size

    assert max_array_size() == int(re.search(r"MaxArraySize\s*=\s*(\d+)", scontrol("show", "config")).group(1)) - 1
    # where SlurmExecutor.map_array looks it up; as on a cluster with MaxArraySize=3
    monkeypatch.setattr(jobs.executors, "max_array_size", lambda: 2)
    results, folder = work / "big-results", work / "big-jobs"
    res = launch("ptq", "--partition", "debug", "--array-parallelism", "2", "--tasks-per-job", "2", "--wait",
                 "--folder", str(folder), "--results", str(results), "--run-id", "big", "--seeds", "0,1",
                 "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights), "--methods", "manual",
                 "--calib-sizes", "20,40,60", "--alphas", "0.9,1.0", "--centers", "min,zero", "--test-size", "100",
                 "--eval-batch-size", "100", "--calib-batch-size", "20")
    assert res.exit_code == 0, res.output + res.stderr
    reports = [settled(r.job_id, folder) for r in inspect_jobs([], folder)]
    arrays = {r.job_id.split("_")[0] for r in reports}
    assert len(reports) == 3 and len(arrays) == 2  # 6 tasks in chunks of 2 -> 3 jobs, arrays of at most 2
    assert all(r.state == "COMPLETED" for r in reports)
    table = read_table(results, "ptq").to_pandas()
    assert len(table) == 2 * 3 * 2 * 2  # seeds x calibration sizes x alphas x centers, each once
    assert not table[["run_id", "calib_size", "alpha", "center"]].duplicated().any()
    assert sorted(table.groupby("run_id")["spec_seed"].first().items()) == [("big-s0", 0), ("big-s1", 1)]
    assert len(set(table["job_id"])) == 3  # each job wrote the rows of its two tasks


def test_preempted_prune_resumes_with_identical_rows(reference, tiny, work):
    spec = tiny("preempted")
    job = build_executor(partition="debug", folder=str(work / "jobs"), time="10").submit(run_prune, spec)
    wait_until("the job to be inside a phase", mid_phase(spec))
    job._interrupt()  # SIGTERM then USR2: what SLURM sends on preemption
    summary = job.result()
    r = report(job, work)
    assert r.state == "COMPLETED" and r.requeues >= 1
    log = r.log.read_text()
    assert "resuming preempted at phase" in log and "restart 1," in log
    reference.result()
    assert summary["top1"] == json.loads((run_dir(tiny("reference")) / "summary.json").read_text())["top1"]
    assert_same_rows(spec, tiny("reference"))


def job_python(job_id: str) -> int:
    """The pid of the job's Python process (the submitit runner) on this node.

    Not the ``srun`` that launched it: its command line names ``submitit.core._submit`` as well.
    """
    for line in scontrol("listpids", job_id).splitlines()[1:]:
        pid = line.split()[0]
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"submitit.core._submit" in argv and Path(argv[0].decode()).name.startswith("python"):
            return int(pid)
    raise AssertionError(f"no Python process in job {job_id}")


def run_seconds(job_id: str) -> int:
    """How long the job has run (scontrol's RunTime, [D-]HH:MM:SS), in seconds."""
    text = scontrol("show", "job", "-o", job_id).split("RunTime=", 1)[1].split()[0]
    days, _, hms = text.rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def usr2_arrived(pid: int) -> bool:
    """SIGUSR2 waits in the stopped process's pending masks, or the process already handled it and left
    (SLURM sends SIGCONT with the signal, which wakes a stopped task)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m & (1 << (signal.SIGUSR2 - 1)) for m in masks)


def test_timed_out_prune_requeues_and_resumes(reference, tiny, work):
    spec = tiny("timed-out")
    job = build_executor(partition="debug", folder=str(work / "jobs"), time="10").submit(run_prune, spec)
    wait_until("the job to be inside a phase", mid_phase(spec))
    # the time limit drops to 1-2 minutes past what the job has run, so SLURM's own time-limit check
    # (every 30 s) sends USR2 (--signal-delay 90 s > what is left) while the hard limit is still a
    # minute or so away: time for the checkpoint and the requeue. The job is held (SIGSTOP) until the
    # signal comes, so it cannot finish first on a fast machine; it goes on exactly where it was.
    pid = job_python(job.job_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        ran = run_seconds(job.job_id)
        scontrol("update", f"JobId={job.job_id}", f"TimeLimit={ran // 60 + 2}")
        wait_until("SLURM's time-limit signal", lambda: usr2_arrived(pid), 90, 0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    wait_until("the requeue", lambda: "Restarts=0" not in scontrol("show", "job", "-o", job.job_id), 60, 0.5)
    scontrol("update", f"JobId={job.job_id}", "TimeLimit=10")
    job.result()
    r = report(job, work)
    assert r.state == "COMPLETED" and r.requeues >= 1
    assert "this job is timed-out" in r.log.read_text()
    reference.result()
    assert_same_rows(spec, tiny("reference"))


def test_cancelled_job_shows_cancelled_and_no_partial_rows(cluster, tiny, work):
    spec = tiny("cancelled")
    job = build_executor(partition="debug", folder=str(work / "jobs"), time="10").submit(run_prune, spec)
    wait_until("the job to be inside a phase", mid_phase(spec))
    subprocess.run(["scancel", job.job_id], check=True)
    assert report(job, work).state == "CANCELLED"
    wait_until("the job's processes to end", lambda: job.job_id not in squeue_ids(), 30, 0.5)
    res = launch("status", job.job_id, "--folder", str(work / "jobs"))
    assert "CANCELLED" in res.output and "stopped at phase" in res.output
    stopped = torch.load(run_dir(spec) / "state.pt", map_location="cpu", weights_only=False)
    assert not (run_dir(spec) / "summary.json").exists() and spec.run_id not in finished_runs(spec.results)
    # rows exist only for phases that finished before the cancel; the phase in flight has none (and when
    # this runs alone, no run has written an epochs table yet)
    def phases_in(table: str) -> set[int]:
        return set(rows(spec, table)["phase"]) if (Path(spec.results) / table).exists() else set()

    assert phases_in("phases") == set(range(stopped["phase"]))
    assert phases_in("epochs") <= set(range(1, stopped["phase"]))
    modules = read_table(spec.results, "modules").to_pandas() if (Path(spec.results) / "modules").exists() else None
    assert modules is None or spec.run_id not in set(modules["run_id"])


@pytest.mark.parametrize("bad, expected", [
    (["--partition", "nope"], "partition='nope' is unknown; known: "),
    (["--partition", "gpu", "--gpus", "99"], "gpus=99 is more than a node of partition 'gpu' has"),
    (["--partition", "gpu", "--folder", "{file}/jobs"], "is not writable"),
    (["--partition", "gpu", "--time", "2h"], "time='2h' is invalid"),
    (["--partition", "debug", "--results", "/dev/shm/compress-test-results"],  # tmpfs: no other node sees it
     "results='/dev/shm/compress-test-results' is invalid: on tmpfs, local to this machine"),
    (["--partition", "debug", "--folder", "/dev/shm/compress-test-jobs"],
     "folder='/dev/shm/compress-test-jobs' is invalid: on tmpfs, local to this machine"),
])
def test_bad_input_is_one_line_and_submits_nothing(cluster, synthetic_cifar, synthetic_weights, tmp_path, bad,
                                                   expected):
    (tmp_path / "file").write_text("")
    bad = [b.replace("{file}", str(tmp_path / "file")) for b in bad]
    folder = tmp_path / "jobs"
    args = ["prune", "--results", str(tmp_path / "results"), "--data-root", str(synthetic_cifar),
            "--weights", str(synthetic_weights), "--phases", "1", "--epochs", "1"]
    if "--folder" not in bad:
        args += ["--folder", str(folder)]
    before = squeue_ids()
    res = launch(*args, *bad)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and expected in res.stderr
    assert not folder.exists() and not (tmp_path / "results").exists()
    assert not list(Path("/dev/shm").glob("compress-test-*"))
    assert squeue_ids() == before


@pytest.mark.parametrize("hidden", ["folder", "results", "data_root"])
def test_what_no_node_sees_is_refused_and_left_as_it_was(cluster, synthetic_cifar, synthetic_weights, tmp_path,
                                                         hidden):
    """The launcher sees a folder (or the data) that the nodes do not: a disk mounted on this machine only.

    The launcher runs in its own mount namespace where ``view`` is ``private`` bind-mounted; the
    slurmd and its steps see the plain ``view``. The node check must refuse in one line, naming the
    option, and leave both sides as they were.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the launcher a mount of its own")
    view, private = tmp_path / "view", tmp_path / "private"
    view.mkdir()
    private.mkdir()
    paths = {"folder": tmp_path / "jobs", "results": tmp_path / "results", "data_root": synthetic_cifar}
    paths[hidden] = view / hidden
    if hidden == "data_root":  # the launcher has the data (its preflight reads it); the nodes an empty folder
        shutil.copytree(synthetic_cifar, private / hidden)
        (view / hidden).mkdir()
    cmd = [sys.executable, "-m", "jobs.launch", "prune", "--partition", "debug", "--folder", str(paths["folder"]),
           "--results", str(paths["results"]), "--data-root", str(paths["data_root"]), "--weights",
           str(synthetic_weights), "--phases", "1", "--epochs", "1"]
    script = f'mount --bind "{private}" "{view}" && exec "$@"'
    before = squeue_ids()
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    problem = ("is not there on node \\S+ of partition 'debug' \\(the job reads it there\\)" if hidden == "data_root"
               else "is not visible on node \\S+ of partition 'debug': a file written into it here is not there")
    # the data is named by the file the job would read first (the test split), the folders as given
    assert re.fullmatch(rf"error: {hidden}='{re.escape(str(paths[hidden]))}[^']*' {problem}.*\n", res.stderr), \
        res.stderr
    assert squeue_ids() == before
    # what the check created is gone: only the data, on both sides, and the nodes' folder is still empty
    kept = [hidden] if hidden == "data_root" else []
    assert [p.name for p in private.iterdir()] == kept and [p.name for p in view.iterdir()] == kept
    assert all(not list(p.iterdir()) for p in view.iterdir())
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "results").exists()


def test_what_a_node_saw_is_remembered(cluster, synthetic_weights, work):
    """The second submission to the same folders runs no check; --no-check-nodes runs none and writes nothing."""
    from jobs.cluster import NODE_CHECK_CACHE, partition_nodes, this_host

    folder, results = work / "seen-jobs", work / "seen-results"
    inputs = [("weights", str(synthetic_weights))]
    build_executor(partition="debug", folder=str(folder), time="10", shared=[str(results)], inputs=inputs)
    caches = [json.loads((p / NODE_CHECK_CACHE).read_text()) for p in (folder, results)]
    key = f"{this_host()} debug"
    assert sorted(caches[0]) == [key, f"{key} {synthetic_weights.resolve()}"]  # the inputs: in the job folder's
    assert list(caches[1]) == [key]
    assert {entry["node"] for cache in caches for entry in cache.values()} <= set(partition_nodes("debug"))
    assert sorted(p.name for p in folder.iterdir()) == [NODE_CHECK_CACHE]  # no marker left behind
    assert sorted(p.name for p in results.iterdir()) == [NODE_CHECK_CACHE]
    build_executor(partition="debug", folder=str(folder), time="10", shared=[str(results)], inputs=inputs)
    assert [json.loads((p / NODE_CHECK_CACHE).read_text()) for p in (folder, results)] == caches  # not checked again
    unchecked = work / "unchecked-jobs"
    build_executor(partition="debug", folder=str(unchecked), time="10", check_nodes=False)
    assert unchecked.is_dir() and not (unchecked / NODE_CHECK_CACHE).exists()


def test_a_busy_partition_is_a_warning_not_a_refusal(cluster, work, monkeypatch, caplog):
    """No node free within the wait: the folders could not be checked; the job is still submitted as asked."""
    import jobs.cluster
    from jobs.cluster import NODE_CHECK_CACHE, partition_nodes

    monkeypatch.setattr(jobs.cluster, "NODE_CHECK_WAIT", 2)
    blockers = [subprocess.run(["sbatch", "--parsable", "-p", "debug", "--exclusive", "-w", node, "-o", "/dev/null",
                                "--wrap", "sleep 600"], capture_output=True, text=True, check=True).stdout.strip()
                for node in partition_nodes("debug")]
    try:
        wait_until("the blockers to hold every node", lambda: set(subprocess.run(
            ["squeue", "-h", "-o", "%T", "-j", ",".join(blockers)], capture_output=True, text=True).stdout.split())
            == {"RUNNING"}, timeout=300, every=1)
        folder = work / "busy-jobs"
        with caplog.at_level("WARNING", logger="jobs.cluster"):
            ex = build_executor(partition="debug", folder=str(folder), time="10")
        assert ex.folder == folder.resolve() and not (folder / NODE_CHECK_CACHE).exists()
        warned = [r.getMessage() for r in caplog.records if "not checked from a node" in r.getMessage()]
        assert len(warned) == 1 and "partition 'debug'" in warned[0] and "busy" in warned[0].lower(), warned
    finally:
        subprocess.run(["scancel", *blockers], check=False)


def test_failed_job_shows_its_error(cluster, tiny, work):
    spec = dataclasses.replace(tiny("broken"), data_root=str(work / "no-such-data"))
    job = build_executor(partition="debug", folder=str(work / "jobs"), time="5").submit(run_prune, spec)
    with pytest.raises(Exception, match="CIFAR-10 not found"):
        job.result()
    r = report(job, work)
    assert r.state == "FAILED" and r.error.startswith("compress.data.DataError: CIFAR-10 not found")
    res = launch("status", job.job_id, "--folder", str(work / "jobs"))
    assert "FAILED" in res.output and "error: compress.data.DataError: CIFAR-10 not found" in res.output


def test_two_ptq_searches_run_inside_slurm_jobs_at_once(cluster, synthetic_cifar: Path, synthetic_weights: Path,
                                                        work: Path) -> None:
    """``tune ptq --partition debug`` twice: each search starts its own Ray inside its job; rows of both arrive."""
    results = work / "tune-results"
    args = ["tune", "ptq", "--weights", str(synthetic_weights), "--data-root", str(synthetic_cifar),
            "--results", str(results), "--methods", "manual", "--calib-sizes", "50", "--calib-batch-size", "50",
            "--eval-batch-size", "100", "--space", "alphas=grid:0.95,1.0", "--searcher", "grid",
            "--scheduler", "fifo", "--num-samples", "1", "--max-concurrent", "2", "--partition", "debug", "--cpus", "1",
            "--folder", str(work / "tune-jobs")]
    runner = CliRunner()
    submitted = [runner.invoke(cli, [*args, "--search-id", f"slurm-search-{i}"]) for i in (1, 2)]
    for res in submitted:
        assert res.exit_code == 0, res.output
    job_ids = [res.output.split("submitted job ", 1)[1].split(":", 1)[0] for res in submitted]
    ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
    jobs = wait_until("both searches to end", lambda: (lambda rs: rs if all(r.state in ended for r in rs) else None)(
        inspect_jobs(job_ids, str(work / "tune-jobs"), 0)), timeout=300, every=2)
    assert [(r.state, r.error) for r in jobs] == [("COMPLETED", "")] * 2
    rows = read_table(results, "ptq").to_pandas()
    for i in (1, 2):
        mine = rows[rows["search_id"] == f"slurm-search-{i}"]
        assert sorted(mine["alpha"]) == [0.95, 1.0]
        assert mine["job_id"].nunique() == 1 and mine["job_id"].iloc[0] == job_ids[i - 1]


def test_two_submissions_of_one_run_id(cluster, synthetic_cifar, synthetic_weights, work):
    """The second submission is refused at once (the first job holds the run's lease from before sbatch)."""
    results, folder = work / "dup-results", work / "dup-jobs"
    args = ["prune", "--partition", "debug", "--folder", str(folder), "--results", str(results), "--run-id", "dup",
            "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights), "--phases", "1",
            "--epochs", "2", "--final-sparsity", "0.5", "--test-size", "100", "--batch-size", "50"]
    first = launch(*args)
    assert first.exit_code == 0, first.output + first.stderr
    job_id = first.output.split("submitted job ", 1)[1].split(":", 1)[0]
    queued = squeue_ids()
    for extra in ([], ["--seed", "3"]):  # the same spec (work done twice) and another spec (rows mixed)
        second = launch(*args, *extra)
        assert second.exit_code == 2 and len(second.stderr.splitlines()) == 1, second.output + second.stderr
        assert second.stderr.startswith(f"error: run dup is in use by {job_id}") or (
            "holds another spec (seed 0 there, 3 here)" in second.stderr), second.stderr
        assert squeue_ids() == queued
    r = settled(job_id, folder)
    assert r.state == "COMPLETED", r
    phases = read_table(results, "phases").to_pandas()
    assert sorted(phases["phase"]) == [0, 1] and set(phases["job_id"]) == {job_id} and set(phases["spec_seed"]) == {0}
    assert not (results / "runs" / "dup" / "lease.json").exists()
    again = launch("prune", "--resume", "dup", "--results", str(results), "--partition", "debug", "--folder",
                   str(folder), "--wait")  # the finished run, resumed: no lease left, nothing trained twice
    assert again.exit_code == 0 and "already finished" in again.output, again.output + again.stderr
    assert len(read_table(results, "phases")) == 2


def test_wait_prints_the_final_state_and_error_of_a_failed_job(cluster, synthetic_cifar, synthetic_weights, work,
                                                               tmp_path):
    """The data is there when the launcher checks it and gone on the node (the job's setup line moves it)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_cifar, data)
    res = launch("prune", "--partition", "debug", "--wait", "--folder", str(work / "fail-jobs"),
                 "--setup", f"mv {data} {data}.gone", "--results", str(work / "fail-results"),
                 "--run-id", "fails-on-node", "--data-root", str(data), "--weights", str(synthetic_weights),
                 "--phases", "1", "--epochs", "1")
    assert res.exit_code == 1, res.output + res.stderr
    job_id = res.output.split("submitted job ", 1)[1].split(":", 1)[0]
    assert res.stderr.startswith(f"job {job_id} FAILED: compress.data.DataError: CIFAR-10 not found under {data}")
    assert len(res.stderr.splitlines()) == 1


def test_plain_sbatch_template_requeues_and_resumes(cluster, tiny, work):
    """slurm/templates/prune.sbatch (no submitit): a requeued job continues its run, rows exactly once."""
    from tests.conftest import REPO

    spec = tiny("template", epochs=3)
    logs = work / "template-logs"
    logs.mkdir()
    args = ["--data-root", spec.data_root, "--weights", spec.weights, "--results", spec.results, "--phases", "2",
            "--epochs", "3", "--final-sparsity", "0.5", "--batch-size", "25", "--test-size", "100",
            "--eval-batch-size", "100", "--lr", "0.002"]
    env = {**os.environ, "RUN_ID": "template", "PYTHON": str(Path(sys.executable))}
    out = subprocess.run(["sbatch", "--parsable", "--partition=debug", "--gpus-per-node=0", "--cpus-per-task=1",
                          "--mem=0", f"--output={logs}/%j.out", "--export=ALL",
                          str(REPO / "slurm" / "templates" / "prune.sbatch"), *args],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    job_id = out.stdout.strip().split(";")[0]
    wait_until("the job to be inside a phase", mid_phase(spec))
    scontrol("requeue", job_id)
    wait_until("the requeued job to finish", lambda: (run_dir(spec) / "summary.json").exists(), 300, 1.0)
    log = (logs / f"{job_id}.out").read_text()
    assert "restart 1" in log and "resuming where it stopped" in log, log[-2000:]
    phases = rows(spec, "phases")
    assert sorted(phases["phase"]) == [0, 1, 2]
    assert len(rows(spec, "epochs")) == 2 * 3
