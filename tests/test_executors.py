"""The executor seam without a cluster: option checking, the rendered sbatch script, sinfo parsing,
bad input through the CLI (one line, exit 2, nothing written), the requeueable wrapper and ``status``
on job folders. The same paths against a real cluster are in ``test_slurm.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from jobs.cluster import ExecutorError, check_cluster, check_folder, parse_sinfo
from jobs.executors import LocalExecutor, build_executor
from jobs.slurm_jobs import Requeueable, find_jobs, finished_runs, run_progress
from jobs.slurm_options import ExecutorOptions, gpu_flag, gres_gpus, parse_time, render_sbatch, slurm_parameters
from jobs.specs import PruneSpec, PTQSpec
from tests.conftest import REPO


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("45:30", 46), ("1:30:00", 90), ("2-00:00:00", 2880), ("1-12", 2160), ("0-00:30", 30),
    (" 5 ", 5), ("0:59", 1),
])
def test_parse_time_reads_slurm_formats(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["1h", "", "1:2:3:4", "-5", "1.5", "2-"])
def test_parse_time_rejects_other_forms(text):
    with pytest.raises(ValueError, match="use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS"):
        parse_time(text)


@pytest.mark.parametrize("changes, message", [
    ({"gpus": -1}, "gpus=-1 is invalid: must be >= 0"),
    ({"cpus": 0}, "cpus=0 is invalid: must be >= 1"),
    ({"mem": "4X"}, "mem='4X' is invalid"),
    ({"time": "0"}, "time='0' is invalid: must be at least one minute"),
    ({"array_parallelism": 0}, "array_parallelism=0 is invalid"),
    ({"sbatch": ("partition=other",)}, "--partition has its own option here"),
    ({"sbatch": ("--gpus=2",)}, "--gpus has its own option here"),
    ({"sbatch": ("not a flag",)}, "use KEY=VALUE or KEY"),
    ({"folder": ""}, "folder='' is invalid"),
    ({"partition": "", "gpus": 1, "time": "5"}, "SLURM option(s) --gpus, --time given without --partition"),
    ({"gpu_request": "gpus"}, "gpu_request='gpus' is invalid: use one of auto, gpus-per-node, gres"),
    ({"partition": "", "gpu_request": "gres"}, "SLURM option(s) --gpu-request given without --partition"),
    ({"gpus": 1, "sbatch": ("gres=gpu:a100:1",)},
     "sbatch='gres=gpu:a100:1' is invalid: it asks for GPUs and so does --gpus 1: give them once"),
])
def test_options_name_the_bad_field(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ExecutorOptions(**{"partition": "gpu", **changes})


def test_gres_is_not_a_managed_flag():
    """Extra flags the options do not own pass through (``gres`` for typed GPUs, say)."""
    opts = ExecutorOptions(partition="gpu", sbatch=("gres=gpu:a100:1", "exclusive"))
    assert "#SBATCH --gres=gpu:a100:1" in render_sbatch(opts) and "#SBATCH --exclusive" in render_sbatch(opts)


def test_rendered_sbatch_script():
    """Golden: what submitit writes for a fully specified launch."""
    opts = ExecutorOptions(partition="gpu", gpus=2, gpu_request="gpus-per-node", cpus=8, mem="16g", time="1-02:00:00",
                           account="proj",
                           qos="high", sbatch=("constraint=a100",), setup=("source /shared/venv/bin/activate",),
                           folder="/shared/jobs", signal_delay=120, array_parallelism=4)
    assert render_sbatch(opts, command="PY -u -m submitit.core._submit F") == """#!/bin/bash

# Parameters
#SBATCH --account=proj
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=2
#SBATCH --job-name=compress
#SBATCH --mem=16G
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/jobs/%j/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@120
#SBATCH --time=1560
#SBATCH --wckey=submitit

