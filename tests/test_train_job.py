"""The prune and train jobs through ``python -m jobs.launch``: results, checkpoint, resume, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest
import torch
from click.testing import CliRunner, Result

import jobs.checkpoints
import jobs.training
from cli.main import cli
from compress.data import BatchLoader, load_cifar10
from compress.loops import evaluate
from compress.models import load_model
from compress.provenance import PROVENANCE_FIELDS
from compress.prune import global_sparsity
from compress.schedule import phase_targets
from jobs.run_state import RunState
from jobs.specs import PruneSpec, TrainSpec
from jobs.training import run_prune
from tests.conftest import REPO, count_prunable, is_close_to

N = 268_336  # resnet20a conv+linear weights
# columns that legitimately differ between two runs of one spec: timing, where and when it ran
RUN_LOCAL = {"train_seconds", "wall_seconds", "seconds", "images_per_second", "spec_results", *PROVENANCE_FIELDS}


def _prune_args(data: Path, weights: Path, results: Path, run_id: str = "t", *extra: str) -> list[str]:
    return ["prune", "--data-root", str(data), "--weights", str(weights), "--results", str(results),
            "--run-id", run_id, "--phases", "2", "--epochs", "1", "--final-sparsity", "0.5",
            "--batch-size", "50", "--eval-batch-size", "100", *extra]


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _table(results: Path, name: str) -> pd.DataFrame:
    return ds.dataset(results / name, format="parquet").to_table().to_pandas()


@pytest.fixture(scope="module")
def prune_run(synthetic_cifar: Path, synthetic_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """One finished two-phase prune run through the CLI: (click result, results root)."""
    results = tmp_path_factory.mktemp("prune") / "results"
    result = _invoke(_prune_args(synthetic_cifar, synthetic_weights, results))
    return result, results


@pytest.mark.slow  # shares one prune run (~7 s)
def test_prune_exits_0_and_prints_the_module_table(prune_run) -> None:
    result, _ = prune_run
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["module", "params"])
    body = lines[head + 2:head + 2 + 20]  # 19 convs + the classifier
    assert [ln.split()[0] for ln in body][:2] == ["conv1", "layer1.0.conv1"] and body[-1].split()[0] == "linear"
    total = next(ln for ln in lines if ln.startswith("total")).split()
    assert total[1] == "268,336" and total[3] == f"{N - round(0.5 * N):,}" and total[5] == "50.00%"
    assert "final: top-1" in result.stdout


@pytest.mark.slow  # shares one prune run (~7 s)
def test_prune_phase_rows_hit_the_targets(prune_run) -> None:
    _, results = prune_run
    phases = _table(results, "phases").sort_values("phase")
    assert phases["phase"].tolist() == [0, 1, 2]
    targets = [0.0, *phase_targets(0.5, 2, "geometric")]
    for (_, row), target in zip(phases.iterrows(), targets, strict=True):
        assert row["target_sparsity"] == pytest.approx(target)
        assert is_close_to(row["sparsity"], target, N), (row["phase"], row["sparsity"])
        assert row["prunable"] == N and row["nonzero"] == N - round(target * N)
        assert 0.0 <= row["top1"] <= 100.0
    assert phases["spec_final_sparsity"].eq(0.5).all() and phases["spec_phases"].eq(2).all()
    assert phases["spec_run_id"].eq("t").all() and phases["kind"].eq("prune").all()
    assert phases["git_commit"].str.fullmatch(r"[0-9a-f]{40}").all()
    assert phases["torch_version"].eq(torch.__version__).all() and phases["job_id"].str.len().gt(0).all()
    epochs = _table(results, "epochs")
    assert sorted(zip(epochs["phase"], epochs["epoch"], strict=True)) == [(1, 1), (2, 1)]
    modules = _table(results, "modules")
    assert len(modules) == 20 and modules["params"].sum() == N
    assert modules["nonzero_after"].sum() == phases["nonzero"].iloc[-1]


@pytest.mark.slow  # one short prune run (~5 s)
def test_prune_with_a_layer_cap_stops_every_layer_at_it(synthetic_cifar: Path, synthetic_weights: Path,
                                                         tmp_path: Path) -> None:
    results = tmp_path / "results"
    args = ["--phases", "1", "--filter-fraction", "0", "--keep-dense", "conv1,linear", "--max-layer-sparsity", "0.55"]
    result = _invoke(_prune_args(synthetic_cifar, synthetic_weights, results, "cap", *args))
    assert result.exit_code == 0, result.output
    modules = _table(results, "modules").set_index("module")
    zeros = modules["params"] - modules["nonzero_after"]
    assert zeros.sum() == round(0.5 * N)
    assert zeros["conv1"] == 0 and zeros["linear"] == 0
    caps = (0.55 * modules["params"]).map(math.floor)
    assert (zeros <= caps).all() and (zeros == caps).any()  # the cap held, and it bound somewhere
    assert _table(results, "phases")["spec_max_layer_sparsity"].eq(0.55).all()


@pytest.mark.slow  # shares one prune run (~7 s)
def test_prune_final_checkpoint_loads_and_scores_the_reported_top1(prune_run, synthetic_cifar: Path,
                                                                   device: torch.device) -> None:
    _, results = prune_run
    run = results / "runs" / "t"
    assert (run / "final.pt").is_file() and (run / "summary.json").is_file() and not (run / "state.pt").exists()
    model = load_model("resnet20a", run / "final.pt").to(device)
    assert is_close_to(global_sparsity(model), 0.5, count_prunable(model))
    data = load_cifar10(synthetic_cifar)
    st = evaluate(model, BatchLoader(data.test_x, data.test_y, 100, device), device, progress=False)
    phases = _table(results, "phases").sort_values("phase")
    last = phases.iloc[-1]
    assert st.top1 == last["top1"]
    summary = json.loads((run / "summary.json").read_text())  # the last phase's seconds and the run's, named so
    assert summary["last_phase_wall_seconds"] == last["wall_seconds"]
    assert summary["last_phase_train_seconds"] == last["train_seconds"]
    assert summary["total_train_seconds"] == pytest.approx(phases["train_seconds"].sum())
    assert summary["total_epochs"] == 2 and "wall_seconds" not in summary and "train_seconds" not in summary


@pytest.mark.slow  # one short prune run (~5 s)
def test_the_packed_model_of_a_run_on_part_of_the_test_set_verifies(synthetic_cifar: Path, synthetic_weights: Path,
                                                                    tmp_path: Path) -> None:
    """The manifest names how many test images its top-1 is of, so ``verify`` scores the same ones."""
    results = tmp_path / "results"
    out = _invoke([*_prune_args(synthetic_cifar, synthetic_weights, results, "part"), "--phases", "1",
                   "--test-size", "30", "--eval-batch-size", "30"])
    assert out.exit_code == 0, out.output
    packed = results / "runs" / "part" / "export" / "model.float.packed"
    checked = _invoke(["verify", str(packed), "--data-root", str(synthetic_cifar)])
    assert checked.exit_code == 0, checked.output
    assert "on 30 images" in checked.stdout, checked.stdout


@pytest.mark.slow  # shares one prune run (~7 s)
def test_every_file_of_a_run_has_the_mode_the_umask_gives(prune_run) -> None:
    _, results = prune_run
    mask = os.umask(0o022)
    os.umask(mask)
    files = [p for p in results.rglob("*") if p.is_file()]
    assert {"final.pt", "summary.json", "model.float.packed", "t-p02.parquet", "t.parquet"} <= {p.name for p in files}
    assert {p.relative_to(results).as_posix(): p.stat().st_mode & 0o777 for p in files} == {
        p.relative_to(results).as_posix(): 0o666 & ~mask for p in files}


@pytest.mark.slow  # shares one prune run (~7 s)
def test_finished_run_started_again_returns_its_summary(prune_run, synthetic_cifar: Path, synthetic_weights: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _, results = prune_run
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    monkeypatch.setattr(jobs.training, "train_one_epoch", _fail_if_called)
    again = _invoke(["prune", "--resume", "t", "--results", str(results), "--epochs", "1"])
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("run t (already finished)")
    assert "total" in again.stdout and "final: top-1" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before


@pytest.mark.slow  # shares one prune run (~7 s)
@pytest.mark.parametrize("args, message", [
    (["--run-id", "t"], "run t already exists under {results} (already finished): resume it with --resume t, "
                        "or choose another --run-id"),
    (["--resume", "tt"], "no run 'tt' under {results}/runs to resume; the closest: t"),
    (["--resume", "t", "--epochs", "5", "--lr", "0.1"], "--epochs, --lr differ(s) from run t's spec"),
    (["--resume", "t", "--seeds", "0,1"], "--seeds, --run-id and --run do not go with it"),
])
def test_an_existing_run_id_needs_resume_and_resume_needs_an_existing_run(prune_run, synthetic_cifar: Path,
                                                                           synthetic_weights: Path, args: list[str],
                                                                           message: str) -> None:
    """A typo in --run-id no longer starts a new run silently, nor does --run-id of an old run resume it."""
    _, results = prune_run
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    base = _prune_args(synthetic_cifar, synthetic_weights, results)
    base = base[:base.index("--run-id")] + base[base.index("--run-id") + 2:]
    out = _invoke([*base, *args])
    assert out.exit_code == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out.output
    assert message.format(results=results) in out.stderr
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before


@pytest.mark.slow  # shares one prune run, then a small PTQ sweep of its model (~8 s)
def test_a_job_that_consumes_a_run_takes_its_model_and_data_root(prune_run) -> None:
    """README command 1, then the natural next command, in a shell without COMPRESS_DATA set."""
    _, results = prune_run
    sweep = ["ptq", "--results", str(results), "--methods", "manual", "--observers", "minmax", "--calib-sizes", "50",
             "--calib-batch-size", "50", "--test-size", "100", "--eval-batch-size", "100"]
    for source in (["--run", "t"], ["--weights", str(results / "runs" / "t" / "final.pt")]):
        out = _invoke([*sweep, *source, "--run-id", f"q{len(source[1])}"])
        assert out.exit_code == 0, out.output
    rows = _table(results, "ptq")
    assert set(rows["spec_weights"]) == {str(results / "runs" / "t" / "final.pt")}
    assert set(rows["spec_data_root"]) == set(_table(results, "phases")["spec_data_root"])
    typo = _invoke([*sweep, "--run", "tt"])
    assert typo.exit_code == 2 and len(typo.stderr.splitlines()) == 1
    assert "no finished run 'tt' under" in typo.stderr and "the closest: t" in typo.stderr


@pytest.mark.slow  # one interrupted run and its resume (~8 s)
def test_resume_continues_an_interrupted_run_with_its_stored_spec(synthetic_cifar: Path, synthetic_weights: Path,
                                                                  tmp_path: Path, trained: list[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _kill_in_phase_2(monkeypatch)
    with pytest.raises(Interrupted):
        _invoke(_prune_args(synthetic_cifar, synthetic_weights, tmp_path, "r"))
    monkeypatch.setattr(jobs.training, "train_one_epoch", counting)
    out = _invoke(["prune", "--resume", "r", "--results", str(tmp_path)])  # no other option: the spec is stored
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("run r (resuming where it stopped)") and "final: top-1" in out.stdout
    assert trained == ["phase 1 epoch 1/1", "phase 2 epoch 1/1"]
    assert sorted(_table(tmp_path, "phases")["phase"]) == [0, 1, 2]


def _fail_if_called(*args, **kwargs):
    raise AssertionError("a finished run trained again")


# --- resume ---------------------------------------------------------------------------------------

class Interrupted(Exception):
    """Stands in for a kill of the job."""


def _kill_in_phase_2(monkeypatch: pytest.MonkeyPatch):
    """From now on the job dies as phase 2 starts training, as a kill would; returns the loop it replaced."""
    real = jobs.training.train_one_epoch

    def killed_in_phase_2(*args, **kwargs):
        if kwargs["desc"].startswith("phase 2"):
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs.training, "train_one_epoch", killed_in_phase_2)
    return real


def _spec(results: Path, data: Path, weights: Path) -> PruneSpec:
    """Two phases of one epoch with RandAugment and filter pruning on: every piece of state a resume needs."""
    return PruneSpec(model="resnet20a", weights=str(weights), data_root=str(data), results=str(results),
                     run_id="r", seed=1, phases=2, epochs=1, final_sparsity=0.5, batch_size=50,
                     eval_batch_size=100).with_defaults()


@pytest.fixture(scope="module")
def straight_run(synthetic_cifar: Path, synthetic_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted run that resumed runs must reproduce: (summary, results root)."""
    results = tmp_path_factory.mktemp("straight")
    return run_prune(_spec(results, synthetic_cifar, synthetic_weights)), results


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``desc`` of every epoch the job trains, in order."""
    calls: list[str] = []
    real_train = jobs.training.train_one_epoch

    def counting(*args, **kwargs):
        calls.append(kwargs["desc"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(jobs.training, "train_one_epoch", counting)
    return calls


def _compare(a: Path, b: Path, table: str, keys: list[str]) -> None:
    ta, tb = _table(a, table), _table(b, table)
    assert not ta.duplicated(subset=keys).any(), f"duplicated {table} rows"
    cols = [c for c in ta.columns if c not in RUN_LOCAL]
    ta = ta[cols].sort_values(keys).reset_index(drop=True)
    tb = tb[cols].sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(ta, tb, check_exact=True)


def _same_as_straight(results: Path, straight: Path) -> None:
    _compare(results, straight, "phases", ["phase"])
    _compare(results, straight, "epochs", ["phase", "epoch"])
    _compare(results, straight, "modules", ["module"])
    assert len(_table(results, "phases")) == 3 and len(_table(results, "epochs")) == 2
    final = torch.load(results / "runs" / "r" / "final.pt", weights_only=True)["model"]
    reference = torch.load(straight / "runs" / "r" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


@pytest.mark.slow  # two short runs and the shared reference (~12 s)
def test_run_stopped_after_phase_1_resumes_without_retraining_it(synthetic_cifar: Path, synthetic_weights: Path,
                                                                 tmp_path: Path, trained: list[str],
                                                                 straight_run) -> None:
    def stop_after_phase_1(row: dict) -> None:
        if row["phase"] == 1:
            raise Interrupted

    spec = _spec(tmp_path, synthetic_cifar, synthetic_weights)
    with pytest.raises(Interrupted):
        run_prune(spec, report=stop_after_phase_1)
    assert trained == ["phase 1 epoch 1/1"]
    assert (tmp_path / "runs" / "r" / "state.pt").is_file() and not (tmp_path / "runs" / "r" / "summary.json").exists()

    resumed = run_prune(spec)
    assert trained == ["phase 1 epoch 1/1", "phase 2 epoch 1/1"], "phase 1 was trained again"
    straight, straight_results = straight_run
    _same_as_straight(tmp_path, straight_results)
    assert resumed["top1"] == straight["top1"] and resumed["sparsity"] == straight["sparsity"]

    again = run_prune(spec)
    assert len(trained) == 2, "a finished run trained again"
    assert again == {**resumed, "spec": again["spec"]} and again["spec"] == _json_like(dataclasses.asdict(spec))


@pytest.mark.slow  # two short runs and the shared reference (~10 s)
def test_run_killed_inside_phase_2_resumes_from_its_pruning_step(synthetic_cifar: Path, synthetic_weights: Path,
                                                                 tmp_path: Path, trained: list[str],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 straight_run) -> None:
    counting = _kill_in_phase_2(monkeypatch)
    spec = _spec(tmp_path, synthetic_cifar, synthetic_weights)
    with pytest.raises(Interrupted):
        run_prune(spec)
    state = torch.load(tmp_path / "runs" / "r" / "state.pt", weights_only=False)
    assert (state["phase"], state["epoch"], state["pruned"]) == (2, 0, True)

    monkeypatch.setattr(jobs.training, "train_one_epoch", counting)
    run_prune(spec)
    assert trained == ["phase 1 epoch 1/1", "phase 2 epoch 1/1"]
    _same_as_straight(tmp_path, straight_run[1])


@pytest.mark.slow  # one run stopped before finishing and its resume, and the shared reference (~8 s)
def test_run_stopped_after_its_last_phase_row_finishes_on_resume(synthetic_cifar: Path, synthetic_weights: Path,
                                                                 tmp_path: Path, trained: list[str],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 straight_run) -> None:
    """Killed between the last phase's row and summary.json: the resume trains nothing and finishes."""
    real = jobs.training._Schedule.finish

    def killed(self, summary):
        raise Interrupted

    spec = _spec(tmp_path, synthetic_cifar, synthetic_weights)
    monkeypatch.setattr(jobs.training._Schedule, "finish", killed)
    with pytest.raises(Interrupted):
        run_prune(spec)
    monkeypatch.setattr(jobs.training._Schedule, "finish", real)
    resumed = run_prune(spec)
    assert trained == ["phase 1 epoch 1/1", "phase 2 epoch 1/1"]
    straight, straight_results = straight_run
    _same_as_straight(tmp_path, straight_results)
    assert resumed["top1"] == straight["top1"] and resumed["sparsity"] == straight["sparsity"]
    assert resumed["last_phase_epochs"] == straight["last_phase_epochs"] == 1


