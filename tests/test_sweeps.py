"""Ray Tune searches: space parsing and validation (fast), and real local Ray searches (marker ``ray``)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from cli.main import cli
from jobs.specs import PruneSpec, TuneSpec
from sweeps.resources import trial_resources
from sweeps.search import failed_line, prune_score, run_search
from sweeps.space import apply_config, parse_dimension, parse_space


def test_parse_space_reads_each_distribution() -> None:
    dims = parse_space(["lr=loguniform:1e-4:1e-2", "phases=choice:2,3", "epochs=randint:1:3",
                        "final_sparsity=uniform:0.5:0.9", "schedule=grid:linear,cubic"], PruneSpec)
    assert [(d.field, d.dist, d.args) for d in dims] == [
        ("lr", "loguniform", (1e-4, 1e-2)), ("phases", "choice", (2, 3)), ("epochs", "randint", (1, 3)),
        ("final_sparsity", "uniform", (0.5, 0.9)), ("schedule", "grid", ("linear", "cubic"))]


@pytest.mark.parametrize("entry, words", [
    ("lr=loguniform:1e-2:1e-4", "not below"),
    ("lr=loguniform:0:1e-2", "positive"),
    ("colour=choice:1,2", "not a field"),
    ("lr=normal:0:1", "unknown distribution"),
    ("phases=uniform:1:4", "integer field"),
    ("lr", "FIELD=DIST:ARGS"),
    ("phases=choice:two", "cannot read"),
])
def test_parse_dimension_rejects_bad_entries(entry: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_dimension(entry, PruneSpec)


def test_empty_space_and_duplicates_are_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        parse_space([], PruneSpec)
    with pytest.raises(ValueError, match="twice"):
        parse_space(["lr=choice:0.1", "lr=choice:0.2"], PruneSpec)


def test_apply_config_wraps_tuple_fields_and_validates() -> None:
    base = PruneSpec(run_id="x")
    spec = apply_config(base, {"keep_dense": "conv1", "lr": 0.01})
    assert spec.keep_dense == ("conv1",) and spec.lr == 0.01
    with pytest.raises(ValueError, match="final_sparsity"):
        apply_config(base, {"final_sparsity": 1.2})


def test_prune_score_penalises_only_the_drop_beyond_the_allowance() -> None:
    t = TuneSpec(max_drop=1.5)
    assert prune_score({"dense_top1": 91.0, "top1": 89.8, "sparsity": 0.93}, t) == pytest.approx(93.0)
    assert prune_score({"dense_top1": 91.0, "top1": 89.0, "sparsity": 0.93}, t) == pytest.approx(88.0)


@pytest.mark.parametrize("args, words", [
    ([], "empty"),
    (["--space", "lr=loguniform:1e-2:1e-4"], "not below"),
    (["--space", "lr=choice:0.1", "--searcher", "annealing"], "searcher"),
    (["--space", "lr=uniform:0.1:0.2", "--searcher", "grid"], "grid"),
    (["--space", "final_sparsity=choice:0.5,1.5"], "final_sparsity"),
    # a trial sees only the GPUs Ray gives it: cuda with none could never run, cpu with some holds them idle
    (["--space", "lr=choice:0.1", "--device", "cuda", "--gpus-per-trial", "0"], "gpus_per_trial=0.0 is invalid"),
    (["--space", "lr=choice:0.1", "--device", "cpu", "--gpus-per-trial", "0.5"], "gpus_per_trial=0.5 is invalid"),
    (["--space", "lr=choice:0.1", "--gpus-per-trial", "1.5"], "whole number of GPUs"),
    (["--space", "lr=choice:0.1", "--device", "cuda:1"], "from cuda:0"),
    # a SLURM search job given fewer GPUs than one trial asks for: no trial could ever start
    (["--space", "lr=choice:0.1", "--partition", "gpu", "--gpus", "1", "--gpus-per-trial", "2"],
     "more than the job's --gpus 1"),
])
def test_tune_cli_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    res = CliRunner().invoke(cli, ["tune", "prune", "--results", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("tune, device, nodes, want", [
    # --cpus 1 (one CPU in the job), 2 trials at once: half a CPU each, not one after the other
    ({"max_concurrent": 2}, "auto", [{"CPU": 1.0}], (0.5, 0.0, 2)),
    ({"max_concurrent": 3}, "auto", [{"CPU": 16.0}], (5.0, 0.0, 3)),
    ({"max_concurrent": 3}, "auto", [{"CPU": 2.0}], (0.5, 0.0, 3)),
    # where Ray has GPUs, device auto or cuda gets a share of them by default (else a trial sees none)
    ({"max_concurrent": 2}, "auto", [{"CPU": 4.0, "GPU": 1.0}], (2.0, 0.5, 2)),
    ({"max_concurrent": 3}, "auto", [{"CPU": 4.0, "GPU": 1.0}], (1.0, 0.3333, 3)),
    ({"max_concurrent": 2}, "cuda", [{"CPU": 4.0, "GPU": 4.0}], (2.0, 1.0, 2)),
    ({"max_concurrent": 4}, "cuda", [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}], (1.0, 0.5, 4)),
    ({"max_concurrent": 2}, "cpu", [{"CPU": 4.0, "GPU": 1.0}], (2.0, 0.0, 2)),
    # as given: fewer at once than asked (a warning in the log), not an error
    ({"max_concurrent": 4, "cpus_per_trial": 2.0}, "auto", [{"CPU": 4.0}], (2.0, 0.0, 2)),
    ({"max_concurrent": 2, "gpus_per_trial": 0.25}, "auto", [{"CPU": 2.0, "GPU": 1.0}], (1.0, 0.25, 2)),
])
def test_trial_resources_share_what_ray_has(tune: dict, device: str, nodes: list[dict], want: tuple) -> None:
    got = trial_resources(TuneSpec(**tune), device, nodes)
    assert (got.cpus, got.gpus, got.at_once) == want


@pytest.mark.parametrize("tune, device, nodes, words", [
    ({}, "cuda", [{"CPU": 4.0}], "Ray has no GPU"),
    ({"gpus_per_trial": 2.0}, "auto", [{"CPU": 4.0, "GPU": 1.0}], "gpus_per_trial=2.0 is invalid"),
    ({"cpus_per_trial": 8.0}, "auto", [{"CPU": 4.0}], "cpus_per_trial=8.0 is invalid"),
])
def test_trial_resources_refuse_what_could_never_run(tune: dict, device: str, nodes: list[dict], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        trial_resources(TuneSpec(**tune), device, nodes)


@pytest.mark.parametrize("args, gpus", [
    (["--gpus-per-trial", "0.25", "--max-concurrent", "4"], 1),  # four trials share one GPU
    (["--gpus-per-trial", "0.4", "--max-concurrent", "5"], 3),  # two trials fit on a GPU
    (["--gpus-per-trial", "1", "--max-concurrent", "4", "--nodes", "2"], 2),  # per node
    (["--device", "cuda", "--max-concurrent", "3"], 3),  # one GPU each by default
    (["--gpus", "2", "--gpus-per-trial", "0.25"], 2),  # --gpus as given
    (["--sbatch", "gres=gpu:a100:2", "--gpus-per-trial", "0.25"], 2),  # GPUs asked for through --sbatch
    (["--max-concurrent", "4"], 0),  # device auto runs on what the job gets, as every job does
    (["--device", "cpu"], 0),
])
def test_a_slurm_search_job_asks_for_the_gpus_its_trials_need(tmp_path: Path, args: list[str], gpus: int) -> None:
    res = CliRunner().invoke(cli, ["tune", "prune", "--results", str(tmp_path / "r"), "--space", "lr=choice:0.1",
                                   "--partition", "gpu", *args, "--dry-run"])
    assert res.exit_code == 0, res.output
    # per node, as --gpus-per-node=N or --gres=gpu:[TYPE:]N (whichever the cluster takes)
    asked = re.findall(r"^#SBATCH --(?:gpus-per-node=|gres=gpu:(?:[^:,\s]+:)?)(\d+)", res.stdout, re.M)
    assert asked == ([str(gpus)] if gpus else [])


def test_echo_summary_warns_of_failed_trials_when_a_best_exists(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.tune import echo_summary

    ok = {"trial_id": "a", "config": {"lr": 0.1}, "score": 50.0, "iterations": 1, "stopped_early": False, "error": ""}
    bad = {**ok, "trial_id": "b", "score": None, "error": "WeightsError: cannot read x.pt"}
    echo_summary({"search_id": "s", "trials": [ok, bad], "best": ok, "metric": "m", "folder": "/r/tune/s",
                  "ray_start_seconds": 1.0, "search_seconds": 2.0,
                  "trial_resources": {"cpus": 0.5, "gpus": 0.0, "at_once": 2}})
    out, err = capsys.readouterr()
    assert "2 at once with 0.5 CPU and 0 GPU each" in out and "best: a" in out
    assert err.strip() == ("warning: 1 of 2 trials failed (first: WeightsError: cannot read x.pt); each trial's "
                           "error is in /r/tune/s/<trial>/error.txt")


def _base(synthetic_cifar: Path, synthetic_weights: Path, results: Path, **kw) -> PruneSpec:
    spec = PruneSpec(weights=str(synthetic_weights), data_root=str(synthetic_cifar), results=str(results),
                     epochs=1, phases=2, final_sparsity=0.6, filter_fraction=0.0, randaugment=False,
                     batch_size=64, eval_batch_size=100, **kw)
    return spec.with_defaults()


@pytest.mark.ray
@pytest.mark.slow
def test_local_search_asha_stops_a_trial_and_rows_arrive(synthetic_cifar, synthetic_weights, tmp_path) -> None:
    base = _base(synthetic_cifar, synthetic_weights, tmp_path)
    # grid order: lr varies fastest, so the two 2-phase trials run first; the 3-phase ones then
    # report a lower phase-1 sparsity than the recorded ones and ASHA stops them at its first rung
    tune_spec = TuneSpec(space=("lr=grid:0.001,0.01", "phases=grid:2,3"), num_samples=1, max_concurrent=2,
                         searcher="grid", scheduler="asha", search_id="asha-test")
    summary = run_search("prune", base, tune_spec)
    trials = summary["trials"]
    assert len(trials) == 4 and not any(t["error"] for t in trials)
    assert sum(t["stopped_early"] for t in trials) >= 1
    rows = ds.dataset(tmp_path / "phases").to_table().to_pandas()
    assert set(rows["search_id"]) == {"asha-test"}
    assert set(rows["trial_id"]) == {t["trial_id"] for t in trials}
    for t in trials:  # every report of every trial is a row (phase 0 is the starting model)
        got = rows[rows["trial_id"] == t["trial_id"]]
        assert sorted(got["phase"]) == list(range(t["iterations"] + 1))
        assert (got["spec_lr"] == t["config"]["lr"]).all()
    best = summary["best"]
    assert best["score"] == max(t["score"] for t in trials)


@pytest.mark.ray
@pytest.mark.slow
def test_a_failing_trial_is_reported_and_the_search_goes_on(synthetic_cifar, synthetic_weights, tmp_path) -> None:
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    base = dataclasses.replace(_base(synthetic_cifar, synthetic_weights, tmp_path / "r"), phases=1)
    tune_spec = TuneSpec(space=(f"weights=grid:{synthetic_weights},{bad}",), num_samples=1, max_concurrent=2,
                         searcher="grid", scheduler="fifo", search_id="fail-test")
    summary = run_search("prune", base, tune_spec)
    by_weights = {t["config"]["weights"]: t for t in summary["trials"]}
    assert "WeightsError" in by_weights[str(bad)]["error"] and "cannot read" in by_weights[str(bad)]["error"]
    assert by_weights[str(synthetic_weights)]["error"] == ""
    assert summary["best"]["config"]["weights"] == str(synthetic_weights)
    assert failed_line(summary).startswith("1 of 2 trials failed (first: WeightsError")


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_whose_every_trial_failed_exits_1(synthetic_cifar, synthetic_weights, tmp_path) -> None:
    """Every trial fails: the trials are listed, then one line says how many failed and where their errors are."""
    bad = [tmp_path / "corrupt1.pt", tmp_path / "corrupt2.pt"]
    for b in bad:
        b.write_bytes(b"not a checkpoint")
    results = tmp_path / "r"
    res = CliRunner().invoke(cli, ["tune", "prune", "--weights", str(synthetic_weights), "--data-root",
                                   str(synthetic_cifar), "--results", str(results), "--phases", "1", "--epochs", "1",
                                   "--final-sparsity", "0.5", "--no-randaugment", "--space",
                                   f"weights=grid:{bad[0]},{bad[1]}", "--searcher", "grid", "--scheduler", "fifo",
                                   "--num-samples", "1", "--search-id", "all-fail"])
    assert res.exit_code == 1, res.output
    folder = (results / "tune" / "all-fail").resolve()
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: search all-fail: 2 of 2 trials failed (first: WeightsError: ")
    assert last.endswith(f"each trial's error is in {folder}/<trial>/error.txt")
    assert len(list(folder.glob("*/error.txt"))) == 2
    assert "no trial finished" in res.stdout and res.stdout.count("failed: WeightsError") == 2


def in_allocation(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """This process as a one-node SLURM search job with ``cpus`` CPUs and ``gpus`` GPUs, as the job's
    environment says them (``SLURM_CPUS_ON_NODE``, ``CUDA_VISIBLE_DEVICES``): Ray is sized from them.
    Without a GPU here, Ray counts the ones named and hands them to trials, which torch then does not see."""
    def enter(cpus: int, gpus: int = 0) -> None:
        for name in list(os.environ):
            if name.startswith(("SLURM_", "SLURMD_", "SUBMITIT_")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
        monkeypatch.setenv("SLURM_CPUS_ON_NODE", str(cpus))
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus))))

    return enter


@pytest.mark.ray
@pytest.mark.slow
def test_trials_run_at_once_on_fewer_cpus_than_trials(synthetic_cifar, synthetic_weights, tmp_path,
                                                       monkeypatch) -> None:
    """A search job given --cpus 1 and --max-concurrent 2 runs its two trials at once (half a CPU each):
    each trial writes its first row before the other writes its last."""
    in_allocation(monkeypatch)(cpus=1)
    base = _base(synthetic_cifar, synthetic_weights, tmp_path)
    tune_spec = TuneSpec(space=("lr=grid:0.001,0.002",), num_samples=1, max_concurrent=2, searcher="grid",
                         scheduler="fifo", search_id="one-cpu")
    summary = run_search("prune", base, tune_spec)
    assert len(summary["trials"]) == 2 and not any(t["error"] for t in summary["trials"])
    rows = ds.dataset(tmp_path / "phases").to_table().to_pandas()
    spans = rows.groupby("trial_id")["written_at"].agg(["min", "max"])
    assert len(spans) == 2 and spans["min"].max() < spans["max"].min(), spans
    assert summary["trial_resources"] == {"cpus": 0.5, "gpus": 0.0, "at_once": 2}


@pytest.mark.ray
@pytest.mark.slow
def test_trials_get_a_share_of_the_gpus_by_default(synthetic_cifar, synthetic_weights, tmp_path,
                                                   monkeypatch) -> None:
    """Ray has a GPU (the job's CUDA_VISIBLE_DEVICES): with --device auto and no --gpus-per-trial, each of
    2 trials at once asks for half of it (asking for none, a trial would see no GPU and train on the CPU)."""
    in_allocation(monkeypatch)(cpus=2, gpus=1)
    base = dataclasses.replace(_base(synthetic_cifar, synthetic_weights, tmp_path), phases=1)
    tune_spec = TuneSpec(space=("lr=grid:0.001,0.002",), num_samples=1, max_concurrent=2, searcher="grid",
                         scheduler="fifo", search_id="share-gpu")
    summary = run_search("prune", base, tune_spec)
    assert len(summary["trials"]) == 2 and not any(t["error"] for t in summary["trials"])
    assert summary["trial_resources"] == {"cpus": 1.0, "gpus": 0.5, "at_once": 2}


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("gpus_per_trial", [0.5, None])
def test_trials_see_the_gpus_they_ask_for(cuda, synthetic_cifar, synthetic_weights, tmp_path,
                                          gpus_per_trial: float | None) -> None:
    """Two trials on one GPU (0.5 each, or the default share): every row of each names a CUDA device,
    none the CPU (--device auto would fall back to it silently in a trial that sees no GPU)."""
    import torch

    base = dataclasses.replace(_base(synthetic_cifar, synthetic_weights, tmp_path), phases=1)
    tune_spec = TuneSpec(space=("lr=grid:0.001,0.002",), num_samples=1, max_concurrent=2, searcher="grid",
                         scheduler="fifo", search_id="on-gpu", gpus_per_trial=gpus_per_trial)
    summary = run_search("prune", base, tune_spec)
    assert len(summary["trials"]) == 2 and not any(t["error"] for t in summary["trials"])
    assert summary["trial_resources"]["gpus"] > 0
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    rows = ds.dataset(tmp_path / "phases").to_table().to_pandas()
    by_trial = rows.groupby("trial_id")["device_name"].agg(set).to_dict()
    assert len(by_trial) == 2 and all(got <= names for got in by_trial.values()), by_trial


@pytest.mark.ray
@pytest.mark.slow
def test_ptq_search_with_optuna_tags_its_rows(synthetic_cifar, synthetic_weights, tmp_path) -> None:
    from jobs.specs import PTQSpec

    base = PTQSpec(weights=str(synthetic_weights), data_root=str(synthetic_cifar), results=str(tmp_path),
                   methods=("manual",), calib_sizes=(50,), calib_batch_size=50, eval_batch_size=100).with_defaults()
    tune_spec = TuneSpec(space=("alphas=uniform:0.9:1.0", "centers=choice:min,zero"), num_samples=3,
                         max_concurrent=2, searcher="optuna", scheduler="fifo", search_id="ptq-search")
    summary = run_search("ptq", base, tune_spec)
    assert len(summary["trials"]) == 3 and not any(t["error"] for t in summary["trials"])
    rows = ds.dataset(tmp_path / "ptq").to_table().to_pandas()
    assert len(rows) == 3 and set(rows["search_id"]) == {"ptq-search"}
    for t in summary["trials"]:  # each trial's reported score is the int8 top-1 of its own row
        row = rows[rows["trial_id"] == t["trial_id"]].iloc[0]
        assert row["alpha"] == pytest.approx(t["config"]["alphas"]) and row["center"] == t["config"]["centers"]
        assert t["score"] == pytest.approx(row["int8_top1"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_whose_driver_is_killed_resumes_cleanly(synthetic_cifar, synthetic_weights, tmp_path) -> None:
    """kill -9 of the driver mid-search: the next start ends what the dead Ray left behind, the resumed
    trials finish from their checkpoints, and are reported as finished with all their phases."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sweeps.search import _processes_under
    from tests.conftest import REPO

    results = tmp_path / "results"
    args = [sys.executable, "-m", "jobs.launch", "tune", "prune", "--weights", str(synthetic_weights),
            "--data-root", str(synthetic_cifar), "--results", str(results), "--phases", "3", "--epochs", "1",
            "--final-sparsity", "0.6", "--filter-fraction", "0", "--no-randaugment", "--batch-size", "64",
            "--eval-batch-size", "100", "--space", "lr=grid:0.001,0.002", "--searcher", "grid",
            "--scheduler", "fifo", "--num-samples", "1", "--max-concurrent", "2", "--search-id", "killed"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESS_")}
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list((results / "phases").glob("killed-*-p01.parquet"))) < 2:  # both trials are past phase 1
        assert driver.poll() is None and time.monotonic() < deadline, "the search ended or stalled"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    temp_dir = str((results / "tune" / "killed" / "ray").resolve())
    left = _processes_under(temp_dir)  # right after the kill: what the resumed search must end
    assert left, "a killed driver's Ray leaves processes behind (the case this test is about)"

    resumed = subprocess.run([*args, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not any(os.path.exists(f"/proc/{pid}") for pid in left)
    trials = [ln for ln in resumed.stdout.splitlines() if ln.startswith("  ")]
    assert len(trials) == 2 and all("after 3 reports" in ln and "stopped early" not in ln for ln in trials), trials
    rows = ds.dataset(results / "phases").to_table().to_pandas()
    assert sorted(rows.groupby("trial_id")["phase"].apply(sorted).tolist()) == [[0, 1, 2, 3]] * 2


def test_tune_ptq_reads_an_alpha_range_as_ptq_does(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    out = CliRunner().invoke(cli, ["tune", "ptq", "--weights", str(weights), "--methods", "manual", "--alphas",
                                   "0.97:0.99:0.01", "--space", "centers=choice:min,zero", "--dry-run"])
    assert out.exit_code == 0, out.output
    import json

    assert json.loads(out.stdout)["base"]["alphas"] == [0.97, 0.98, 0.99]
    bad = CliRunner().invoke(cli, ["tune", "ptq", "--weights", str(weights), "--alphas", "0.99:0.97:0.01",
                                   "--space", "centers=choice:min,zero", "--dry-run"])
    assert bad.exit_code == 2 and "range '0.99:0.97:0.01' is invalid" in bad.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_takes_a_users_model_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tune prune --model mynets:tiny --data digits:load``: the trials (Ray workers) import the user's module
    and the data factory from PYTHONPATH, and their rows name both."""
    import torch

    from compress import registry
    from tests.conftest import REPO

    code = tmp_path / "usercode"
    code.mkdir()
    (code / "mynets.py").write_text(
        "from torch import nn\n\n\ndef tiny(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n")
    path = f"{code}:{REPO / 'examples'}"
    monkeypatch.setenv("PYTHONPATH", path)
    for p in path.split(":"):
        monkeypatch.syspath_prepend(p)
    weights = tmp_path / "w.pt"
    torch.save(registry.build("mynets:tiny", "", (0.3,), (0.4,)).net.state_dict(), weights)
    results = tmp_path / "r"
    res = CliRunner().invoke(cli, ["tune", "prune", "--model", "mynets:tiny", "--data", "digits:load", "--weights",
                                   str(weights), "--results", str(results), "--space", "lr=grid:0.01,0.03",
                                   "--searcher", "grid", "--scheduler", "fifo", "--num-samples", "1",
                                   "--phases", "1", "--epochs", "1", "--final-sparsity", "0.5", "--no-randaugment",
                                   "--search-id", "mine"])
    assert res.exit_code == 0, res.output
    rows = ds.dataset(results / "phases").to_table().to_pandas()
    assert set(rows["search_id"]) == {"mine"} and rows["trial_id"].nunique() == 2
    assert set(rows["spec_model"]) == {"mynets:tiny"} and set(rows["data_shape"]) == {"1x8x8"}
    assert sorted(rows["spec_lr"].unique()) == [0.01, 0.03]
