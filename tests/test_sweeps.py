"""Ray Tune searches: space parsing and validation (fast), and real local Ray searches (marker ``ray``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from jobs.launch import cli
from jobs.specs import PruneSpec, TuneSpec
from sweeps.search import prune_score, run_search
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
])
def test_tune_cli_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    res = CliRunner().invoke(cli, ["tune", "prune", "--results", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
    assert not (tmp_path / "r").exists()


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
    time.sleep(3)
    left = _processes_under(temp_dir)
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