# setup
source /shared/venv/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/jobs/%j/%j_%t_log.out PY -u -m submitit.core._submit F
"""


def test_parse_sinfo_takes_the_most_gpus_of_a_node():
    text = "debug|(null)\ngpu|gpu:2\ngpu|gpu:4(S:0-1)\na100|gpu:a100:4(S:0-1),shard:8\nmix|gpu:a100:2,gpu:v100:1\n"
    assert parse_sinfo(text) == {"debug": 0, "gpu": 4, "a100": 4, "mix": 3}


def test_check_cluster_lists_what_exists():
    parts = {"debug": 0, "gpu": 2}
    with pytest.raises(ExecutorError, match="partition='big' is unknown; known: debug, gpu"):
        check_cluster(ExecutorOptions(partition="big"), parts)
    with pytest.raises(ExecutorError, match=r"gpus=3 is more than a node of partition 'gpu' has \(2\)"):
        check_cluster(ExecutorOptions(partition="gpu", gpus=3), parts)
    with pytest.raises(ExecutorError, match=r"partition 'debug' has \(0\); partitions with GPUs: gpu \(2\)"):
        check_cluster(ExecutorOptions(partition="debug", gpus=1), parts)
    check_cluster(ExecutorOptions(partition="gpu", gpus=2), parts)


def test_check_folder_creates_it_or_says_why_not(tmp_path):
    assert check_folder(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ExecutorError, match="folder=.*file/jobs' is not writable: Not a directory"):
        check_folder(tmp_path / "file" / "jobs")


def test_no_partition_runs_here_in_order():
    ex = build_executor()
    assert isinstance(ex, LocalExecutor)
    jobs = ex.map_array(pow, [2, 3, 4], [2, 2, 2])
    assert [j.result() for j in jobs] == [4, 9, 16] and all(j.state == "COMPLETED" for j in jobs)


def test_no_sinfo_means_no_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ExecutorError, match="no SLURM here: sinfo is not on PATH"):
        build_executor(partition="gpu")


@pytest.fixture
def fake_sinfo(tmp_path, monkeypatch) -> None:
    """A ``sinfo`` that answers like a cluster with a CPU and a 2-GPU partition (nothing can be submitted)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\nprintf 'debug|(null)\\ngpu|gpu:2\\n'\n")
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


@pytest.fixture
def fake_slurm(fake_sinfo, tmp_path) -> Callable[[str], Path]:
    """``fake_sinfo`` plus an ``scontrol show config`` naming the select plugin (the argument: ``select/...``)
    and an ``sbatch`` that takes every script (job 4242) and leaves it to submitit to file in the job folder."""
    bin_dir = tmp_path / "bin"
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "sbatch").chmod(0o755)

    def cluster(select: str) -> Path:
        (bin_dir / "scontrol").write_text(f"#!/bin/sh\nprintf 'MaxArraySize            = 1001\\n"
                                          f"SelectType              = {select}\\n"
                                          f"SelectTypeParameters    = CR_CPU_Memory\\n'\n")
        (bin_dir / "scontrol").chmod(0o755)
        return tmp_path / "jobs" / "4242" / "4242_submission.sh"

    return cluster


@pytest.mark.parametrize("bad, expected", [
    (["--partition", "nope"], "error: partition='nope' is unknown; known: debug, gpu"),
    (["--partition", "debug", "--gpus", "1"], "error: gpus=1 is more than a node of partition 'debug' has (0)"),
    (["--partition", "gpu", "--folder", "{file}/jobs"], "is not writable: Not a directory"),
    (["--gpus", "1"], "error: partition='' is invalid: SLURM option(s) --gpus given without --partition"),
    (["--partition", "gpu", "--sbatch", "time=5"], "error: sbatch='time=5' is invalid: --time has its own option"),
    (["--seeds", "0,x"], "error: seeds='0,x' is invalid"),
])
def test_bad_launch_is_one_line_exit_2_and_writes_nothing(fake_sinfo, synthetic_cifar, synthetic_weights, tmp_path,
                                                          bad, expected):
    (tmp_path / "file").write_text("")
    bad = [b.replace("{file}", str(tmp_path / "file")) for b in bad]
    args = ["prune", "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights),
            "--results", str(tmp_path / "results"), "--phases", "1", "--epochs", "1"]
    if "--folder" not in bad:
        args += ["--folder", str(tmp_path / "jobs")]
    res = CliRunner().invoke(cli, args + bad)
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and expected in res.stderr
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "results").exists()


