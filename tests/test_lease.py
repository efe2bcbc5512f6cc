"""A run id has one owner at a time (jobs/lease.py): a second writer is refused with one line.

The SLURM side (two submissions of one run id, a requeued job taking its lease back) is in
tests/test_slurm.py; here the lease itself and two local processes on one run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from cli.main import cli
from jobs import lease
from tests.conftest import REPO


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen]:
    """A live process that is not this one (its pid owns leases in these tests)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def _held_by(run: Path, owner: str, pid: int, **extra: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    record = {"owner": owner, "host": os.uname().nodename, "pid": pid, "user": "someone",
              "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "token": "", **extra}
    lease.lease_path(run).write_text(json.dumps(record))


def test_acquire_creates_then_release_drops(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    held = lease.acquire(run)
    assert held["owner"] == f"local-{os.getpid()}" and lease.read_lease(run) == held
    assert lease.acquire(run)["pid"] == os.getpid()  # the same job again (as after a requeue) takes it back
    lease.release(run)
    assert lease.read_lease(run) is None


def test_a_live_process_keeps_its_lease_and_a_dead_one_loses_it(tmp_path: Path,
                                                                 other_process: subprocess.Popen) -> None:
    run = tmp_path / "runs" / "r"
    _held_by(run, f"local-{other_process.pid}", other_process.pid)
    with pytest.raises(lease.RunBusy) as e:
        lease.acquire(run)
    assert str(e.value).startswith(f"run r is in use by local-{other_process.pid} (user someone")
    assert f"process {other_process.pid} on" in str(e.value) and "choose another --run-id" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    lease.release(run)  # not ours: left alone
    assert lease.read_lease(run)["pid"] == other_process.pid
    other_process.kill()
    other_process.wait()
    assert lease.acquire(run)["owner"] == f"local-{os.getpid()}"  # stale: taken over


def test_another_hosts_process_cannot_be_checked_and_counts_as_live(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    _held_by(run, "local-1", 1, host="node-elsewhere")
    with pytest.raises(lease.RunBusy, match="cannot be checked from here.*remove .*lease.json"):
        lease.acquire(run)


def test_a_requeued_slurm_job_takes_its_own_lease_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       other_process: subprocess.Popen) -> None:
    run = tmp_path / "runs" / "r"
    _held_by(run, "4242", other_process.pid, host="node-before-requeue")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert lease.acquire(run)["owner"] == "4242"


def test_the_job_adopts_the_claim_its_launcher_made(tmp_path: Path, other_process: subprocess.Popen) -> None:
    run = tmp_path / "runs" / "r"
    token = lease.claim(run)
    with pytest.raises(lease.RunBusy, match=r"in use by submit-\d+"):  # a second launcher, before the handover
        lease.claim(run)
    lease.hand_over(run, token, "777")
    assert lease.read_lease(run)["owner"] == "777"
    assert lease.acquire(run, token)["owner"] == f"local-{os.getpid()}"  # the job (here: this process) took it
    _held_by(run, "submit-1", other_process.pid, since="2000-01-01T00:00:00+00:00")  # a launcher that died
    assert lease.claim(run)


def test_a_slurm_owner_is_live_while_squeue_lists_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "runs" / "r"
    _held_by(run, "999999", 1)
    states = iter(["RUNNING", "", None])
    monkeypatch.setattr(lease, "_slurm_state", lambda owner: next(states))
    with pytest.raises(lease.RunBusy, match="SLURM job 999999 is RUNNING"):
        lease.acquire(run)
    assert lease.acquire(run)["owner"] == f"local-{os.getpid()}"  # no longer listed: gone
    _held_by(run, "999999", 1)
    with pytest.raises(lease.RunBusy, match="cannot be read here"):  # no squeue on this machine: assume live
        lease.acquire(run)


def _prune(data: Path, weights: Path, results: Path, *extra: str) -> list[str]:
    return ["prune", "--data-root", str(data), "--weights", str(weights), "--results", str(results), "--run-id", "r",
            "--phases", "2", "--epochs", "3", "--final-sparsity", "0.5", "--batch-size", "50",
            "--eval-batch-size", "100", *extra]


@pytest.mark.slow  # one prune run of six epochs in a second process (~15 s)
def test_two_processes_on_one_run_id(synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path) -> None:
    """The second writer is refused with one line, nothing of it is written, the first ends as if alone."""
    results = tmp_path / "results"
    args = _prune(synthetic_cifar, synthetic_weights, results)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESS_")}
    first = subprocess.Popen([sys.executable, "-m", "jobs.launch", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180  # a guard against a hang, not a timing: a loaded machine starts slowly
        while lease.read_lease(results / "runs" / "r") is None or not (results / "runs" / "r" / "spec.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        same = CliRunner().invoke(cli, ["prune", "--resume", "r", "--results", str(results)])
        assert same.exit_code == 2 and same.stdout.startswith("run r (resuming where it stopped)")
        assert same.stderr.startswith(f"error: run r is in use by local-{first.pid}")
        assert len(same.stderr.splitlines()) == 1
        other = CliRunner().invoke(cli, [*args, "--seed", "7"])
        assert other.exit_code == 2 and other.stdout == "" and len(other.stderr.splitlines()) == 1
        assert "holds another spec (seed 0 there, 7 here)" in other.stderr
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    phases = ds.dataset(results / "phases").to_table().to_pylist()
    assert sorted(r["phase"] for r in phases) == [0, 1, 2]
    assert {r["job_id"] for r in phases} == {f"local-{first.pid}"} and {r["spec_seed"] for r in phases} == {0}
    assert lease.read_lease(results / "runs" / "r") is None  # released at the end
