"""The export job: the model a run chose, as files that load without this project's training code.

    python -m jobs.launch export ptq-gmp93 --select best                  # highest int8 top-1
    python -m jobs.launch export ptq-gmp93 --select max-drop=0.3,smallest # smallest within 0.3 pp of float
    python -m jobs.launch export ptq-gmp93 --select method=pt2e,observer=histogram
    python -m jobs.launch export gmp93-c8x3f39-kd5-s0                     # a prune run: its final model

For a PTQ run the selector (``jobs.selection``) picks one row; the job rebuilds that configuration
from the row's own spec (same weights, same seeded calibration subset, same backend), checks that
the rebuilt model scores the row's top-1, writes the row's artifact, reads the file back from disk
and checks that it predicts the same class as the in-memory model for every test image. Written
under ``<results>/runs/<run_id>/export/``:

    <config>.int8.pt2pack (+ .json)   every shipped row (manual, fx on the built-in ResNets, pt2e): the
                                      int8 program packed small (its size is the row's int8_packed_bytes);
                                      ``pt2pack.load`` with torch and torchao only
    <config>.int8.pt2     (+ .json)   the same program as ``torch.export.save`` writes it (program_bytes);
                                      ``torch.export.load`` with torch and torchao only
    pt2pack.py                        the standalone loader of the .pt2pack files (its sha256 in their manifests)
    model.float.packed    (+ .json)   a prune or train run: the final float model, sparse weights

A run, selector or tolerance that matches nothing is one ``ValueError`` line before anything is
written. Where it runs: calibration on ``spec.device``; int8 models, packing and checks on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import difflib
import json
import logging
import typing
from pathlib import Path
from typing import Any

import torch

from compress import registry
from compress.artifacts import (
    COMPILE_PT2,
    LOAD_PACKED,
    LOAD_PT2,
    LOAD_PT2PACK,
    load_artifact,
    loader_entry,
    manifest_path,
    write_artifact,
    write_loader,
)
from compress.datasets import make_loader
from compress.loops import evaluate, pick_device
from compress.provenance import provenance
from compress.quant import quiet
from compress.quant.packed import pack_float
from compress.results import EXPORT, FINAL, SUMMARY, read_table, run_folder, run_folders
from jobs.inputs import load_run_data, load_stored_data
from jobs.ptq import _quantize_all
from jobs.selection import Choice, describe, parse_selector, select_row
from jobs.specs import ExportSpec, PTQSpec, check

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A rebuilt model or a written file that does not reproduce what the run recorded."""


def _ptq_rows(results: str, run: str) -> list[dict[str, Any]]:
    try:
        table = read_table(results, "ptq")
    except FileNotFoundError:
        return []
    import pyarrow.compute as pc

    return table.filter(pc.equal(table["run_id"], run)).to_pylist()


def _known_runs(results: str) -> list[str]:
    runs = {p.name for p in run_folders(results, holding=FINAL)}
    with contextlib.suppress(FileNotFoundError):
        runs |= set(read_table(results, "ptq").column("run_id").to_pylist())
    return sorted(runs)