def test_dry_run_shows_each_seed_and_the_sbatch_script(fake_slurm, synthetic_cifar, tmp_path):
    fake_slurm("select/cons_tres")
    res = CliRunner().invoke(cli, ["prune", "--data-root", str(synthetic_cifar), "--run-id", "x", "--seeds", "3,4",
                                   "--partition", "gpu", "--gpus", "1", "--folder", str(tmp_path / "jobs"),
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert '"run_id": "x-s3"' in res.output and '"run_id": "x-s4"' in res.output
    assert '"seed": 3' in res.output and '"seed": 4' in res.output
    assert "#SBATCH --gpus-per-node=1" in res.output and "#SBATCH --partition=gpu" in res.output
    assert not (tmp_path / "jobs").exists()


def test_seeds_run_one_after_another_here(synthetic_cifar, synthetic_weights, tmp_path):
    from compress.results import read_table

    res = CliRunner().invoke(cli, ["prune", "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights),
                                   "--results", str(tmp_path), "--run-id", "s", "--seeds", "0,1", "--phases", "1",
                                   "--epochs", "1", "--test-size", "20", "--train-size", "50", "--batch-size", "50",
                                   "--no-randaugment", "--no-eval-every-epoch"])
    assert res.exit_code == 0, res.output
    phases = read_table(tmp_path, "phases").to_pandas()
    assert sorted(zip(phases["run_id"], phases["spec_seed"], phases["phase"], strict=True)) == [
        ("s-s0", 0, 0), ("s-s0", 0, 1), ("s-s1", 1, 0), ("s-s1", 1, 1)]
    assert finished_runs(tmp_path) == {"s-s0", "s-s1"}


def twice(x: int) -> int:
    return 2 * x


def test_requeueable_resubmits_the_same_call():
    import cloudpickle

    wrapped = pickle.loads(cloudpickle.dumps(Requeueable(twice)))
    assert wrapped(21) == 42 and repr(wrapped) == "Requeueable(tests.test_executors.twice)"
    again = wrapped.checkpoint(21)
    assert again.function is wrapped and again.args == (21,) and again.result() == 42
    # without an importable name (a partial, a closure) the function itself is kept
    import functools

    def local(x: int) -> int:
        return x + 1

    assert pickle.loads(cloudpickle.dumps(Requeueable(functools.partial(twice, 4))))() == 8
    assert pickle.loads(cloudpickle.dumps(Requeueable(local)))(1) == 2


def test_a_function_of_the_launching_script_reaches_the_job(tmp_path):
    """A script that submits its own function: in the job, ``__main__`` is submitit's, not the script."""
    script = tmp_path / "mine.py"
    script.write_text("import pickle, sys, cloudpickle\n"
                      "from jobs.slurm_jobs import Requeueable\n"
                      "def triple(x):\n    return 3 * x\n"
                      "sys.stdout.buffer.write(cloudpickle.dumps(Requeueable(triple)))\n")
    repo = Path(__file__).resolve().parent.parent
    dumped = subprocess.run([sys.executable, str(script)], capture_output=True, check=True, cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}).stdout
    code = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read())(14))"  # another __main__
    out = subprocess.run([sys.executable, "-c", code], input=dumped, capture_output=True, check=True, cwd=repo)
    assert out.stdout.decode().strip() == "42"


