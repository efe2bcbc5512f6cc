"""Rows keep the predicted class of every test image: phase rows of prune runs, PTQ rows (int8 and float).

Short real jobs on the synthetic CIFAR-10 (100 test images): each row's predictions, scored against
the test labels in test-set order, give exactly the row's top-1, and they are the predictions of the
model the row describes (the starting weights for phase 0, ``final.pt`` for the last phase).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

import jobs.training
from compress.data import BatchLoader, load_cifar10
from compress.loops import evaluate
from compress.models import load_model
from jobs import tables
from jobs.ptq import run_ptq
from jobs.specs import PruneSpec, PTQSpec
from jobs.training import run_prune


class Interrupted(Exception):
    """Stands in for a kill of the job."""


def labels(root: Path) -> np.ndarray:
    return load_cifar10(root).test_y.numpy()


def top1_of(predictions: bytes, truth: np.ndarray) -> float:
    """Top-1 the way ``evaluate`` computes it: 100 * right / images."""
    pred = np.frombuffer(predictions, dtype=np.uint8)
    return 100.0 * int((pred == truth[:len(pred)]).sum()) / len(pred)


def phase_rows(results: Path) -> list[dict]:
    return sorted(ds.dataset(results / "phases", format="parquet").to_table().to_pylist(), key=lambda r: r["phase"])


def _spec(results: Path, data: Path, weights: Path, **fields) -> PruneSpec:
    base = dict(model="resnet20a", weights=str(weights), data_root=str(data), results=str(results), run_id="p",
                seed=1, phases=2, epochs=1, final_sparsity=0.5, batch_size=50, eval_batch_size=30)
    return PruneSpec(**{**base, **fields}).with_defaults()


@pytest.mark.slow  # one short prune run (~6 s)
def test_phase_rows_keep_predictions_that_score_their_top1(synthetic_cifar: Path, synthetic_weights: Path,
                                                           tmp_path: Path) -> None:
    reported: list[dict] = []
    summary = run_prune(_spec(tmp_path, synthetic_cifar, synthetic_weights), report=reported.append)
    rows = phase_rows(tmp_path)
    truth = labels(synthetic_cifar)
    assert [r["phase"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert len(r["predictions"]) == 100
        assert top1_of(r["predictions"], truth) == r["top1"]
    assert len({r["predictions"] for r in rows}) == 3  # each phase its own model
    # the predictions are those of the models the rows describe, image by image in test-set order
    data = load_cifar10(synthetic_cifar)
    cpu = torch.device("cpu")
    for weights, row in ((synthetic_weights, rows[0]), (tmp_path / "runs" / "p" / "final.pt", rows[-1])):
        ev = evaluate(load_model("resnet20a", weights), BatchLoader(data.test_x, data.test_y, 100, cpu), cpu,
                      keep_predictions=True, progress=False)
        assert ev.predictions.numpy().tobytes() == row["predictions"]
    # bytes stay in the table: not in what Tune sees, nor in the summary and its JSON
    assert reported and all("predictions" not in r for r in reported)
    assert "predictions" not in summary
    assert "predictions" not in json.loads((tmp_path / "runs" / "p" / "summary.json").read_text())


@pytest.mark.slow  # one stopped run and its resume (~6 s)
@pytest.mark.parametrize("state_has_predictions", [True, False])
def test_a_run_stopped_before_its_phase_row_writes_the_predictions_of_its_last_epoch(
        synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        state_has_predictions: bool) -> None:
    """Killed after the last epoch was saved, before the phase row: the resume writes the row from the state
    (a state saved before predictions were kept has none: the phase is evaluated again, once)."""
    real_write = jobs.training._Schedule.write_phase

    def killed(self, ph, t_phase):
        raise Interrupted

    spec = _spec(tmp_path, synthetic_cifar, synthetic_weights, phases=1)
    monkeypatch.setattr(jobs.training._Schedule, "write_phase", killed)
    with pytest.raises(Interrupted):
        run_prune(spec)
    state_path = tmp_path / "runs" / "p" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    assert (state["phase"], state["epoch"]) == (1, 1) and state["predictions"].dtype == torch.uint8
    if not state_has_predictions:
        del state["predictions"]
        torch.save(state, state_path)

    evaluations: list[int] = []
    real_evaluate = jobs.training.evaluate

    def counting(*args, **kwargs):
        evaluations.append(1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(jobs.training._Schedule, "write_phase", real_write)
    monkeypatch.setattr(jobs.training, "evaluate", counting)
    run_prune(spec)
    assert len(evaluations) == (0 if state_has_predictions else 1)
    rows = phase_rows(tmp_path)
    assert [r["phase"] for r in rows] == [0, 1]
    assert top1_of(rows[1]["predictions"], labels(synthetic_cifar)) == rows[1]["top1"]


def test_ptq_rows_keep_int8_and_float_predictions(synthetic_cifar: Path, synthetic_weights: Path,
                                                  tmp_path: Path) -> None:
    saved = torch.backends.quantized.engine
    try:
        spec = PTQSpec(weights=str(synthetic_weights), data_root=str(synthetic_cifar), results=str(tmp_path),
                       run_id="q", device="cpu", methods=("fx", "manual"), calib_sizes=(50,), calib_batch_size=25,
                       alphas=(0.9, 1.0), test_size=40, eval_batch_size=40)
        run_ptq(spec)
    finally:
        torch.backends.quantized.engine = saved
    rows = ds.dataset(spec.task_file(), format="parquet", schema=tables.PTQ).to_table().to_pylist()
    truth = labels(synthetic_cifar)
    assert len(rows) == 3
    for r in rows:
        assert len(r["predictions"]) == len(r["float_predictions"]) == r["test_images"] == 40
        assert top1_of(r["predictions"], truth) == r["int8_top1"]
        assert top1_of(r["float_predictions"], truth) == r["float_top1"]
    assert len({r["float_predictions"] for r in rows}) == 1  # one float model per task
    summary = run_ptq(dataclasses.replace(spec))  # already written: read back, bytes left out of the summary
    assert all("predictions" not in r and "float_predictions" not in r for r in summary["rows"])


def test_more_than_256_classes_keep_two_bytes_a_prediction_and_the_report_reads_them() -> None:
    """A uint8 would wrap class 300 to 44; int16 keeps it, and the report scores it against the labels."""
    from analysis.significance import Significance

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 300))
    x = torch.rand(40, 3, 2, 2)
    labels = model(x).argmax(1)
    labels[:10] = (labels[:10] + 1) % 300  # 10 of 40 wrong: top-1 75%
    ev = evaluate(model, [(x, labels)], torch.device("cpu"), keep_predictions=True)
    assert ev.predictions.dtype == torch.int16 and ev.top1 == 75.0
    assert int(ev.predictions.max()) > 255
    row = {"predictions": ev.predictions.numpy().tobytes(), "top1": ev.top1, "data_classes": 300, "run_id": "r"}
    right = Significance(labels.numpy()).correct(row)
    assert right is not None and int(right.sum()) == 30
    narrow = Significance(labels.numpy())
    assert narrow.correct({**row, "data_classes": 10}) is None and narrow.mismatched  # read as bytes: no match
