"""Submit-to-running and submit-to-result times of SLURM jobs sent through the project's executor.

    bash slurm/dev-cluster.sh start
    .venv/bin/python bench/slurm_latency.py --partition debug --repeats 3

Two kinds of job, each submitted ``--repeats`` times one after another:

- trivial: a function that returns at once (the cost of SLURM + submitit + a Python start);
- tiny prune: ``run_prune`` for 1 phase of 1 epoch on a synthetic CIFAR-10 of 250 training and 100
  test images (adds importing torch, loading data and weights, a few batches, the Parquet writes).

submit-to-running: from ``submit()`` to the job's first line in its log (submitit's "Starting with");
submit-to-result: from ``submit()`` to its result pickle on disk (polled every 50 ms, which is
sooner than ``job.result()`` notices: submitit polls once a second). Prints each repeat and the medians.

Before those, what the check that a node sees ``--folder`` and ``--results`` adds to building the
executor (``build_executor``, each ``--repeats`` times with new folders): with the check on new
folders (one ``srun`` step), on folders a node already saw (remembered, no step), and without it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_line  # noqa: E402  (this folder: the script's own)

from jobs.cluster import partition_nodes  # noqa: E402
from jobs.executors import build_executor  # noqa: E402
from jobs.specs import PruneSpec  # noqa: E402
from jobs.training import run_prune  # noqa: E402

STARTED = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\) - Starting with")


def trivial() -> float:
    """The job: nothing but report when it ran."""
    return time.time()


def synthetic_root(folder: Path) -> tuple[Path, Path]:
    """A 250/100-image CIFAR-10 in the binary layout and seeded starting weights (as the tests build them)."""
    import torch

    from compress.models import build_model
    from tests.conftest import synthetic_records, write_bin_file

    bins = folder / "cifar-10-batches-bin"
    bins.mkdir(parents=True)
    for i in range(1, 6):
        write_bin_file(bins / f"data_batch_{i}.bin", *synthetic_records(50, seed=i))
    write_bin_file(bins / "test_batch.bin", *synthetic_records(100, seed=0))
    torch.manual_seed(0)
    torch.save(build_model("resnet20a").state_dict(), folder / "weights.pt")
    return folder, folder / "weights.pt"


def measure(ex: Any, fn: Any, *args: Any) -> tuple[float, float]:
    """(submit-to-running, submit-to-result) seconds of one job."""
    t0 = time.time()
    job = ex.submit(fn, *args)
    while not job.paths.result_pickle.exists():
        time.sleep(0.05)
    t_result = time.time() - t0
    log = job.paths.stdout.read_text()
    m = STARTED.search(log)
    if not m:
        raise RuntimeError(f"no start line in {job.paths.stdout}")
    started = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    job.result()  # raises if the job failed
    return started - t0, t_result


def executor_seconds(partition: str, folder: Path, results: Path, check_nodes: bool) -> float:
    t0 = time.perf_counter()
    build_executor(partition=partition, folder=str(folder), time="10", check_nodes=check_nodes,
                   shared=[str(results)])
    return time.perf_counter() - t0


def node_check(partition: str, work: Path, repeats: int) -> None:
    """Seconds ``build_executor`` takes with the node check (new folders, remembered) and without it."""
    figures: dict[str, list[float]] = {"check, new folders": [], "check, remembered": [], "no check": []}
    for i in range(repeats):
        jobs, results = work / f"check-{i}" / "jobs", work / f"check-{i}" / "results"
        figures["check, new folders"].append(executor_seconds(partition, jobs, results, True))
        figures["check, remembered"].append(executor_seconds(partition, jobs, results, True))
        figures["no check"].append(executor_seconds(partition, work / f"plain-{i}", results, False))
    for name, runs in figures.items():
        print(f"build_executor, {name:18s}: median {statistics.median(runs):5.2f} s "
              f"({', '.join(f'{r:.2f}' for r in runs)})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partition", default="debug")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="slurm-latency-", dir=Path.cwd()) as tmp:
        work = Path(tmp)
        print(cpu_line(), "| cores:", os.cpu_count())
        print("nodes:", partition_nodes(args.partition))
        node_check(args.partition, work, args.repeats)
        data, weights = synthetic_root(work / "data")
        ex = build_executor(partition=args.partition, folder=str(work / "jobs"), time="10")
        figures: dict[str, list[tuple[float, float]]] = {"trivial": [], "tiny prune": []}
        for i in range(args.repeats):
            figures["trivial"].append(measure(ex, trivial))
            spec = PruneSpec(data_root=str(data), weights=str(weights), results=str(work / "results"),
                             run_id=f"latency-{i}", phases=1, epochs=1, test_size=100, batch_size=50,
                             randaugment=False)
            figures["tiny prune"].append(measure(ex, run_prune, spec))
            for name, runs in figures.items():
                print(f"repeat {i + 1} {name:10s}: submit-to-running {runs[-1][0]:5.2f} s, "
                      f"submit-to-result {runs[-1][1]:5.2f} s", flush=True)
        print(f"medians over {args.repeats} repeats (partition {args.partition}):")
        for name, runs in figures.items():
            print(f"  {name:10s}: submit-to-running {statistics.median(r[0] for r in runs):5.2f} s, "
                  f"submit-to-result {statistics.median(r[1] for r in runs):5.2f} s")


if __name__ == "__main__":
    main()