def find_run(spec: ExportSpec) -> tuple[str, list[dict[str, Any]]]:
    """("ptq", its rows) or ("model", []) for a finished prune/train run; a one-line error for neither."""
    rows = _ptq_rows(spec.results, spec.run)
    if rows:
        return "ptq", rows
    if (run_folder(spec.results, spec.run) / FINAL).is_file():
        return "model", []
    close = difflib.get_close_matches(spec.run, _known_runs(spec.results), n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ValueError(f"run={spec.run!r} is unknown: no PTQ rows in {spec.results}/ptq and no finished run "
                     f"{spec.results}/runs/{spec.run}/final.pt{hint}")


def _spec_of(row: dict[str, Any]) -> PTQSpec:
    """The task spec a row was written by, from its ``spec_<field>`` columns."""
    hints = typing.get_type_hints(PTQSpec)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(PTQSpec):
        v = row.get(f"spec_{f.name}")
        if v is None:
            continue
        if typing.get_origin(hints[f.name]) is tuple:
            item = typing.get_args(hints[f.name])[0]
            v = tuple(item(p) for p in str(v).split(",") if p != "")
        kwargs[f.name] = v
    return PTQSpec(**kwargs)


def _slug(row: dict[str, Any]) -> str:
    parts = [row["method"], row["observer"], row["weight_observer"], f"c{row['calib_size']}"]
    if row.get("alpha") is not None:
        parts += [f"a{row['alpha']:g}", str(row["center"])]
    return "-".join(parts)


def _check_same(name: str, want: torch.Tensor, got: torch.Tensor) -> None:
    if not torch.equal(want, got):
        n = int((want != got).sum())
        raise ExportError(f"{name}: {n} of {len(want)} test images get another class from the file than from "
                          f"the model it was written from")


def _manifest(kind: str, spec: dict[str, Any], source: dict[str, Any], top1: float, images: int,
              preds: torch.Tensor, load: str, input_: dict[str, Any], **extra: Any) -> dict[str, Any]:
    prov = provenance()
    return {"kind": kind, "expected_top1": top1, "test_images": images, "predictions_sha256": _preds_sha(preds),
            "load": load, "input": input_, "model": _model_entry(spec), "source": source,
            "spec": spec, **extra, "git_commit": prov["git_commit"],
            "written_at": _dt.datetime.now(_dt.UTC).isoformat()}


def _model_entry(spec: dict[str, Any]) -> dict[str, Any]:
    return {"model": spec.get("model", ""), "model_args": spec.get("model_args", ""), "data": spec.get("data", "")}


def _input(shape: tuple[int, ...], described: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """How the expected top-1 was measured: the first N test images of the run's data, in this layout and these
    batches. A .pt2 computes its convolutions in float on dequantized values, so another layout or batch size can
    round a few activations the other way and change a handful of predictions.

    ``described``: a row, or ``registry.describe`` of the model: its ``data_mean``/``data_std`` are the
    normalisation inside the model (absent in rows written before they were recorded).
    """
    norm = {key: [float(v) for v in str(described[f"data_{key}"]).split(",")] for key in ("mean", "std")
            if described.get(f"data_{key}")}
    return {"images": f"float32 in [0, 1], (N, {', '.join(map(str, shape))}), normalisation inside the model",
            "shape": list(shape), "normalisation": norm, "memory_format": "channels_last", "batch_size": batch_size}


def _preds_sha(preds: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(preds.numpy().tobytes()).hexdigest()




def _export_ptq(spec: ExportSpec, rows: list[dict[str, Any]], choice: Choice) -> dict[str, Any]:
    row = choice.row
    task = _spec_of(row)
    task = dataclasses.replace(task, methods=(row["method"],), weight_observers=(row["weight_observer"],),
                               alphas=(row["alpha"] if row["alpha"] is not None else 1.0,),
                               centers=(row["center"] or "min",), device=spec.device,
                               data_root=spec.data_root or task.data_root)
    built: list[Any] = []
    with quiet():
        _quantize_all(task, keep=lambda r, b: built.append((r, b)))
    (_, b), = built
    data = load_run_data(task)
    n_test = task.test_size or len(data.test)
    cpu = torch.device("cpu")
    test = make_loader(data.test.subset(torch.arange(n_test)), task.eval_batch_size, cpu)
    with quiet():
        ev = evaluate(b.model, test, cpu, keep_predictions=True, desc="int8 eval")
    # a sweep calibrated on a GPU, or under other library versions, can round a range differently here: the
    # file is still checked against the model it was written from, and the drift is said and recorded
    drift = []
    if abs(ev.top1 - row["int8_top1"]) > 1e-9:
        drift.append(f"the rebuilt {describe(row)} scores {ev.top1:.2f}%, the row says {row['int8_top1']:.2f}% "
                     f"(calibrated on {row.get('device_name') or '?'}, rebuilt on {spec.device}): the file has "
                     f"the rebuilt model's top-1")
    folder = run_folder(spec.results, spec.run) / EXPORT
    slug = _slug(row)
    keep = ("run_id", "task", "method", "observer", "weight_observer", "engine", "activation_bits", "calib_size",
            "alpha", "center", "float_top1", "int8_top1", "int8_packed_bytes", "program_bytes", "sparsity")
    source = {"run_id": spec.run, "row": {k: row.get(k) for k in keep}, "selector": spec.select,
              "reason": choice.reason, "rows_considered": len(rows), "reproduced": not drift, "drift": drift}
    common = dict(spec=dataclasses.asdict(task), source=source, top1=ev.top1, images=ev.images, preds=ev.predictions,
                  input_=_input(data.image_shape, row, task.eval_batch_size))
    blob = b.packed()
    # rows written before programs shipped every method measured another file: only today's rows are compared
    if row.get("program_bytes") is not None and len(blob) != row["int8_packed_bytes"] and not drift:
        raise ExportError(f"packed program of {len(blob):,} bytes, the row says {row['int8_packed_bytes']:,}")
    loader = loader_entry()
    packed = _manifest("int8-pt2pack", load=LOAD_PT2PACK, compile=COMPILE_PT2, loader=loader, **common)
    pt2 = _manifest("int8-pt2", load=LOAD_PT2, compile=COMPILE_PT2, **common)
    written = [(folder / f"{slug}.int8.pt2pack", blob, packed), (folder / f"{slug}.int8.pt2", b.pt2(), pt2)]
    out = _write_and_check(written, test, ev.predictions)
    write_loader(folder)
    return {**out, "warnings": drift}


def _export_model(spec: ExportSpec) -> dict[str, Any]:
    final = run_folder(spec.results, spec.run) / FINAL
    ckpt = torch.load(final, map_location="cpu", weights_only=True)
    run_spec = ckpt.get("spec", {})
    name = ckpt.get("arch") or run_spec.get("model", "resnet20a")
    args = ckpt.get("model_args", run_spec.get("model_args", ""))
    data = load_stored_data(run_spec, spec.data_root)
    model = registry.load(name, args, final, data.mean, data.std).eval()
    n_test = run_spec.get("test_size") or len(data.test)
    device = pick_device(spec.device)
    cpu = torch.device("cpu")
    batch = int(run_spec.get("eval_batch_size") or 500)
    test = make_loader(data.test.subset(torch.arange(n_test)), batch, cpu)
    ev = evaluate(model, test, cpu, keep_predictions=True, desc="float eval")
    summary_path = final.parent / SUMMARY
    recorded = json.loads(summary_path.read_text()).get("top1") if summary_path.is_file() else None
    source = {"run_id": spec.run, "checkpoint": str(final), "recorded_top1": recorded, "device": str(device)}
    blob = pack_float(model, name, model_args=args)
    manifest = _manifest("float-packed", run_spec, source, ev.top1, ev.images, ev.predictions, LOAD_PACKED,
                         _input(data.image_shape, registry.describe(model, name), batch),
                         checkpoint_bytes=final.stat().st_size)
    return _write_and_check([(final.parent / EXPORT / "model.float.packed", blob, manifest)], test, ev.predictions)


def _write_and_check(files: list[tuple[Path, bytes, dict[str, Any]]], test: Any,
                     preds: torch.Tensor) -> dict[str, Any]:
    """Write each file with its manifest, load it back from disk, and compare its predictions image by image."""
    out = []
    cpu = torch.device("cpu")
    for path, blob, manifest in files:
        # checked under a temporary name first, so a file that fails its check replaces nothing
        trial = path.with_name(f".{path.stem}.unchecked{path.suffix}")
        try:
            write_artifact(trial, blob, manifest)
            with quiet():
                ev = evaluate(load_artifact(trial), test, cpu, keep_predictions=True, desc="reload")
            _check_same(str(path), preds, ev.predictions)
        finally:
            trial.unlink(missing_ok=True)
            manifest_path(trial).unlink(missing_ok=True)
        full = write_artifact(path, blob, manifest)
        log.info("wrote %s (%d bytes, top-1 %.2f%%, same predictions on %d images)", path, len(blob), ev.top1,
                 ev.images)
        out.append({"path": str(path), "bytes": len(blob), "top1": ev.top1, "kind": full["kind"],
                    "sha256": full["sha256"]})
    return {"files": out}


def plan_export(spec: ExportSpec) -> tuple[str, list[dict[str, Any]], Choice | None]:
    """Find the run and choose its row: every user mistake fails here, before anything is built or written."""
    kind, rows = find_run(spec)
    selector = parse_selector(spec.select)
    if kind == "model":
        check(selector.text.strip() == "best", "select", spec.select,
              "a prune or train run has one model (its final one): omit --select")
        return kind, rows, None
    # a row has a file to ship when it measured one: a packed file (built-in ResNets) or a .pt2 program
    shippable = [r for r in rows if r.get("int8_packed_bytes") is not None or r.get("program_bytes") is not None]
    if not shippable:
        methods = ",".join(sorted({str(r.get("method")) for r in rows}))
        raise ValueError(f"run {spec.run} has no row with a file to export: its {methods} int8 models of "
                         f"{rows[0].get('spec_model')} have no packed form; quantize with --methods pt2e")
    return kind, rows, select_row(shippable, selector, spec.run)


def run_export(spec: ExportSpec) -> dict[str, Any]:
    """Export what ``spec`` selects (see the module docstring); returns the files written and the choice."""
    kind, rows, choice = plan_export(spec)
    if kind == "model":
        return {"run_id": spec.run, "kind": kind, "reason": "the run's final model", "warnings": [],
                **_export_model(spec)}
    return {"run_id": spec.run, "kind": kind, "reason": choice.reason, **_export_ptq(spec, rows, choice)}


def verify_artifact(path: str, data_root: str = "") -> dict[str, Any]:
    """Check a file against its manifest: sha256, then top-1 and every prediction on the test images it names."""
    from compress.artifacts import read_manifest

    manifest = read_manifest(path)
    model = load_artifact(path)  # the sha256 check comes first
    spec = manifest.get("spec") or {}
    data = load_stored_data(spec, data_root)
    n = int(manifest.get("test_images") or len(data.test))
    batch_size = int(manifest.get("input", {}).get("batch_size") or 500)  # as the export measured it
    cpu = torch.device("cpu")
    with quiet():
        ev = evaluate(model, make_loader(data.test.subset(torch.arange(n)), batch_size, cpu), cpu,
                      keep_predictions=True, desc="verify")
    same = "predictions_sha256" not in manifest or _preds_sha(ev.predictions) == manifest["predictions_sha256"]
    ok = same and abs(ev.top1 - float(manifest["expected_top1"])) < 1e-9
    return {"path": str(path), "kind": manifest.get("kind"), "top1": ev.top1, "images": ev.images,
            "expected_top1": manifest["expected_top1"], "same_predictions": same, "ok": ok}

