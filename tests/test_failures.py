"""How a run fails on this machine: a results root it cannot use, a full disk mid-run, Ctrl-C.

Each is one line (exit 2 before anything is written, 1 for a run that stopped, 130 for an
interrupt) naming the command that resumes, and the run resumes to the same rows once the cause
is gone. The file-system cases mount small tmpfs filesystems, which needs root (CI runs as root).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

import jobs.training
from cli.main import cli
from tests.conftest import REPO
from tests.helpers import interrupt_phase


def _prune(data: Path, weights: Path, results: Path, *extra: str) -> list[str]:
    return ["prune", "--data-root", str(data), "--weights", str(weights), "--results", str(results), "--run-id", "r",
            "--phases", "2", "--epochs", "2", "--final-sparsity", "0.5", "--batch-size", "50",
            "--eval-batch-size", "100", *extra]


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("case, message", [
    ("file", "results root {results} cannot be made: {results} is a file, not a folder"),
    ("read-only", "results root {results} is not writable ("),
    ("small", "results root {results} has 1.0 MiB free; a run needs about 11."),
])
def test_a_results_root_that_cannot_take_a_run_is_one_line(synthetic_cifar: Path, synthetic_weights: Path,
                                                           tmp_path: Path, case: str, message: str) -> None:
    mount = tmp_path / "mnt"
    with contextlib.ExitStack() as stack:
        if case == "file":
            results = tmp_path / "results"
            results.write_text("")
        else:
            stack.enter_context(_tmpfs(mount, "1m", *(["ro"] if case == "read-only" else [])))
            results = mount / "results"
        before = sorted(tmp_path.rglob("*"))
        out = CliRunner().invoke(cli, _prune(synthetic_cifar, synthetic_weights, results))
        assert out.exit_code == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out.output
        assert out.stderr.startswith("error: " + message.format(results=results)), out.stderr
        assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow  # two runs of four epochs on the synthetic set (~15 s)
def test_a_disk_that_fills_mid_run_stops_it_in_one_line_and_resume_finishes_it(
        synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = jobs.training.train_one_epoch
    with _tmpfs(tmp_path / "mnt", "24m") as mnt:
        results, filler = mnt / "results", mnt / "filler"

        def fill_in_phase_2(*args, **kwargs):
            if kwargs["desc"].startswith("phase 2") and not filler.exists():  # another job takes the space
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 2**20)
            return real(*args, **kwargs)

        monkeypatch.setattr(jobs.training, "train_one_epoch", fill_in_phase_2)
        out = CliRunner().invoke(cli, _prune(synthetic_cifar, synthetic_weights, results))
        assert out.exit_code == 1 and len(out.stderr.splitlines()) == 1, out.output
        assert out.stderr.startswith("error: cannot write ") and "No space left on device" in out.stderr
        assert out.stderr.rstrip().endswith(f"resume with: python -m jobs.launch prune --resume r --results {results}")
        assert not list(results.rglob(".*.tmp"))  # no half-written file left behind
        filler.unlink()
        monkeypatch.setattr(jobs.training, "train_one_epoch", real)
        again = CliRunner().invoke(cli, ["prune", "--resume", "r", "--results", str(results)])
        assert again.exit_code == 0, again.output
        phases = ds.dataset(results / "phases").to_table().to_pylist()
        assert sorted(r["phase"] for r in phases) == [0, 1, 2]


@pytest.mark.slow  # a run interrupted in its second phase, then resumed (~20 s)
def test_ctrl_c_exits_130_with_the_resume_command(synthetic_cifar: Path, synthetic_weights: Path,
                                                   tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESS_")}
    # started as from a terminal: SIGINT at its default even where this test runs in a background job of a
    # script (which ignores SIGINT, and the child would inherit that and never see Ctrl-C)
    p = subprocess.Popen([sys.executable, "-m", "jobs.launch", *_prune(synthetic_cifar, synthetic_weights, results)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (results / "phases" / "r-p01.parquet").exists():  # phase 1 done: the run is in phase 2
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=180)  # a hang guard: a loaded machine can take long to stop
    assert p.returncode == 130, err
    assert "Aborted!" not in err and "Traceback" not in err
    assert err.strip().endswith(f"resume with: python -m jobs.launch prune --resume r --results {results}")
    done = subprocess.run([sys.executable, "-m", "jobs.launch", "prune", "--resume", "r", "--results", str(results)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("run r (resuming where it stopped)"), done.stderr
    assert sorted(r["phase"] for r in ds.dataset(results / "phases").to_table().to_pylist()) == [0, 1, 2]


@pytest.mark.slow  # a run stopped by a read-only remount, then resumed (~15 s)
def test_results_made_read_only_mid_run_name_the_file_and_resume_finishes(
        synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = jobs.training.train_one_epoch
    with _tmpfs(tmp_path / "mnt", "24m") as mnt:
        results = mnt / "results"

        def read_only_in_phase_2(*args, **kwargs):
            if kwargs["desc"].startswith("phase 2"):  # an admin, or a filesystem in trouble
                subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            return real(*args, **kwargs)

        monkeypatch.setattr(jobs.training, "train_one_epoch", read_only_in_phase_2)
        out = CliRunner().invoke(cli, _prune(synthetic_cifar, synthetic_weights, results))
        # the run's log lines go to stderr too when this is the first command of the process to log
        errors = [line for line in out.stderr.splitlines() if " INFO " not in line]
        assert out.exit_code == 1 and len(errors) == 1 and "Traceback" not in out.output, out.output
        assert errors[0].startswith(f"error: cannot write {results}/") and "Read-only file system" in errors[0]
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        monkeypatch.setattr(jobs.training, "train_one_epoch", real)
        again = CliRunner().invoke(cli, ["prune", "--resume", "r", "--results", str(results)])
        assert again.exit_code == 0, again.output
        assert sorted(r["phase"] for r in ds.dataset(results / "phases").to_table().to_pylist()) == [0, 1, 2]


@pytest.mark.slow  # a run interrupted in its second phase, then resumed (~15 s)
def test_a_run_started_before_new_spec_fields_resumes_with_their_defaults(
        synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    results = tmp_path / "results"
    interrupt_phase(monkeypatch, 2)
    assert CliRunner().invoke(cli, _prune(synthetic_cifar, synthetic_weights, results)).exit_code != 0
    monkeypatch.undo()
    spec_file = results / "runs" / "r" / "spec.json"
    spec = json.loads(spec_file.read_text())
    added_later = ["structure", "target_macs", "target_params", "importance", "global_channels"]
    spec_file.write_text(json.dumps({k: v for k, v in spec.items() if k not in added_later}))

    other_kind = tmp_path / "other"
    (other_kind / "runs" / "q").mkdir(parents=True)
    (other_kind / "runs" / "q" / "spec.json").write_text(json.dumps({**spec, "observers": ["minmax"]}))
    refused = CliRunner().invoke(cli, ["prune", "--resume", "q", "--results", str(other_kind)])
    assert refused.exit_code == 2 and "not a prune run" in refused.output

    again = CliRunner().invoke(cli, ["prune", "--resume", "r", "--results", str(results)])
    assert again.exit_code == 0, again.output
    phases = ds.dataset(results / "phases").to_table().to_pylist()
    assert sorted(r["phase"] for r in phases) == [0, 1, 2]
