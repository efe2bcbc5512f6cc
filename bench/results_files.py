"""Thousands of small PTQ result files: ``report`` and a ``pyarrow.dataset`` read, before and after ``results compact``.

    COMPRESS_DATA=../shared/data .venv/bin/python bench/results_files.py --files 5000

Writes ``--files`` PTQ task files the way a large sweep leaves them (``ptq/<run_id>-<task>.parquet``,
``--rows`` rows each, through ``compress.results.write_rows`` with the ``jobs.tables.PTQ`` schema),
with the columns of a real row (``results/recipes/ptq``) and realistic predictions: the test labels
(``$COMPRESS_DATA``; else seeded random labels) with ~9.6% of the int8 and ~9.3% of the float model's
classes wrong. Then times, median of ``--repeats``:

- ``python -m jobs.launch report DIR --run ptq-sweep-s0`` (a fresh process each time, as a user runs
  it; every file is read, one run's sections drawn: the PTQ alpha section draws one panel per
  observer, calibration size and seed, thousands for the whole sweep, which is then what the time
  measures; ``--report-run ''`` for all; with $COMPRESS_DATA's test labels unless ``--no-labels``),
- ``pyarrow.dataset.dataset(DIR/ptq).to_table()`` and ``compress.results.read_table`` in this process,

runs ``python -m jobs.launch results compact --results DIR`` once, times the same again, and checks
that read_table gives the same rows before and after. Prints the CPU (``lscpu``) and the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compress.results import read_table, table_files, write_rows  # noqa: E402
from jobs import tables  # noqa: E402

KEYS = ["run_id", "task", "method", "weight_observer", "alpha"]


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache", "Flags")
    return "\n".join(line for line in out.splitlines() if line.split(":")[0].strip() in keep)


def labels() -> np.ndarray:
    if os.environ.get("COMPRESS_DATA"):
        from compress.data import load_test_labels

        return load_test_labels().astype(np.uint8)
    return np.random.default_rng(0).integers(0, 10, 10_000).astype(np.uint8)


def predictions(y: np.ndarray, wrong: float, rng: np.random.Generator) -> bytes:
    p = y.copy()
    flip = rng.random(len(y)) < wrong
    p[flip] = (p[flip] + rng.integers(1, 10, int(flip.sum()))) % 10
    return p.tobytes()


OBSERVERS = ("minmax", "histogram", "moving_average", "percentile")
CALIB_SIZES = (100, 1000, 5000, 10000, 25000)
TASKS_PER_RUN = len(OBSERVERS) * len(CALIB_SIZES)  # a run: one seed of the calibration subset (ptq --seeds)


def task_rows(i: int, rows: int, y: np.ndarray) -> tuple[str, list[dict]]:
    """Task ``i``'s rows: a real row's columns (ptq-gmp93-...-histogram-10000); seed, observer, size varied.

    20 tasks (4 observers x 5 calibration sizes) per run, one run per seed: 5,000 files = 250 seeds.
    """
    import datetime as dt

    rng = np.random.default_rng(i)
    run_id = f"ptq-sweep-s{i // TASKS_PER_RUN}"
    task = f"{OBSERVERS[i % len(OBSERVERS)]}-{CALIB_SIZES[(i // len(OBSERVERS)) % len(CALIB_SIZES)]}"
    base = {
        "run_id": run_id, "kind": "ptq", "task": task, "observer": task.split("-")[0], "engine": "x86",
        "activation_bits": 7, "calib_size": int(task.split("-")[1]), "float_top1": 90.34, "test_images": 10_000,
        "float_bytes": 1_084_416, "sparsity": 0.9299982111979012, "calib_seconds": 22.94 + rng.random(),
        "search_id": "", "trial_id": "", "spec_model": "resnet20a",
        "spec_weights": "results/runs/gmp93-c8x3f39-kd5-s0/final.pt", "spec_data_root": "/work/shared/data",
        "spec_results": "results", "spec_run_id": run_id, "spec_seed": i // TASKS_PER_RUN, "spec_device": "auto",
        "spec_methods": "fx,manual", "spec_observers": task.split("-")[0], "spec_weight_observers": "per_channel",
        "spec_engine": "x86", "spec_reduce_range": True, "spec_calib_sizes": task.split("-")[1],
        "spec_calib_selection": "random", "spec_calib_batch_size": 100, "spec_alphas": "1.0,0.99",
        "spec_centers": "min", "spec_test_size": 0, "spec_eval_batch_size": 500,
        "git_commit": "d1890204cd49940d9c5b5e2672d339c66e51fd5e", "git_dirty": False, "job_id": f"4242_{i}",
        "host": "node1", "python_version": "3.11.7", "torch_version": "2.14.1+cu130",
        "torchvision_version": "0.29.1+cu130", "device_name": "cpu",
        "written_at": dt.datetime(2026, 12, 2, 2, 20, 23, tzinfo=dt.UTC) + dt.timedelta(seconds=i),
        "float_predictions": predictions(y, 0.0966, rng),
    }
    variants = [("fx", None, None), ("manual", 1.0, "min"), ("manual", 0.99, "min"), ("manual", 0.98, "min")]
    out = []
    for method, alpha, center in (variants * (rows // len(variants) + 1))[:rows]:
        out.append({**base, "method": method, "weight_observer": "per_channel", "alpha": alpha, "center": center,
                    "int8_top1": round(90.17 + rng.normal(0, 0.1), 2), "int8_bytes": 276_976,
                    "int8_packed_bytes": 44_167, "int8_sparsity": 0.9300801979607656,
                    "convert_seconds": 0.032, "eval_seconds": 1.92 + rng.random() / 10,
                    "predictions": predictions(y, 0.0983, rng)})
    return f"{run_id}-{task}", out


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def launch(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "jobs.launch", *args], cwd=REPO, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"jobs.launch {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


def measure(root: Path, repeats: int, env: dict[str, str], run: str) -> dict[str, float]:
    folder = root / "ptq"
    only = ["--run", run] if run else []
    return {
        "report (CLI, fresh process)": median_seconds(
            lambda: launch("report", str(root), "--out", str(root.parent / "report-out"), *only, env=env), repeats),
        "pyarrow.dataset(ptq).to_table()": median_seconds(
            lambda: ds.dataset(folder, format="parquet").to_table(), repeats),
        "compress.results.read_table": median_seconds(lambda: read_table(root, "ptq"), repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rows", type=int, default=3, help="rows per task file (a real task: fx + 2 alphas = 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-labels", action="store_true",
                    help="report without the test labels of $COMPRESS_DATA (no intervals and p-values)")
    ap.add_argument("--report-run", default="ptq-sweep-s0",
                    help="report --run: every file is read, one run's sections drawn (the PTQ alpha section "
                         "draws a panel per observer, size and seed: thousands for the whole sweep); '': all")
    ap.add_argument("--work", default=str(REPO / "bench-work" / "results-files"))
    ap.add_argument("--keep", action="store_true", help="keep the generated results folder")
    args = ap.parse_args()

    print(cpu())
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    root = work / "results"
    y = labels()
    t0 = time.perf_counter()
    for i in range(args.files):
        name, rows = task_rows(i, args.rows, y)
        write_rows(root / "ptq" / f"{name}.parquet", rows, tables.PTQ)
    files = table_files(root / "ptq")
    size = sum(f.stat().st_size for f in files)
    print(f"\nwrote {len(files):,} files, {args.files * args.rows:,} rows, {size / 1e6:.1f} MB in "
          f"{time.perf_counter() - t0:.1f} s ({size / len(files) / 1e3:.1f} kB a file)")

    env = {k: v for k, v in os.environ.items() if k != "COMPRESS_DATA" or not args.no_labels}
    env["PYTHONPATH"] = str(REPO)
    before_rows = read_table(root, "ptq").sort_by([(k, "ascending") for k in KEYS])
    before = measure(root, args.repeats, env, args.report_run)

    t0 = time.perf_counter()
    compact_out = launch("results", "compact", "--results", str(root), env=env)
    compact_seconds = time.perf_counter() - t0
    print(f"\n$ python -m jobs.launch results compact --results {root}\n{compact_out.rstrip()}"
          f"\n(the command: {compact_seconds:.1f} s with interpreter start)")

    after_rows = read_table(root, "ptq").sort_by([(k, "ascending") for k in KEYS])
    after = measure(root, args.repeats, env, args.report_run)
    same = before_rows.equals(after_rows.select(before_rows.column_names).cast(before_rows.schema))
    files_after = table_files(root / "ptq")
    print(f"\nmedian of {args.repeats} (s)   {len(files):>6,} files   {len(files_after):>6,} file(s)   speed-up")
    for k in before:
        print(f"  {k:<32} {before[k]:>10.2f}   {after[k]:>10.2f}   {before[k] / after[k]:>7.1f}x")
    print(f"\nrows before == rows after (sorted): {same} ({after_rows.num_rows:,} rows, "
          f"{sum(f.stat().st_size for f in files_after) / 1e6:.1f} MB after)")
    labelled = "COMPRESS_DATA" in env
    print(f"report: {'--run ' + args.report_run if args.report_run else 'every run'} (all files read), "
          f"{'with' if labelled else 'without'} the test labels (intervals and p-values "
          f"{'on' if labelled else 'off'})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if not same:
        sys.exit("rows differ after compaction")


if __name__ == "__main__":
    pa.set_cpu_count(os.cpu_count() or 1)
    main()