def _truncate(path: Path) -> None:
    """Damage a checkpoint as a full disk or a killed copy does: keep its first half."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.slow  # one run killed in phase 2 and its resume, and the shared reference (~10 s)
def test_a_damaged_checkpoint_resumes_from_the_one_before_with_a_warning_naming_it(
        synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path, trained: list[str],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, straight_run) -> None:
    counting = _kill_in_phase_2(monkeypatch)
    spec = _spec(tmp_path, synthetic_cifar, synthetic_weights)
    with pytest.raises(Interrupted):
        run_prune(spec)
    run = tmp_path / "runs" / "r"
    previous = torch.load(run / "state.prev.pt", weights_only=False)
    assert (previous["phase"], previous["pruned"]) == (2, False), "the state before phase 2's pruning step"
    _truncate(run / "state.pt")

    monkeypatch.setattr(jobs.training, "train_one_epoch", counting)
    with caplog.at_level("WARNING", logger="jobs.checkpoints"):
        run_prune(spec)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(run / "state.pt") in warnings[0] and "state.prev.pt" in warnings[0]
    assert trained == ["phase 1 epoch 1/1", "phase 2 epoch 1/1"]
    _same_as_straight(tmp_path, straight_run[1])
    assert (run / "state.pt.damaged").is_file() and not (run / "state.pt").exists()
    assert not (run / "state.prev.pt").exists()


@pytest.mark.slow  # one run killed in phase 2 (~6 s)
def test_no_checkpoint_that_reads_is_one_line_naming_the_files(synthetic_cifar: Path, synthetic_weights: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _kill_in_phase_2(monkeypatch)
    with pytest.raises(Interrupted):
        _invoke(_prune_args(synthetic_cifar, synthetic_weights, tmp_path, "r"))
    run = tmp_path / "runs" / "r"
    _truncate(run / "state.pt")
    (run / "state.prev.pt").write_bytes(b"")
    rows = sorted(p.name for p in tmp_path.rglob("*.parquet"))
    out = _invoke(["prune", "--resume", "r", "--results", str(tmp_path)])
    assert out.exit_code == 2, out.output
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: run r: no checkpoint reads") and "Traceback" not in out.output
    assert str(run / "state.pt") in line and str(run / "state.prev.pt") in line and "--run-id" in line
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == rows, "rows were lost"


# the keys of every state.pt a run saves; a channels run's also dense_count and widths, and from the last epoch
# of phase 1 on predictions, from the first phase row on last_top1
STATE_KEYS = {"spec", "phase", "epoch", "pruned", "epoch_rows", "before", "dense_top1", "wall", "train_seconds",
              "model", "masks", "optimizer", "scheduler"}


def _same(a, b, where: str) -> None:
    """Equal values, tensors exactly, NaN equal to NaN, down through dicts, lists and tuples."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN: an epoch not evaluated


