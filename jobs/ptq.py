"""The PTQ job: calibrate once per (model, observer, calibration size), quantize every variant, write Parquet.

    python -m jobs.launch ptq --weights W --data-root D --methods fx,manual \\
        --observers minmax,histogram,moving_average --calib-sizes 100,1000,5000,10000,25000,50000
    python -m jobs.launch ptq --weights W --data-root D --methods manual \\
        --calib-sizes 10000 --alphas 0.95:1.0:0.01 --centers min,zero          # 12 variants, 1 calibration

A sweep (``PTQSpec``) is a grid: methods x observers x weight observers x calibration sizes x
alphas x centers. ``plan_tasks`` cuts it into tasks, one per (observer, calibration size): one SLURM
array task each, or one after another in this process. ``run_ptq`` runs one task: it calibrates
once (per method), derives every weight-scheme / alpha / center variant from those statistics,
evaluates each int8 model, and writes the task's rows to ``<results>/ptq/<run_id>-<task>.parquet``
in one atomic write. A task whose file already holds its rows returns them without running again.

Methods are the backends of ``compress.quant.backends``: ``manual`` (the hand-written path: own
statistics, pure qparams, a q/dq int8 model), ``fx`` (FX graph mode's observers, deprecated
upstream; a built-in ResNet gets the same q/dq model with FX's qparams) and ``pt2e`` (torchao's
``torch.export`` flow with the x86 inductor quantizer). Alphas and centers shrink the activation
ranges of the manual path; FX and PT2E rows use their observers' own qparams and have no
alpha/center (null). A combination a backend cannot express (alphas without ``manual``, per-tensor
weights or qnnpack with ``pt2e``) is refused.

Sizes are measured on the files every shipped row has: ``program_bytes`` is the length of its
``.pt2`` (``torch.export.save``), ``int8_packed_bytes`` that of its ``.pt2pack`` (sparse weights,
no graph metadata; ``compress.quant.packed.pack_program``), ``int8_bytes`` the program's tensors
dense. The rows keep no model; ``python -m jobs.launch export`` rebuilds a chosen row and writes
its files. Each row keeps the predicted class of every test image (uint8 bytes, test-set order) of
its int8 model (``predictions``) and of the float model (``float_predictions``), so the report can
test int8 against float image by image.

Where it runs: loading, calibration and the float evaluation on ``spec.device`` (CUDA when the
job has one, else the CPU, float32); building/converting and evaluating the int8 models on the CPU,
with the quantized engine of ``spec.engine``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compress import registry
from compress.data import subset_indices
from compress.datasets import make_loader
from compress.loops import evaluate, pick_device
from compress.prune import global_sparsity
from compress.quant import quiet
from compress.quant.backends import BACKENDS
from compress.quant.pt2e import program_bytes  # noqa: F401  (jobs.export and benches import it here)
from compress.results import read_unit, write_rows
from jobs import tables
from jobs.inputs import load_run_data, load_run_model, preflight
from jobs.runs import SpecMismatch, require_run_id, row_base, same_spec_row
from jobs.specs import METHODS, PTQSpec
from jobs.text import table

log = logging.getLogger(__name__)

def plan_tasks(spec: PTQSpec) -> list[PTQSpec]:
    """One spec per (observer, calibration size), all other lists kept: the units of a job array."""
    return [dataclasses.replace(spec, observers=(obs,), calib_sizes=(n,))
            for obs in spec.observers for n in spec.calib_sizes]


def _done_rows(path: Path, spec: PTQSpec) -> list[dict[str, Any]] | None:
    """The rows of a task already written by the same spec (a requeued array task); None if absent.

    Found in the task's file, or in the compact file that merged it (``compress.compact``).
    """
    written = read_unit(path)
    if written is None:
        return None
    rows = written.to_pylist()
    diff = same_spec_row(rows[0], spec) if rows else "no rows"
    if diff:
        raise SpecMismatch(f"{path} holds PTQ results of another spec ({diff}); choose another --run-id")
    return rows


def _summary(spec: PTQSpec, path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    keep = ("method", "observer", "weight_observer", "calib_size", "alpha", "center", "float_top1", "int8_top1",
            "float_bytes", "int8_bytes", "int8_packed_bytes", "program_bytes", "sparsity", "calib_seconds",
            "eval_seconds")
    return {"run_id": spec.run_id, "task": spec.task_name(), "path": str(path),
            "rows": [{k: r[k] for k in keep} for r in rows]}


def run_ptq(spec: PTQSpec, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one task of a PTQ sweep (see the module docstring); returns its rows in short.

    Module-level and picklable: the same call runs here, in a SLURM array task and in a Ray trial;
    ``tags`` (``search_id``, ``trial_id``) are added to every row.
    """
    require_run_id(spec)
    path = spec.task_file()
    done = _done_rows(path, spec)
    if done is not None:
        log.info("task %s of %s already written: %s", spec.task_name(), spec.run_id, path)
        return _summary(spec, path, done)
    with quiet():
        rows = [{**r, **(tags or {})} for r in _quantize_all(spec)]
    write_rows(path, rows, tables.PTQ)
    log.info("task %s: %d rows -> %s", spec.task_name(), len(rows), path)
    return _summary(spec, path, rows)


