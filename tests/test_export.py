"""The export and verify commands: a PTQ row or a prune run's model as files, checked; bad input writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compress.artifacts import manifest_path
from compress.models import build_model
from compress.prune import global_magnitude_masks

pytestmark = pytest.mark.slow


def _invoke(*args: str) -> tuple[int, str, str]:
    out = CliRunner().invoke(cli, list(args))
    return out.exit_code, out.stdout, out.stderr


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: what a failed command must leave as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sweep(synthetic_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PTQ sweep of a 90%-sparse checkpoint with all three backends: 4 rows under <results>/ptq."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model("resnet20a")
    masks = global_magnitude_masks(model, 0.9)
    torch.save({"model": model.state_dict(), "masks": masks.state_dict()}, root / "pruned.pt")
    code, out, err = _invoke("ptq", "--weights", str(root / "pruned.pt"), "--data-root", str(synthetic_cifar),
                             "--results", str(root / "results"), "--run-id", "sw", "--device", "cpu",
                             "--methods", "manual,fx,pt2e", "--observers", "minmax", "--calib-sizes", "50",
                             "--calib-batch-size", "25", "--alphas", "1.0,0.99", "--export", "method=fx")
    assert code == 0, err
    assert "export sw: best: highest int8 top-1" in out and "[fx minmax per_channel calib 50]" in out
    return root / "results"


def _rows(results: Path) -> list[dict]:
    return pq.read_table(results / "ptq").to_pylist()


def test_ptq_export_option_writes_the_selected_row(sweep: Path) -> None:
    rows = _rows(sweep)
    assert [r["method"] for r in rows] == ["manual", "manual", "fx", "pt2e"]
    fx_row = rows[2]
    folder = sweep / "runs" / "sw" / "export"
    path = folder / "fx-minmax-per_channel-c50.int8.pt2pack"
    manifest = json.loads(manifest_path(path).read_text())
    assert path.stat().st_size == fx_row["int8_packed_bytes"] == manifest["bytes"]
    assert manifest["expected_top1"] == fx_row["int8_top1"] and manifest["kind"] == "int8-pt2pack"
    assert manifest["source"]["row"]["method"] == "fx" and manifest["source"]["selector"] == "method=fx"
    assert manifest["spec"]["methods"] == ["fx"] and manifest["test_images"] == 100
    assert "torchao" in manifest["versions"]
    # the same program as torch.export.save writes it, and the loader the packed file names, beside it
    pt2 = folder / "fx-minmax-per_channel-c50.int8.pt2"
    assert pt2.stat().st_size == fx_row["program_bytes"] > 8 * path.stat().st_size
    loader = folder / manifest["loader"]["file"]
    assert hashlib.sha256(loader.read_bytes()).hexdigest() == manifest["loader"]["sha256"]


@pytest.mark.parametrize("select,name", [
    ("method=manual,alpha=0.99", "manual-minmax-per_channel-c50-a0.99-min.int8.pt2pack"),
    ("method=pt2e", "pt2e-minmax-per_channel-c50.int8.pt2"),
    ("method=pt2e", "pt2e-minmax-per_channel-c50.int8.pt2pack"),
])
def test_export_then_verify(sweep: Path, synthetic_cifar: Path, select: str, name: str) -> None:
    code, out, err = _invoke("export", "sw", "--select", select, "--results", str(sweep), "--data-root",
                             str(synthetic_cifar), "--device", "cpu")
    assert code == 0, err
    path = sweep / "runs" / "sw" / "export" / name
    assert f"{path}" in out and "read back: same predictions" in out
    row = next(r for r in _rows(sweep) if name.startswith(f"{r['method']}-") and
               (r["alpha"] is None or f"a{r['alpha']:g}-" in name))
    size = row["int8_packed_bytes"] if name.endswith(".pt2pack") else row["program_bytes"]
    assert path.stat().st_size == size
    code, out, err = _invoke("verify", str(path))
    assert code == 0, err
    assert out.startswith(f"ok: {path}") and "same predictions" in out
    # a damaged copy fails in one line
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    code, out, err = _invoke("verify", str(path))
    path.write_bytes(data)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "sha256 mismatch" in err


def test_a_row_that_does_not_reproduce_is_exported_with_a_warning(sweep: Path, tmp_path: Path) -> None:
    """As when a sweep calibrated on a GPU is exported on a CPU: the file holds the rebuilt model, and says so."""
    import shutil

    from compress.results import write_rows
    from jobs import tables

    results = tmp_path / "results"
    shutil.copytree(sweep / "ptq", results / "ptq")
    path = results / "ptq" / "sw-minmax-50.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[0]["int8_top1"] -= 1.0  # the manual alpha-1 row, as another device scored it
    write_rows(path, rows, tables.PTQ)
    code, out, err = _invoke("export", "sw", "--select", "method=manual,alpha=1", "--results", str(results))
    assert code == 0, err
    assert err.startswith("warning: the rebuilt manual minmax per_channel calib 50 alpha 1") and "the row says" in err
    (written,) = (results / "runs" / "sw" / "export").glob("*.pt2pack")
    manifest = json.loads(manifest_path(written).read_text())
    assert manifest["source"]["reproduced"] is False and manifest["expected_top1"] == rows[0]["int8_top1"] + 1.0
    assert _invoke("verify", str(written))[0] == 0


def test_prune_run_ships_a_packed_float_model(synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    code, _, err = _invoke("prune", "--data-root", str(synthetic_cifar), "--weights", str(synthetic_weights),
                           "--results", str(results), "--run-id", "pr", "--phases", "1", "--epochs", "0",
                           "--final-sparsity", "0.9", "--eval-batch-size", "100")
    assert code == 0, err
    packed = results / "runs" / "pr" / "export" / "model.float.packed"
    final = results / "runs" / "pr" / "final.pt"
    assert packed.stat().st_size < final.stat().st_size / 5
    first = json.loads(manifest_path(packed).read_text())
    code, out, err = _invoke("verify", str(packed))
    assert code == 0 and out.startswith("ok:"), err
    code, out, err = _invoke("export", "pr", "--results", str(results))
    assert code == 0, err
    assert "export pr: the run's final model" in out
    again = json.loads(manifest_path(packed).read_text())
    assert again["sha256"] == first["sha256"] and again["expected_top1"] == first["expected_top1"]


BAD_EXPORT = {
    "unknown run": (["sx"], "run='sx' is unknown: no PTQ rows in"),
    "selector matches nothing": (["sw", "--select", "method=manual,observer=histogram"],
                                 "select 'method=manual,observer=histogram' matches none of the 4 rows of run sw"),
    "no such calibration size": (["sw", "--select", "method=pt2e,calib_size=51"], "calib_size values"),
    "bad selector": (["sw", "--select", "fastest"], "unknown term 'fastest'"),
    "unknown column": (["sw", "--select", "speed=1"], "unknown column 'speed'"),
    "two objectives": (["sw", "--select", "best,smallest"], "objective given twice"),
    "bad tolerance": (["sw", "--select", "max-drop=x"], "needs a number of percentage points"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORT))
def test_bad_export_input_is_one_line_exit_2_and_writes_nothing(sweep: Path, case: str) -> None:
    args, message = BAD_EXPORT[case]
    before = _tree(sweep)
    code, out, err = _invoke("export", *args, "--results", str(sweep))
    assert code == 2, out + err
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err
    assert _tree(sweep) == before


def test_a_tolerance_no_row_meets(tmp_path: Path) -> None:
    """Rows as a sweep writes them, all 0.5 pp or more below float: max-drop=0.3 leaves none."""
    from compress.results import write_rows
    from jobs import tables

    base = {"run_id": "r", "kind": "ptq", "task": "minmax-100", "observer": "minmax", "weight_observer": "per_channel",
            "engine": "x86", "calib_size": 100, "float_top1": 90.0}
    rows = [{**base, "method": "manual", "alpha": 1.0, "center": "min", "int8_top1": 89.5, "int8_packed_bytes": 45_000},
            {**base, "method": "fx", "int8_top1": 89.2, "int8_packed_bytes": 44_000}]
    write_rows(tmp_path / "ptq" / "r-minmax-100.parquet", rows, tables.PTQ)
    before = _tree(tmp_path)
    code, out, err = _invoke("export", "r", "--select", "max-drop=0.3,smallest", "--results", str(tmp_path))
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert "no row of run r is within 0.3 pp of its float top-1 (the closest: manual minmax" in err
    assert "0.50 pp below" in err or "0.5 pp below" in err
    assert _tree(tmp_path) == before


def test_results_files_honour_the_umask(sweep: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    for p in (sweep / "runs" / "sw" / "export").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