@pytest.mark.slow  # one two-phase run of each structure (~15 s)
@pytest.mark.parametrize("structure", ["weights", "channels"])
def test_every_saved_state_reads_back_as_a_run_state_that_writes_the_same_dict(
        structure: str, synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[dict] = []
    real = jobs.checkpoints.torch_save_atomic

    def keeping(state: dict, path: Path) -> None:  # each state.pt as read back from the disk
        real(state, path)
        saved.append(torch.load(path, map_location="cpu", weights_only=False))

    monkeypatch.setattr(jobs.checkpoints, "torch_save_atomic", keeping)
    spec = _spec(tmp_path, synthetic_cifar, synthetic_weights)
    if structure == "channels":
        spec = dataclasses.replace(spec, structure="channels", target_macs=0.5)
    run_prune(spec)
    base = STATE_KEYS | ({"dense_count", "widths"} if structure == "channels" else set())
    pruned, trained, written = base, base | {"predictions"}, base | {"predictions", "last_top1"}
    assert [set(s) for s in saved] == [pruned, trained, written, written, written, written]
    assert saved[2]["predictions"] is None and saved[1]["predictions"].dtype == torch.uint8
    for i, state in enumerate(saved):
        _same(RunState.from_state_dict(state).to_state_dict(), state, f"state {i}")


@pytest.mark.slow  # compiles resnet20a for training and evaluation on the CPU (~2-3 min)
def test_a_compiled_run_resumes_and_writes_rows_that_mean_what_an_eager_run_s_do(
        synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, straight_run) -> None:
    if not jobs.training.loops.cxx_compiler():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++ or clang++); none is installed")
    counting = _kill_in_phase_2(monkeypatch)
    spec = dataclasses.replace(_spec(tmp_path, synthetic_cifar, synthetic_weights), compile="on")
    with caplog.at_level("INFO", logger="jobs.training"), pytest.raises(Interrupted):
        run_prune(spec)
    assert any(r.getMessage().startswith("compiling the model") for r in caplog.records)
    state = torch.load(tmp_path / "runs" / "r" / "state.pt", weights_only=False)
    assert not [k for k in state["model"] if "_orig_mod" in k], "the checkpoint holds the compiled wrapper's names"
    monkeypatch.setattr(jobs.training, "train_one_epoch", counting)
    # resumed eager: how it runs is not what it computes, so the spec is the same run's
    resumed = run_prune(dataclasses.replace(spec, compile="off"))
    straight, straight_results = straight_run
    ours = _table(tmp_path, "phases").sort_values("phase")
    theirs = _table(straight_results, "phases").sort_values("phase")
    assert ours["phase"].tolist() == theirs["phase"].tolist() == [0, 1, 2]
    assert ours["nonzero"].tolist() == theirs["nonzero"].tolist()
    assert (ours["top1"] - theirs["top1"]).abs().max() <= 5.0  # compiled kernels sum in another order
    assert set(ours.columns) == set(theirs.columns)
    assert ours["spec_compile"].tolist() == ["on", "on", "off"]  # each row says how it ran
    assert resumed["sparsity"] == straight["sparsity"]