def test_reading_a_jobs_pickle_imports_neither_its_module_nor_torch(tmp_path):
    """``status`` unpickles every job it shows; the PTQ and prune job functions import torch."""
    from submitit.core.utils import DelayedSubmission

    import jobs.ptq

    path = tmp_path / "1_submitted.pkl"
    task = PTQSpec(results=str(tmp_path), run_id="r", observers=("minmax",), calib_sizes=(100,))
    DelayedSubmission(Requeueable(jobs.ptq.run_ptq), task).dump(path)
    code = ("import sys; from submitit.core.utils import DelayedSubmission; "
            "from jobs.slurm_jobs import run_progress; "
            f"d = DelayedSubmission.load({str(path)!r}); "
            "print(d.args[0].run_id, repr(d.function), 'torch' in sys.modules, 'jobs.ptq' in sys.modules); "
            "print(run_progress(d.args[0]), 'torch' in sys.modules); "
            "f = d.function.function(); print(f.__module__, f.__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "r Requeueable(jobs.ptq.run_ptq) False False"
    assert out[1] == "task minmax-100: no rows yet False"  # the task's progress is read without torch too
    assert out[2] == "jobs.ptq run_ptq True"  # resolved (and torch imported) when the job runs it


def _job_folder(root: Path, job_id: str, spec: PruneSpec, result: tuple | None) -> None:
    from submitit.core.utils import DelayedSubmission, cloudpickle_dump

    folder = root / job_id
    folder.mkdir(parents=True)
    DelayedSubmission(Requeueable(twice), spec).dump(folder / f"{job_id}_submitted.pkl")
    (folder / f"{job_id}_0_log.out").write_text("some output\n")
    if result is not None:
        cloudpickle_dump(result, folder / f"{job_id}_0_result.pkl")


def test_status_shows_a_failed_jobs_error_from_its_pickle(tmp_path, monkeypatch):
    """Without accounting (no sacct here) the state comes from the job's result pickle."""
    jobs = tmp_path / "jobs"
    spec = PruneSpec(results=str(tmp_path / "results"), run_id="r1")
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\ncompress.data.DataError: no CIFAR-10 under /x\n'
    _job_folder(jobs, "900001", spec, ("error", tb))
    _job_folder(jobs, "900002_0", spec, ("success", {}))
    _job_folder(jobs, "900002_1", spec, None)
    (jobs / "900002").mkdir()  # an array's own folder: only its sbatch script
    monkeypatch.setenv("PATH", str(tmp_path))  # no sacct
    res = CliRunner().invoke(cli, ["status", "--folder", str(jobs), "--json"])
    assert res.exit_code == 0, res.output
    reports = {r["job_id"]: r for r in map(json.loads, res.output.splitlines()) if r["type"] == "job"}
    assert list(reports) == ["900002_1", "900002_0", "900001"]  # newest first
    assert reports["900001"]["state"] == "FAILED"
    assert reports["900001"]["error"] == "compress.data.DataError: no CIFAR-10 under /x"
    assert reports["900002_0"]["state"] == "COMPLETED" and reports["900002_1"]["state"] == "UNKNOWN"
    assert reports["900001"]["log"] == str(jobs / "900001" / "900001_0_log.out")
    table = CliRunner().invoke(cli, ["status", "900001", "--folder", str(jobs)]).output
    assert "FAILED" in table and "    error: compress.data.DataError: no CIFAR-10 under /x" in table
    assert [j for _, j in find_jobs(["900002"], jobs)] == ["900002_1", "900002_0"]
    assert [j for _, j in find_jobs([str(jobs / "900001")], jobs)] == ["900001"]
    res = CliRunner().invoke(cli, ["status", "123", "--folder", str(jobs)])
    assert res.exit_code == 2 and "no job 123 under" in res.stderr


def test_run_progress_reads_the_runs_own_files(tmp_path):
    spec = PruneSpec(results=str(tmp_path), run_id="p", phases=3, epochs=4)
    assert run_progress(spec) == "not started"
    run = tmp_path / "runs" / "p"
    run.mkdir(parents=True)
    progress = {"phase": 2, "phases": 3, "epoch": 1, "epochs": 4, "top1": 61.5, "job_id": "77"}
    (run / "progress.json").write_text(json.dumps(progress))
    assert run_progress(spec) == "phase 2/3, epoch 1/4, top-1 61.50%"
    assert run_progress(spec, job_id="78") == "run written by job 77, not this one"  # a refused second job
    (run / "summary.json").write_text(json.dumps({"top1": 88.25, "sparsity": 0.5}))
    assert run_progress(spec) == "finished: top-1 88.25%, sparsity 50.0%"  # a run from before progress.json
    assert finished_runs(tmp_path) == {"p"}


def test_a_search_over_nodes_asks_for_them_and_runs_one_driver() -> None:
    """--nodes 3: three nodes, one task each, the driver alone on the first; the job survives a lost node."""
    script = render_sbatch(ExecutorOptions(partition="debug", nodes=3, cpus=2))
    head = script.split("srun")[0]
    assert "#SBATCH --nodes=3" in head and "#SBATCH --nodes=1" not in head and "ntasks" not in head
    assert "#SBATCH --no-kill" in script
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    assert "--nodes=1 --ntasks=1" in srun  # one copy of the driver, not one per node
    single = render_sbatch(ExecutorOptions(partition="debug"))
    assert "#SBATCH --nodes=1" in single and "--no-kill" not in single and "--ntasks=1" not in single


def test_ray_ports_are_a_block_per_job_below_the_ephemeral_range() -> None:
    from sweeps.search import ray_ports

    a, b = ray_ports("4711"), ray_ports("4712_3")
    assert a["port"] == 19100 and a["max-worker-port"] == 19199 and b["port"] == 19200
    for ports in (a, b, ray_ports("219"), ray_ports("220")):
        values = set(ports.values()) - {ports["max-worker-port"]}
        assert len(values) == len(ports) - 1 and min(values) >= 10000 and max(ports.values()) < 32768
        assert not {6379, 8265, 52365} & set(range(min(values), ports["max-worker-port"] + 1))


def test_a_path_in_memory_is_refused_as_a_shared_folder(tmp_path) -> None:
    from jobs.cluster import check_shared, filesystem_type

    assert filesystem_type("/dev/shm") == "tmpfs"  # Linux mounts /dev/shm as tmpfs
    with pytest.raises(ValueError, match=r"results='/dev/shm/x/y' is invalid: on tmpfs, local to this machine"):
        check_shared("results", "/dev/shm/x/y")  # judged by its nearest existing parent; nothing is created
    assert not Path("/dev/shm/x").exists()
    check_shared("results", Path.cwd() / "results")  # the checkout's disk: accepted


def test_the_node_check_goes_where_the_job_could_go() -> None:
    """Account, QOS and the placement flags of --sbatch reach the check's srun; this machine is excluded."""
    from jobs.cluster import node_check_command

    options = ExecutorOptions(partition="gpu", account="lab", qos="high",
                              sbatch=("constraint=a100", "exclude=n9", "exclusive", "comment=x"))
    cmd = node_check_command(options, [Path("/shared/a/.node-check-1"), Path("/shared/b c/.node-check-1")],
                             exclude=["login1"])
    flags = cmd[:cmd.index("sh")]
    assert flags[0] == "srun" and "--partition=gpu" in flags and "--nodes=1" in flags and "--ntasks=1" in flags
    assert {"--account=lab", "--qos=high", "--constraint=a100", "--exclude=login1,n9"} <= set(flags)
    assert not [f for f in flags if f.startswith(("--exclusive", "--comment", "--gpus"))]
    assert [f for f in flags if f.startswith("--immediate=")]  # a busy partition does not block the launcher
    assert cmd[-2:] == ["/shared/a/.node-check-1", "/shared/b c/.node-check-1"]  # one argument each, spaces kept


def test_the_node_script_answers_for_each_probe(tmp_path) -> None:
    """What runs on the node: a marker seen (and an answer written beside it), missing, or not writable;
    an input present or absent."""
    from jobs.cluster import node_check_command

    seen, missing, stuck = tmp_path / "seen", tmp_path / "missing", tmp_path / "stuck"
    seen.write_text("here\n")
    stuck.mkdir()
    (tmp_path / "stuck.node").mkdir()  # the answer cannot be written: a folder holds its name
    data = tmp_path / "data dir"
    data.mkdir()
    cmd = node_check_command(ExecutorOptions(partition="debug"),
                             [str(seen), str(missing), str(stuck), f"?{data}", f"?{tmp_path / 'nope'}"])
    script = cmd[cmd.index("sh"):]
    out = subprocess.run(script, capture_output=True, text=True,
                         env={"SLURMD_NODENAME": "node7", "PATH": "/usr/bin:/bin"})
    assert out.stdout.splitlines() == [f"seen node7 {seen}", f"missing node7 {missing}", f"readonly node7 {stuck}",
                                       f"present node7 {data}", f"absent node7 {tmp_path / 'nope'}"]
    assert (tmp_path / "seen.node").read_text() == "node7\n" and not (tmp_path / "missing.node").exists()
    assert not (tmp_path / "data dir.node").exists()  # an input is only looked at


def test_job_inputs_are_the_data_weights_and_teacher_that_exist_here(tmp_path, monkeypatch) -> None:
    from cli.options import job_inputs

    (tmp_path / "w.pt").write_text("")
    (tmp_path / "data" / "cifar-10-batches-bin").mkdir(parents=True)
    (tmp_path / "data" / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path / "data"))
    a = PruneSpec(weights=str(tmp_path / "w.pt"), data_root="", kd_weight=0.5, teacher=str(tmp_path / "w.pt"))
    b = PruneSpec(weights="pretrained", data_root=str(tmp_path / "data"), seed=1)
    c = PruneSpec(data_root=str(tmp_path / "empty"), seed=2)  # no data yet (--download): the folder itself
    # a data file, not just the root: a node may have an empty folder at the same path
    assert job_inputs([a, b, c]) == [
        ("data_root", str(tmp_path / "data" / "cifar-10-batches-bin" / "test_batch.bin")),
        ("weights", str(tmp_path / "w.pt")), ("teacher", str(tmp_path / "w.pt")),
        ("data_root", str(tmp_path / "empty"))]


