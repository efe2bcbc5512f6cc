"""``status``: one table of runs (wherever they ran), their searches, and SLURM jobs.

Runs here are real (the prune job on the synthetic set, stopped or finished); "running" is a run
whose lease a live process holds. The SLURM side is in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from compress.results import write_rows
from jobs import lease, tables
from jobs.ptq import plan_tasks, run_ptq
from jobs.slurm_jobs import Requeueable
from jobs.specs import PruneSpec, PTQSpec
from jobs.training import run_prune


class Stop(Exception):
    """Stands in for a kill after phase 1."""


def _stop_after_phase_1(row: dict) -> None:
    if row["phase"] == 1:
        raise Stop


@pytest.fixture(scope="module")
def results(synthetic_cifar: Path, synthetic_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three runs: finished, stopped after phase 1 of 2, and one of a search (finished)."""
    root = tmp_path_factory.mktemp("status") / "results"

    def spec(run_id: str) -> PruneSpec:
        return PruneSpec(data_root=str(synthetic_cifar), weights=str(synthetic_weights), results=str(root),
                         run_id=run_id, phases=2, epochs=1, final_sparsity=0.5, batch_size=50,
                         eval_batch_size=100, randaugment=False)

    run_prune(spec("done"))
    with pytest.raises(Stop):
        run_prune(spec("stopped"), report=_stop_after_phase_1)
    run_prune(spec("s1-trial_a"), tags={"search_id": "s1", "trial_id": "trial_a"})
    return root


def _status(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["status", *args])
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.slow  # three short prune runs (~10 s)
def test_runs_searches_and_their_states(results: Path, tmp_path: Path) -> None:
    held = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (results / "runs" / "live").mkdir()
        (results / "runs" / "live" / "progress.json").write_text(json.dumps(
            {"run_id": "live", "kind": "prune", "phase": 2, "phases": 3, "epoch": 4, "epochs": 10, "top1": 80.5,
             "job_id": f"local-{held.pid}", "search_id": "s1", "updated_at": "2026-12-03T07:00:00+00:00"}))
        (results / "runs" / "live" / "lease.json").write_text(json.dumps(
            {"owner": f"local-{held.pid}", "host": __import__("socket").gethostname(), "pid": held.pid}))
        code, out, err = _status("--results", str(results), "--folder", str(tmp_path / "no-jobs"), "--json")
        assert code == 0, err
        items = [json.loads(ln) for ln in out.splitlines()]
        runs = {i["run_id"]: i for i in items if i["type"] == "run"}
        assert {k: (v["state"], v["progress"]) for k, v in runs.items()} == {
            "done": ("finished", "finished"), "s1-trial_a": ("finished", "finished"),
            "stopped": ("stopped", "phase 1/2, epoch 1/1"), "live": ("running", "phase 2/3, epoch 4/10")}
        assert runs["live"]["owner"] == f"local-{held.pid}" and runs["done"]["top1"] is not None
        assert 0.49 < runs["done"]["sparsity"] < 0.51
        (search,) = [i for i in items if i["type"] == "search"]
        assert (search["search_id"], search["trials"], search["finished"], search["running"]) == ("s1", 2, 1, 1)
        held.kill()
        held.wait()
        code, out, _ = _status("--results", str(results), "--folder", str(tmp_path / "no-jobs"))
        assert code == 0 and out.splitlines()[0].split() == ["RUN", "KIND", "STATE", "PROGRESS", "TOP-1",
                                                             "SPARSITY", "JOB", "UPDATED"]
        live = next(ln for ln in out.splitlines() if ln.startswith("live "))
        assert " stopped " in live  # its process is gone: resumable, no longer running
        assert any(ln.startswith("SEARCH ") for ln in out.splitlines())
    finally:
        held.kill()
        held.wait()
        lease.lease_path(results / "runs" / "live").unlink(missing_ok=True)


@pytest.mark.slow
def test_status_of_one_run_and_of_nothing(results: Path, tmp_path: Path) -> None:
    code, out, _ = _status("stopped", "--results", str(results), "--folder", str(tmp_path / "no-jobs"))
    assert code == 0 and len(out.splitlines()) == 2 and out.splitlines()[1].startswith("stopped  prune  stopped")
    code, out, err = _status("--results", str(tmp_path / "empty"), "--folder", str(tmp_path / "no-jobs"))
    assert code == 0 and out.strip() == f"no runs under {tmp_path / 'empty'} and no SLURM jobs under " \
                                        f"{tmp_path / 'no-jobs'}", err
    code, _, err = _status("nosuch", "--results", str(results), "--folder", str(tmp_path / "no-jobs"))
    assert code == 2 and len(err.splitlines()) == 1 and "and no run of that id under" in err


def test_a_ptq_task_whose_file_is_damaged_is_shown_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The job folders of a two-task PTQ array (as submitit leaves them, no accounting here): one task's
    rows are whole, the other's file was cut short; status shows both and warns once about that file."""
    from submitit.core.utils import DelayedSubmission

    results, jobs = tmp_path / "results", tmp_path / "jobs"
    tasks = plan_tasks(PTQSpec(results=str(results), run_id="q", observers=("minmax",), calib_sizes=(100, 200)))
    for i, task in enumerate(tasks):
        folder = jobs / f"7000_{i}"
        folder.mkdir(parents=True)
        DelayedSubmission(Requeueable(run_ptq), task).dump(folder / f"7000_{i}_submitted.pkl")
        write_rows(task.task_file(), [{"run_id": "q", "task": task.task_name()}] * 3, tables.PTQ)
    bad = tasks[1].task_file()
    bad.write_bytes(bad.read_bytes()[:100])
    monkeypatch.setenv("PATH", str(tmp_path))  # no sacct: states from the job folders
    with caplog.at_level(logging.WARNING, logger="compress"):
        code, out, err = _status("--results", str(results), "--folder", str(jobs), "--json")
    assert code == 0, err
    progress = {j["job_id"]: j["progress"] for j in map(json.loads, out.splitlines()) if j["type"] == "job"}
    assert progress == {"7000_0": "task minmax-100: 3 rows written",
                        "7000_1": "task minmax-200: its file is damaged (see the warning)"}
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith(f"damaged result file {bad} (") and "run its ptq command again" in line
