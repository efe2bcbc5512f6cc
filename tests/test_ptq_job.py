"""The PTQ job and its command: grid expansion, one calibration per task, Parquet rows, bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import compress.quant.fx as fx_module
import compress.quant.observe as observe_module
from cli.main import cli
from compress.models import build_model, load_model
from compress.prune import global_magnitude_masks
from jobs import tables
from jobs.ptq import plan_tasks, run_ptq
from jobs.runs import SpecMismatch
from jobs.specs import PTQSpec, expand_ranges


@pytest.fixture(autouse=True)
def _restore_engine():
    saved = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = saved


def _spec(data: Path, weights: Path, results: Path, **fields) -> PTQSpec:
    base = dict(weights=str(weights), data_root=str(data), results=str(results), run_id="t", device="cpu",
                calib_sizes=(50,), calib_batch_size=25, test_size=40, eval_batch_size=40)
    return PTQSpec(**{**base, **fields})


def _count_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


BAD_SPEC = {
    "alpha zero": ({"alphas": (0.0,)}, "alphas=0.0 is invalid: each alpha must be in (0, 1.5]"),
    "alpha too big": ({"alphas": (1.0, 1.6)}, "alphas=1.6 is invalid"),
    "calib size 0": ({"calib_sizes": (0,)}, "calib_sizes=0 is invalid"),
    "unknown observer": ({"observers": ("percentile",)}, "observers='percentile' is unknown; known:"),
    "unknown engine": ({"engine": "onednn"}, "engine='onednn' is unknown; known: fbgemm, qnnpack, x86"),
    "unknown center": ({"centers": ("max",)}, "centers='max' is unknown; known: min, zero"),
    "unknown method": ({"methods": ("eager",)}, "methods='eager' is unknown; known: fx, manual"),
    "unknown weights": ({"weight_observers": ("per_row",)}, "weight_observers='per_row' is unknown"),
    "repeated observer": ({"observers": ("minmax", "minmax")}, "values must be distinct"),
    "no alphas": ({"alphas": ()}, "give at least one alpha"),
    "pt2e per-tensor weights": ({"methods": ("pt2e",), "weight_observers": ("per_tensor",)},
                                "pt2e builds weights per_channel only, not per_tensor"),
    "pt2e on qnnpack": ({"methods": ("manual", "pt2e"), "engine": "qnnpack"},
                        "pt2e runs on engines x86, fbgemm only, not qnnpack"),
    "alpha without manual": ({"methods": ("fx", "pt2e"), "alphas": (0.99,)},
                             "alpha/center shrink is expressed by the manual method only"),
    "center without manual": ({"methods": ("pt2e",), "centers": ("zero",)}, "add manual to --methods"),
}


@pytest.mark.parametrize("case", list(BAD_SPEC))
def test_spec_rejects_bad_values(case: str, tmp_path: Path) -> None:
    fields, message = BAD_SPEC[case]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")
                       .replace("[", r"\[")):
        PTQSpec(**fields)


def test_expand_ranges() -> None:
    assert expand_ranges("0.95:1.0:0.01") == "0.95,0.96,0.97,0.98,0.99,1.0"
    assert expand_ranges("0.9, 0.98:1.0:0.01") == "0.9,0.98,0.99,1.0"
    assert expand_ranges("1.0") == "1.0"
    for bad in ("1.0:0.9:0.01", "0.9:1.0", "a:b:c", "0.9:1.0:0"):
        with pytest.raises(ValueError, match="is invalid: use start:stop:step"):
            expand_ranges(bad)


def test_plan_tasks_one_per_observer_and_size() -> None:
    spec = PTQSpec(observers=("minmax", "histogram"), calib_sizes=(100, 1000, 5000), alphas=(0.98, 1.0),
                   centers=("min", "zero"), weight_observers=("per_channel", "per_tensor"), run_id="r")
    tasks = plan_tasks(spec)
    assert [t.task_name() for t in tasks] == ["minmax-100", "minmax-1000", "minmax-5000",
                                             "histogram-100", "histogram-1000", "histogram-5000"]
    for t in tasks:
        assert t.alphas == (0.98, 1.0) and t.centers == ("min", "zero") and len(t.weight_observers) == 2
        assert dataclasses.replace(t, observers=spec.observers, calib_sizes=spec.calib_sizes) == spec
    with pytest.raises(ValueError, match="one observer and one calibration size"):
        spec.task_name()


def test_run_ptq_calibrates_once_and_writes_every_variant(synthetic_cifar: Path, synthetic_weights: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manual_calls = _count_calls(monkeypatch, observe_module, "calibrate")
    fx_calls = _count_calls(monkeypatch, fx_module, "calibrate")
    spec = _spec(synthetic_cifar, synthetic_weights, tmp_path, methods=("fx", "manual"),
                 weight_observers=("per_channel", "per_tensor"), alphas=(0.95, 0.99, 1.0), centers=("min", "zero"))
    summary = run_ptq(spec)
    assert manual_calls == [1] and fx_calls == [1]  # 12 manual variants and 2 FX models from 2 calibrations

    path = spec.task_file()
    assert path == tmp_path / "ptq" / "t-minmax-50.parquet" and summary["path"] == str(path)
    table = pq.read_table(path)
    assert table.schema.equals(tables.PTQ)
    rows = table.to_pylist()
    assert len(rows) == 2 * 3 * 2 + 2
    manual = [r for r in rows if r["method"] == "manual"]
    fx_rows = [r for r in rows if r["method"] == "fx"]
    assert {(r["weight_observer"], r["alpha"], r["center"]) for r in manual} == {
        (w, a, c) for w in ("per_channel", "per_tensor") for a in (0.95, 0.99, 1.0) for c in ("min", "zero")}
    assert all(r["alpha"] is None and r["center"] is None for r in fx_rows)
    assert len({r["calib_seconds"] for r in manual}) == 1
    assert len({r["float_top1"] for r in rows}) == 1
    for r in rows:
        assert r["calib_size"] == 50 and r["test_images"] == 40 and r["observer"] == "minmax"
        assert r["activation_bits"] == 7 and r["engine"] == "x86"
        assert 0 <= r["int8_top1"] <= 100
        assert r["float_bytes"] == 1_084_416 and r["int8_bytes"] < r["float_bytes"] / 3.5
        assert r["spec_observers"] == "minmax" and r["spec_alphas"] == "0.95,0.99,1.0"
        assert r["git_commit"] is not None and r["run_id"] == "t" and r["kind"] == "ptq"
    # per-tensor weights store one scale per tensor: a smaller model
    assert fx_rows[0]["int8_bytes"] > fx_rows[1]["int8_bytes"]
    assert len(summary["rows"]) == len(rows)


def test_run_ptq_again_returns_the_written_rows(synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(synthetic_cifar, synthetic_weights, tmp_path, methods=("manual",))
    first = run_ptq(spec)
    calls = _count_calls(monkeypatch, observe_module, "calibrate")
    assert run_ptq(spec)["rows"] == first["rows"] and calls == []
    with pytest.raises(SpecMismatch, match="holds PTQ results of another spec"):
        run_ptq(dataclasses.replace(spec, alphas=(0.9,)))


def test_pruned_checkpoints_are_made_permanent(synthetic_cifar: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20a")
    masks = global_magnitude_masks(model, 0.8)
    # a prune run's state.pt: weights and the masks that keep them zero
    state_path = tmp_path / "state.pt"
    dense = {k: v + (v == 0) * 0.5 for k, v in model.state_dict().items()}  # masked weights not yet zeroed
    torch.save({"model": dense, "masks": masks.state_dict()}, state_path)
    loaded = load_model("resnet20a", state_path).eval()
    assert all(torch.all(p[~masks.masks[n]] == 0) for n, p in loaded.named_parameters() if n in masks.masks)
    # torch.nn.utils.prune layout: weight_orig * weight_mask
    pruned_state = {}
    for k, v in model.state_dict().items():
        if k in masks.masks:
            pruned_state[k.removesuffix("weight") + "weight_orig"] = v
            pruned_state[k.removesuffix("weight") + "weight_mask"] = masks.masks[k].float()
        else:
            pruned_state[k] = v
    torch_prune_path = tmp_path / "torch-prune.pt"
    torch.save(pruned_state, torch_prune_path)
    loaded2 = load_model("resnet20a", torch_prune_path).eval()
    assert all(torch.equal(dict(loaded2.named_parameters())[n], dict(loaded.named_parameters())[n])
               for n in masks.masks)

    summary = run_ptq(_spec(synthetic_cifar, state_path, tmp_path, methods=("manual", "fx")))
    for r in summary["rows"]:
        assert r["sparsity"] == pytest.approx(0.8, abs=1e-5)
        assert r["int8_packed_bytes"] < r["int8_bytes"] / 2
    row = pq.read_table(tmp_path / "ptq" / "t-minmax-50.parquet").to_pylist()[0]
    assert row["int8_sparsity"] >= row["sparsity"]


def _ptq_args(data: Path, weights: Path, results: Path, *extra: str) -> list[str]:
    return ["ptq", "--data-root", str(data), "--weights", str(weights), "--results", str(results),
            "--run-id", "cli", "--device", "cpu", "--test-size", "40", "--calib-batch-size", "25",
            "--calib-sizes", "50", *extra]


BAD_INPUT = {
    "alpha 0": (["--alphas", "0,1.0"], "alphas=0.0 is invalid: each alpha must be in (0, 1.5]"),
    "alpha above 1.5": (["--alphas", "1.4:1.6:0.1"], "alphas=1.6 is invalid"),
    "bad range": (["--alphas", "1.0:0.9:0.01"], "range '1.0:0.9:0.01' is invalid"),
    "calib size 0": (["--calib-sizes", "0"], "calib_sizes=0 is invalid"),
    "calib size > this training set": (["--calib-sizes", "251"], "larger than the training set (250 images)"),
    "unknown observer": (["--observers", "minmax,kl"], "observers='kl' is unknown; known:"),
    "unknown engine": (["--engine", "tensorrt"], "engine='tensorrt' is unknown; known: fbgemm, qnnpack, x86"),
    "unknown center": (["--centers", "mean"], "centers='mean' is unknown; known: min, zero"),
    "missing weights": (["--weights", "/nonexistent/w.pt"], "weights file not found"),
    "alpha with pt2e only": (["--methods", "pt2e", "--alphas", "0.95:1.0:0.01"],
                             "alpha/center shrink is expressed by the manual method only"),
    "bad export selector": (["--export", "fastest"], "unknown term 'fastest'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, synthetic_cifar: Path, synthetic_weights: Path,
                                                         tmp_path: Path) -> None:
    extra, message = BAD_INPUT[case]
    results = tmp_path / "results"
    out = CliRunner().invoke(cli, _ptq_args(synthetic_cifar, synthetic_weights, results, *extra))
    assert out.exit_code == 2, out.output
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message in lines[0]
    assert not results.exists()


def test_dry_run_lists_the_tasks(synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    out = CliRunner().invoke(cli, _ptq_args(synthetic_cifar, synthetic_weights, results, "--dry-run",
                                            "--observers", "minmax,histogram", "--calib-sizes", "10,20",
                                            "--alphas", "0.98:1.0:0.01"), catch_exceptions=False)
    assert out.exit_code == 0
    assert "4 task(s): minmax-10, minmax-20, histogram-10, histogram-20" in out.stdout
    assert '"alphas": [\n    0.98,\n    0.99,\n    1.0\n  ]' in out.stdout
    assert not results.exists()


def test_command_runs_every_task_locally(synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    out = CliRunner().invoke(cli, _ptq_args(synthetic_cifar, synthetic_weights, results, "--methods", "manual",
                                            "--calib-sizes", "25,50", "--alphas", "0.99,1.0"),
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (results / "ptq").iterdir()) == ["cli-minmax-25.parquet", "cli-minmax-50.parquet"]
    assert out.stdout.count("manual  minmax") == 4
    assert len(pq.read_table(results / "ptq").to_pylist()) == 4


@pytest.mark.realdata
@pytest.mark.slow
def test_int8_top1_close_to_float_on_real_test_subset(real_data_root: Path, real_weights: Path,
                                                      tmp_path: Path) -> None:
    """Both paths on the real option-A weights: int8 top-1 within 1 pp of float on 1,000 test images."""
    spec = PTQSpec(weights=str(real_weights), data_root=str(real_data_root), results=str(tmp_path), run_id="real",
                   device="cpu", methods=("fx", "manual"), calib_sizes=(500,), test_size=1000)
    rows = run_ptq(spec)["rows"]
    assert len(rows) == 2
    for r in rows:
        assert r["float_top1"] > 88.0
        assert abs(r["int8_top1"] - r["float_top1"]) <= 1.0, r


@pytest.mark.realdata
@pytest.mark.slow
def test_pt2e_int8_close_to_float_beside_fx_on_real_data(real_data_root: Path, real_weights: Path, tmp_path: Path,
                                                         torch_threads: int) -> None:
    """PT2E and FX on the same calibration subset of the option-A weights: within 0.5 pp of float on 2,000 images."""
    spec = PTQSpec(weights=str(real_weights), data_root=str(real_data_root), results=str(tmp_path), run_id="real",
                   device="cpu", methods=("fx", "pt2e"), observers=("histogram",), calib_sizes=(1000,),
                   test_size=2000)
    rows = run_ptq(spec)["rows"]
    assert [r["method"] for r in rows] == ["fx", "pt2e"]
    for r in rows:
        assert r["float_top1"] > 90.0
        assert abs(r["int8_top1"] - r["float_top1"]) <= 0.5, r
    # both ship a program; dense weights pack to well under half of the .pt2 (graph metadata gone, lzma)
    for r in rows:
        assert 0 < r["int8_packed_bytes"] < r["program_bytes"] / 2


@pytest.mark.gpu
def test_run_ptq_on_the_job_device(synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path,
                                   cuda: torch.device) -> None:
    """Calibration and the float evaluation on the job's device (CUDA); int8 on the CPU."""
    device = cuda
    spec = _spec(synthetic_cifar, synthetic_weights, tmp_path, device=str(device), methods=("fx", "manual"),
                 observers=("histogram",))
    rows = pq.read_table(Path(run_ptq(spec)["path"])).to_pylist()
    assert len(rows) == 2
    expected = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    assert all(r["device_name"] == expected and r["spec_device"] == str(device) for r in rows)