def _json_like(obj):
    """What a value looks like after a JSON round trip (tuples become lists)."""
    if isinstance(obj, dict):
        return {k: _json_like(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_like(v) for v in obj]
    return obj


@pytest.mark.slow  # shares one prune run (~7 s)
def test_run_folder_of_another_spec_is_refused(prune_run, synthetic_cifar: Path, synthetic_weights: Path) -> None:
    _, results = prune_run
    before = sorted(results.rglob("*"))
    out = _invoke(_prune_args(synthetic_cifar, synthetic_weights, results, "t", "--seed", "7"))
    assert out.exit_code == 2
    assert out.stderr.startswith("error: ") and "another spec" in out.stderr
    assert sorted(results.rglob("*")) == before


# --- dense training --------------------------------------------------------------------------------

def test_train_command_trains_from_scratch(synthetic_cifar: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    out = _invoke(["train", "--data-root", str(synthetic_cifar), "--results", str(results), "--run-id", "d",
                   "--epochs", "1", "--batch-size", "50", "--no-randaugment", "--eval-batch-size", "100"])
    assert out.exit_code == 0, out.output
    phases = _table(results, "phases").sort_values("phase")
    assert phases["phase"].tolist() == [0, 1] and phases["kind"].eq("train").all()
    assert phases["sparsity"].eq(0.0).all() and phases["spec_weights"].eq("").all()
    assert phases["train_loss"].iloc[1] > 0 and 0 <= phases["top1"].iloc[1] <= 100
    model = load_model("resnet20a", results / "runs" / "d" / "final.pt")
    assert global_sparsity(model) == 0.0


def test_final_epochs_lengthen_only_the_last_phase() -> None:
    spec = PruneSpec(phases=4, epochs=3, final_epochs=10, final_sparsity=0.9, schedule="cubic")
    assert [ph.epochs for ph in spec.plan()] == [3, 3, 3, 10]
    assert [ph.target for ph in spec.plan()] == phase_targets(0.9, 4, "cubic")
    assert [ph.epochs for ph in PruneSpec(phases=3, epochs=2).plan()] == [2, 2, 2]
    assert [ph.epochs for ph in PruneSpec(phases=1, epochs=2, final_epochs=5).plan()] == [5]


@pytest.mark.slow  # one two-phase run (~8 s)
def test_final_epochs_run_trains_the_last_phase_longer(synthetic_cifar: Path, synthetic_weights: Path,
                                                       tmp_path: Path) -> None:
    results = tmp_path / "results"
    out = _invoke(_prune_args(synthetic_cifar, synthetic_weights, results, "fe", "--final-epochs", "2"))
    assert out.exit_code == 0, out.output
    epochs = _table(results, "epochs")
    assert sorted(zip(epochs["phase"], epochs["epoch"], strict=True)) == [(1, 1), (2, 1), (2, 2)]
    phases = _table(results, "phases").sort_values("phase")
    assert phases["epochs"].tolist() == [0, 1, 2] and phases["spec_final_epochs"].eq(2).all()


@pytest.mark.slow  # one one-phase run (~5 s)
def test_teacher_is_loaded_from_its_own_file(synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = tmp_path / "teacher.th"
    teacher.write_bytes(synthetic_weights.read_bytes())
    loaded: list[str] = []
    real = jobs.training.registry.load
    monkeypatch.setattr(jobs.training.registry, "load", lambda text, args="", path=None, *stats:
                        loaded.append(str(path)) or real(text, args, path, *stats))
    results = tmp_path / "results"
    out = _invoke([*_prune_args(synthetic_cifar, synthetic_weights, results, "kd"), "--phases", "1",
                   "--kd-weight", "0.5", "--teacher", str(teacher)])
    assert out.exit_code == 0, out.output
    assert loaded[-2:] == [str(synthetic_weights), str(teacher)]  # the job: its model, then the teacher
    assert _table(results, "phases")["spec_teacher"].eq(str(teacher)).all()


# --- bad input: one line, exit code 2, nothing written ------------------------------------------------

@pytest.fixture(scope="module")
def corrupt_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "corrupt.th"
    path.write_bytes(b"PK\x03\x04 not really a zip archive" * 10)
    return path


BAD_INPUT = {
    "sparsity 1.0": (["--final-sparsity", "1.0"], "final_sparsity=1.0 is invalid"),
    "sparsity -0.1": (["--final-sparsity", "-0.1"], "final_sparsity=-0.1 is invalid"),
    "zero phases": (["--phases", "0"], "phases=0 is invalid"),
    "final epochs -2": (["--final-epochs", "-2"], "final_epochs=-2 is invalid"),
    "unknown model": (["--model", "resnet18"], "model='resnet18' is unknown; use a built-in (resnet20a, resnet20b), "
                                               "timm:NAME"),
    "unknown timm model": (["--model", "timm:resnet81"], "timm has no architecture 'resnet81'; closest: resnet18"),
    "unknown optimizer": (["--optimizer", "lamb"], "optimizer='lamb' is unknown; known: adamw, sgd"),
    "missing data root": (["--data-root", "/nonexistent/cifar"], "CIFAR-10 not found under /nonexistent/cifar"),
    "corrupt weights": (["--weights", "CORRUPT"], "cannot read weights file"),
    "teacher without distillation": (["--teacher", "CORRUPT"], "give --kd-weight > 0 too"),
    "corrupt teacher": (["--kd-weight", "0.5", "--teacher", "CORRUPT"], "cannot read weights file"),
    "unknown keep-dense module": (["--keep-dense", "conv1,nope"], "unknown module(s) ['nope']"),
    "layer cap 0": (["--max-layer-sparsity", "0"], "max_layer_sparsity=0.0 is invalid: must be in (0, 1]"),
    "layer cap under the target": (["--max-layer-sparsity", "0.4"],
                                   "sparsity 0.5 needs 134,168 zeros but a per-layer cap of 0.4 allows only"),
    "unreachable with kept-dense layers": (
        ["--keep-dense", "layer3.1.conv1,layer3.1.conv2,layer3.2.conv1,layer3.2.conv2,layer3.0.conv2",
         "--final-sparsity", "0.5"],
        "final_sparsity=0.5 is invalid: sparsity 0.5 needs 134,168 zeros but only 84,016 weights are outside"),
    "not a number": (["--epochs", "ten"], "Invalid value for '--epochs': 'ten' is not a valid integer."),
    "unknown option": (["--sparsity", "0.9"], "No such option '--sparsity'. (Did you mean one of: '--final-sparsity'"),
    "lr 0": (["--lr", "0"], "lr=0.0 is invalid: must be in (0, 10]"),
    "unknown schedule": (["--schedule", "exponential"], "schedule='exponential' is unknown"),
    "repeated seeds": (["--seeds", "0,0"], "seeds='0,0' is invalid: give distinct seeds"),
    "SLURM option without a partition": (["--gpus", "1"], "SLURM option(s) --gpus given without --partition"),
    "weights of the other architecture": (["--model", "resnet20b"], "holds resnet20a weights"),
    "missing weights file": (["--weights", "/nonexistent/w.th"], "weights file not found: /nonexistent/w.th"),
    "results root is a file": (["--results", "FILE"], "is a file, not a folder"),
    "resume with --run-id": (["--resume", "old"], "--seeds, --run-id and --run do not go with it"),
    "CUDA device that is not there": (["--device", "cuda:99"], "device 'cuda:99' asked for but torch sees"),
    "train size past the set": (["--train-size", "60000"], "train_size=60000 is invalid: the data has 250 images"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, synthetic_cifar: Path, synthetic_weights: Path,
                                                         corrupt_weights: Path, tmp_path: Path) -> None:
    extra, message = BAD_INPUT[case]
    (tmp_path / "file").write_text("")
    extra = [{"CORRUPT": str(corrupt_weights), "FILE": str(tmp_path / "file")}.get(a, a) for a in extra]
    results = tmp_path / "results"
    before = sorted(tmp_path.rglob("*"))
    out = CliRunner().invoke(cli, _prune_args(synthetic_cifar, synthetic_weights, results, "bad", *extra))
    assert out.exit_code == 2, out.output
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message in lines[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_prune_without_starting_weights_is_refused(synthetic_cifar: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    out = CliRunner().invoke(cli, ["prune", "--data-root", str(synthetic_cifar), "--results", str(results)])
    assert out.exit_code == 2
    assert out.stderr.startswith("error: prune needs starting weights") and len(out.stderr.splitlines()) == 1
    assert not results.exists()


@pytest.mark.slow  # a fresh interpreter imports torch (~5 s)
def test_bad_input_in_a_real_process(synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path) -> None:
    """The same contract from a shell: ``python -m jobs.launch`` with its real logging and stderr."""
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESS_")}
    proc = subprocess.run([sys.executable, "-m", "jobs.launch",
                           *_prune_args(synthetic_cifar, synthetic_weights, results, "bad", "--phases", "0")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: phases=0 is invalid: must be >= 1"]
    assert proc.stdout == "" and not results.exists()


def test_help_groups_options_and_names_environment_defaults() -> None:
    out = _invoke(["prune", "--help"])
    assert out.exit_code == 0
    text = out.stdout
    for panel in ("Model and data", "Run", "Training", "Pruning", "Distillation", "SLURM"):
        assert f"─ {panel}" in text, panel
    assert "$COMPRESS_DATA" in text and "$COMPRESS_WEIGHTS" in text and '[default: ""]' not in text
    assert text.index("─ Pruning") < text.index("--final-sparsity") < text.index("─ Distillation")


@pytest.mark.slow  # shares one prune run
def test_a_new_local_run_says_what_it_plans_and_how_long_it_takes(prune_run) -> None:
    result, _ = prune_run
    plan = next(ln for ln in result.stdout.splitlines() if ln.startswith("plan: about "))
    assert "2 phase(s), 2 epoch(s) over 250 images, 3 evaluation(s) of 100; from 3 timed batches on" in plan


@pytest.mark.parametrize("kd_weight", [0.0, 0.5])
def test_the_estimate_times_the_teacher_forward_of_a_distilled_run(kd_weight: float,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.loops

    teachers: list[object] = []
    real = compress.loops.train_one_epoch
    monkeypatch.setattr(compress.loops, "train_one_epoch", lambda *a, teacher=None, **kw:
                        teachers.append(teacher) or real(*a, teacher=teacher, **kw))
    spec = TrainSpec(epochs=1, batch_size=4, kd_weight=kd_weight, teacher="teacher.th" if kd_weight else "")
    seconds, _ = jobs.training.estimate_seconds(spec, (100, 50))
    assert seconds > 0 and len(teachers) == 2  # the warm-up batch and the timed ones
    assert all((t is not None) == (kd_weight > 0) for t in teachers)


@pytest.mark.parametrize("native", [False, True])
def test_cpu_bf16_on_a_cpu_without_bf16_kernels_warns_once_and_still_runs(
        native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, synthetic_cifar: Path,
        synthetic_weights: Path, tmp_path: Path) -> None:
    # torch's probe answers for this machine's CPU; both answers are set here so either CPU tests both paths
    import compress.loops

    monkeypatch.setattr(compress.loops, "cpu_has_bf16_kernels", lambda: native)
    args = ["prune", "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights), "--results",
            str(tmp_path / "r"), "--run-id", "bf16", "--phases", "1", "--epochs", "0", "--final-sparsity", "0.5",
            "--batch-size", "10", "--eval-batch-size", "100", "--device", "cpu"]
    with caplog.at_level("WARNING", logger="jobs.training"):
        with_bf16 = CliRunner().invoke(cli, [*args, "--cpu-bf16"], catch_exceptions=False)
    assert with_bf16.exit_code == 0, with_bf16.output
    warnings = [r.getMessage() for r in caplog.records if "--cpu-bf16 on this CPU" in r.getMessage()]
    assert len(warnings) == (0 if native else 1), warnings  # the run's log says it, once
    if not native:
        assert "ten times slower than float32: drop --cpu-bf16" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="jobs.training"):
        plain = CliRunner().invoke(cli, [*(a if a != "bf16" else "fp32" for a in args)], catch_exceptions=False)
    assert plain.exit_code == 0 and not any("--cpu-bf16" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("native", [False, True])
def test_a_search_here_with_cpu_bf16_warns_before_its_trials_whose_logs_are_not_shown(
        native: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import compress.loops
    from cli.tune import warn_slow_cpu_bf16
    from jobs.specs import PruneSpec

    monkeypatch.setattr(compress.loops, "cpu_has_bf16_kernels", lambda: native)
    warn_slow_cpu_bf16(PruneSpec(cpu_bf16=True, device="cpu"))
    warn_slow_cpu_bf16(PruneSpec(cpu_bf16=False, device="cpu"))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == (0 if native else 1)  # only the spec that asks for bf16, only on a CPU without kernels
    assert all(ln.startswith("warning: --cpu-bf16 on this CPU") for ln in lines)