def test_check_nodes_is_an_option_of_every_slurm_command() -> None:
    for command in (["prune"], ["ptq"], ["tune", "prune"]):
        res = CliRunner().invoke(cli, [*command, "--help"], terminal_width=200)
        assert "--check-nodes" in res.output and "--no-check-nodes" in res.output, command


# ---- GPUs: how they are asked for, and what a job does with them ---------------------------------------


@pytest.mark.parametrize("request_, select, flag", [
    ("auto", "select/cons_tres", "gpus-per-node"),
    ("auto", "select/cons_res", "gres"),      # SLURM before cons_tres: --gpus-per-node is refused there
    ("auto", "select/linear", "gres"),
    ("auto", "", "gpus-per-node"),            # scontrol not readable: the long-standing default
    ("gres", "select/cons_tres", "gres"),     # the option overrides what the cluster says
    ("gpus-per-node", "select/cons_res", "gpus-per-node"),
])
def test_the_gpu_flag_follows_the_select_plugin_unless_given(request_, select, flag):
    assert gpu_flag(ExecutorOptions(partition="gpu", gpus=2, gpu_request=request_), select) == flag


def test_gpus_as_gres_join_the_users_other_gres():
    opts = ExecutorOptions(partition="gpu", gpus=2, sbatch=("gres=nvme:1", "constraint=a100"))
    params = slurm_parameters(opts, "gres")
    assert params["gres"] == "gpu:2,nvme:1" and "gpus_per_node" not in params
    assert params["additional_parameters"] == {"constraint": "a100"}  # no second --gres to override the first
    script = render_sbatch(opts, gpus_as="gres")
    assert "#SBATCH --gres=gpu:2,nvme:1" in script and "gpus-per-node" not in script
    params = slurm_parameters(opts, "gpus-per-node")
    assert params["gpus_per_node"] == 2 and params["additional_parameters"]["gres"] == "nvme:1"
    assert "gres" not in slurm_parameters(ExecutorOptions(partition="gpu"), "gres")  # no GPUs: no flag