def _quantize_all(spec: PTQSpec, keep: Callable[[dict[str, Any], Any], None] | None = None) -> list[dict[str, Any]]:
    """Every row of one task; ``keep(row, built)`` sees each built model (the export job writes its files)."""
    from compress.quant.int8 import effective_reduce_range, set_engine
    from compress.quant.size import float_bytes, program_size

    set_engine(spec.engine)
    device = pick_device(spec.device)
    cpu = torch.device("cpu")
    observer, n_calib = spec.observers[0], spec.calib_sizes[0]
    reduce = effective_reduce_range(spec.engine, spec.reduce_range)

    torch.manual_seed(spec.seed)
    data = load_run_data(spec)
    model = load_run_model(spec, data).eval()
    preflight(spec, data, model, trace=False)
    idx = subset_indices(len(data.train), n_calib, spec.seed, spec.calib_selection)
    calib = make_loader(data.train.subset(idx), spec.calib_batch_size, device)
    n_test = spec.test_size or len(data.test)
    test = data.test.subset(torch.arange(n_test)) if n_test < len(data.test) else data.test
    float_ev = evaluate(model.to(device), make_loader(test, spec.eval_batch_size, device), device,
                        desc="float eval", keep_predictions=True)
    model.cpu()
    test_cpu = make_loader(test, spec.eval_batch_size, cpu)
    base = {**row_base(spec, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            **data.describe(), **registry.describe(model, spec.model, spec.model_args),
            "task": spec.task_name(), "observer": observer, "engine": spec.engine,
            "activation_bits": 7 if reduce else 8, "calib_size": n_calib, "float_top1": float_ev.top1,
            "test_images": float_ev.images, "float_bytes": float_bytes(model), "sparsity": global_sparsity(model),
            "float_predictions": float_ev.predictions.numpy().tobytes()}
    log.info("task %s: float top-1 %.2f%% on %d test images (%s), sparsity %.4f", spec.task_name(),
             float_ev.top1, float_ev.images, device, base["sparsity"])
    rows: list[dict[str, Any]] = []
    for method in (m for m in METHODS if m in spec.methods):
        backend = BACKENDS[method]
        cal = backend.calibrate(model, calib, device, observer, reduce, spec.engine, spec.weight_observers)
        for variant in backend.variants(spec.weight_observers, spec.alphas, spec.centers):
            built = backend.build(cal, variant)
            ev = evaluate(built.model, test_cpu, cpu, desc="int8 eval", keep_predictions=True)
            sizes: dict[str, Any] = {"int8_bytes": None, "int8_packed_bytes": None, "int8_sparsity": None,
                                     "program_bytes": None}
            if built.program is not None:
                dense = program_size(built.program())
                sizes.update(int8_bytes=dense.dense, int8_packed_bytes=len(built.packed()),
                             int8_sparsity=dense.sparsity, program_bytes=len(built.pt2()))
            row = {**base, "method": method, "weight_observer": variant.weight_observer, "alpha": variant.alpha,
                   "center": variant.center, "int8_top1": ev.top1, **sizes, "calib_seconds": cal.seconds,
                   "convert_seconds": built.seconds, "eval_seconds": ev.seconds,
                   "predictions": ev.predictions.numpy().tobytes()}
            rows.append(row)
            log.info("%s %s %s alpha %s center %s: int8 top-1 %.2f%% (float %.2f%%)", method, observer,
                     variant.weight_observer, variant.alpha, variant.center, ev.top1, float_ev.top1)
            if keep is not None:
                keep(row, built)
    return rows


def run_ptq_tasks(specs: list[PTQSpec]) -> list[dict[str, Any]]:
    """Several tasks one after another: one array job of a large sweep (``--tasks-per-job``).

    Each task writes its own file as it finishes, so a requeued job skips the ones already written.
    """
    return [run_ptq(s) for s in specs]


def run_ptq_sweep(spec: PTQSpec, report: Callable[[dict[str, Any]], None] | None = None,
                  tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Every task of ``spec`` in this process, then ``report`` of the best int8 row (a Ray trial's result)."""
    rows = [r for task in plan_tasks(spec) for r in run_ptq(task, tags)["rows"]]
    best = max(rows, key=lambda r: r["int8_top1"])
    if report is not None:
        report({k: v for k, v in best.items() if v is not None})
    return {"run_id": spec.run_id, "rows": rows, "best": best}


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1000:.1f}"


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows of one or more tasks as a fixed-width table, as the ``ptq`` command prints them."""
    head = ("method", "observer", "weights", "calib", "alpha", "center", "float", "int8", "delta", "int8 KB",
            "packed KB", ".pt2 KB", "calib s", "eval s")
    body = [(r["method"], r["observer"], r["weight_observer"], str(r["calib_size"]),
             "-" if r["alpha"] is None else f"{r['alpha']:g}", r["center"] or "-", f"{r['float_top1']:.2f}",
             f"{r['int8_top1']:.2f}", f"{r['int8_top1'] - r['float_top1']:+.2f}", _kb(r.get("int8_bytes")),
             _kb(r.get("int8_packed_bytes")), _kb(r.get("program_bytes")), f"{r['calib_seconds']:.1f}",
             f"{r['eval_seconds']:.1f}") for r in rows]
    return table([head, *body], right={3, 4, *range(6, 14)}, rule=True)