def test_gres_gpus_counts_the_gpus_of_a_gres_value():
    assert [gres_gpus(g) for g in ("gpu:2", "gpu:a100:1,nvme:1", "gpu", "gpu:a100", "nvme:1", None, True)] == [
        2, 1, 1, 1, 0, 0, 0]
    assert ExecutorOptions(partition="gpu", sbatch=("gres=gpu:a100:2",)).job_gpus == 2


@pytest.mark.parametrize("select, flag", [("select/cons_res", "--gres=gpu:1"),
                                          ("select/cons_tres", "--gpus-per-node=1")])
def test_a_submission_asks_for_gpus_as_the_cluster_takes_them(fake_slurm, synthetic_cifar, synthetic_weights,
                                                             tmp_path, select, flag):
    """Through the CLI and submitit to an ``sbatch``: the script submitted names the GPUs in the cluster's form."""
    script = fake_slurm(select)
    res = CliRunner().invoke(cli, ["prune", "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights),
                                   "--results", str(tmp_path / "results"), "--phases", "1", "--epochs", "1",
                                   "--partition", "gpu", "--gpus", "1", "--no-check-nodes",
                                   "--folder", str(tmp_path / "jobs")])
    assert res.exit_code == 0, res.output
    assert "submitted job 4242" in res.stdout and not [ln for ln in res.stderr.splitlines() if ln.startswith("warning")]
    lines = script.read_text().splitlines()
    assert [ln for ln in lines if ln.startswith(("#SBATCH --gres", "#SBATCH --gpus"))] == [f"#SBATCH {flag}"]
    dry = CliRunner().invoke(cli, ["prune", "--partition", "gpu", "--gpus", "1", "--dry-run",
                                   "--folder", str(tmp_path / "jobs")])
    assert f"#SBATCH {flag}" in dry.stdout


def test_several_gpus_for_a_one_gpu_job_are_one_warning_line(fake_slurm, synthetic_cifar, synthetic_weights,
                                                             tmp_path):
    """The job goes out as asked (a user's own model code may use the other GPUs), saying once that it uses one."""
    script = fake_slurm("select/cons_tres")
    res = CliRunner().invoke(cli, ["prune", "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights),
                                   "--results", str(tmp_path / "results"), "--phases", "1", "--epochs", "1",
                                   "--partition", "gpu", "--gpus", "2", "--no-check-nodes",
                                   "--folder", str(tmp_path / "jobs")])
    assert res.exit_code == 0, res.output
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("warning")] == [
        "warning: 2 GPUs per job: a prune, train or PTQ job runs on one of them (its --device; cuda is cuda:0), the "
        "other 1 sit idle unless your own model code uses them; for runs side by side use --seeds (an array of "
        "one-GPU jobs) or a search (tune)"]
    assert "#SBATCH --gpus-per-node=2" in script.read_text()


@pytest.mark.parametrize("device, options, message", [
    ("cuda", {}, "device='cuda' is invalid: the SLURM job gets no GPU (--gpus 0); ask for one with --gpus 1, or use "
                 "--device auto or cpu"),
    ("cuda:1", {"gpus": 1}, "device='cuda:1' is invalid: the SLURM job gets 1 GPU(s), numbered from 0; ask for "
                            "--gpus 2, or use cuda"),
    ("cuda:2", {"gpus": 2}, "numbered from 0; ask for --gpus 3, or use cuda:0 to cuda:1"),
    ("cuda:x", {"gpus": 1}, "device='cuda:x' is invalid: use auto, cpu, cuda or cuda:N"),
])
def test_a_device_the_slurm_job_would_not_get_is_one_line(device, options, message):
    from jobs.inputs import check_device

    with pytest.raises(ValueError, match=re.escape(message)):
        check_device(device, ExecutorOptions(partition="gpu", **options))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without a GPU, as a login node is")
def test_cuda_is_checked_where_the_job_runs_not_on_a_login_node(synthetic_cifar, synthetic_weights, tmp_path):
    """Here (no partition) this machine must have the device; for SLURM the node checks it when the job
    starts, and here only that the job gets a GPU (by --gpus, or a typed --sbatch gres)."""
    from jobs.inputs import check_device, check_job

    common = {"data_root": str(synthetic_cifar), "weights": str(synthetic_weights), "results": str(tmp_path),
              "device": "cuda", "test_size": 20}
    prune = PruneSpec(**common, phases=1, epochs=1)
    with pytest.raises(ValueError, match=r"device 'cuda' asked for but torch sees 0 CUDA device\(s\)"):
        check_job(prune)
    with pytest.raises(ValueError, match=r"torch sees 0 CUDA"):
        check_job(prune, executor=ExecutorOptions())  # no partition: runs here
    check_job(prune, executor=ExecutorOptions(partition="gpu", gpus=1))
    ptq = PTQSpec(**common, methods=("manual",), calib_sizes=(50,))
    check_job(ptq, executor=ExecutorOptions(partition="gpu", gpus=1))  # the PTQ preflight too
    for device, options in (("cuda:1", {"gpus": 2}), ("cuda", {"sbatch": ("gres=gpu:a100:1",)}),
                            ("auto", {}), ("cpu", {})):
        check_device(device, ExecutorOptions(partition="gpu", **options))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without a GPU, as a login node is")
def test_cuda_jobs_go_to_slurm_from_a_machine_without_a_gpu(fake_slurm, synthetic_cifar, synthetic_weights,
                                                            tmp_path) -> None:
    """``--device cuda`` is checked where the job runs: refused here, and sent to SLURM with a GPU."""
    script = fake_slurm("select/cons_tres")
    inputs = ["--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights),
              "--results", str(tmp_path / "results"), "--device", "cuda"]
    prune = ["prune", *inputs, "--phases", "1", "--epochs", "1"]
    slurm = ["--partition", "gpu", "--no-check-nodes", "--folder", str(tmp_path / "jobs")]
    for args, message in (
            (prune, "error: device 'cuda' asked for but torch sees 0 CUDA device(s)"),
            ([*prune, *slurm], "error: device='cuda' is invalid: the SLURM job gets no GPU (--gpus 0); ask for one "
                               "with --gpus 1, or use --device auto or cpu")):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and res.stderr.splitlines() == [message], res.output
        assert not (tmp_path / "jobs").exists() and not (tmp_path / "results").exists()
    res = CliRunner().invoke(cli, [*prune, *slurm, "--gpus", "1"])
    assert res.exit_code == 0 and "submitted job 4242" in res.stdout, res.output
    assert "#SBATCH --gpus-per-node=1" in script.read_text()
    res = CliRunner().invoke(cli, ["ptq", *inputs, "--methods", "manual", "--calib-sizes", "50", *slurm, "--gpus", "1"])
    assert res.exit_code == 0 and "submitted job 4242" in res.stdout, res.output


def test_submitit_is_the_pinned_version_whose_private_renderer_the_dry_run_uses() -> None:
    """``render_sbatch`` calls submitit's private ``_make_sbatch_string``: a version other than the pin in
    setup.cfg may render differently or not have it, so moving the pin is a deliberate change."""
    import configparser
    import re

    import submitit
    from submitit.slurm import slurm

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    (pin,) = re.findall(r"^submitit==(\S+)$", cfg["options"]["install_requires"], flags=re.M)
    assert submitit.__version__ == pin, f"submitit {submitit.__version__} installed, setup.cfg pins {pin}"
    assert callable(getattr(slurm, "_make_sbatch_string", None))


def test_a_ptq_sweep_on_slurm_holds_its_runs_lease_while_its_array_runs(fake_slurm, synthetic_cifar,
                                                                         synthetic_weights, tmp_path) -> None:
    """A second submission of one PTQ run id is refused while the first one's array is queued or running."""
    from jobs import lease

    fake_slurm("select/cons_tres")
    squeue = tmp_path / "bin" / "squeue"
    squeue.write_text("#!/bin/sh\necho RUNNING\n")
    squeue.chmod(0o755)
    results = tmp_path / "results"
    args = ["ptq", "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights), "--results",
            str(results), "--run-id", "q", "--methods", "manual", "--calib-sizes", "50,100", "--partition", "gpu",
            "--no-check-nodes", "--folder", str(tmp_path / "jobs")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0 and "submitted job 4242_0" in first.stdout, first.output
    assert lease.read_lease(results / "runs" / "q")["owner"] == "4242"  # the array: squeue -j lists its tasks
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and again.stderr.startswith("error: run q is in use by 4242"), again.output
    assert len(again.stderr.splitlines()) == 1
    squeue.write_text("#!/bin/sh\nexit 0\n")  # the array is no longer listed: done
    assert CliRunner().invoke(cli, args).exit_code == 0


def test_export_goes_out_like_every_command(fake_slurm, tmp_path) -> None:
    """``export --partition`` renders the same sbatch script through the same pipeline; a dry run writes nothing."""
    fake_slurm("select/cons_tres")
    res = CliRunner().invoke(cli, ["export", "some-run", "--results", str(tmp_path / "results"), "--partition",
                                   "gpu", "--no-check-nodes", "--folder", str(tmp_path / "jobs"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert '"run": "some-run"' in res.stdout and "#SBATCH --partition=gpu" in res.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "jobs").exists()
    res = CliRunner().invoke(cli, ["export", "some-run", "--results", str(tmp_path / "results"), "--partition",
                                   "gpu", "--no-check-nodes", "--folder", str(tmp_path / "jobs")])
    assert res.exit_code == 2 and "some-run" in res.stderr and len(res.stderr.splitlines()) == 1, res.output
    assert not (tmp_path / "jobs").exists()
