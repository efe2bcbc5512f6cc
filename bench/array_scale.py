"""A 1,000-configuration PTQ sweep on SLURM: submit time, scheduler calls, wall time, rows exactly once.

    bash slurm/dev-cluster.sh start          # or SLURM_DEV_NODES=3 for the multi-node cluster
    COMPRESS_DATA=../shared/data COMPRESS_WEIGHTS=../shared/weights/resnet20-12fca82f.th \\
        .venv/bin/python bench/array_scale.py --partition debug --tasks-per-job 1

The sweep: 20 alphas (0.81..1.00) x 2 centers x 5 calibration sizes x 5 seeds of the calibration
subset = 1,000 configurations of the manual int8 path on the real weights, evaluated on the first
``--test-size`` test images. One task per (seed, calibration size) calibrates once and evaluates its
40 alpha/center variants, so 25 tasks; ``--tasks-per-job`` groups them into fewer array jobs.

Every call the launcher and ``status`` make to the scheduler (sbatch, sacct, squeue, scontrol, srun,
sinfo) goes through a logging shim on PATH in front of the real command, so the counts are measured,
not assumed. Prints the CPU, the figures, and whether every configuration has exactly one row.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from machine import cpu_line  # noqa: E402  (this folder: the script's own)

from jobs.cluster import partition_nodes  # noqa: E402

SCHEDULER = ("sbatch", "sacct", "squeue", "scontrol", "sinfo", "scancel", "srun")


def shim(folder: Path, log: Path) -> dict[str, str]:
    """Scripts named like the scheduler commands that log their name and run the real one."""
    folder.mkdir(parents=True, exist_ok=True)
    for cmd in SCHEDULER:
        real = shutil.which(cmd)
        if real is None:
            sys.exit(f"{cmd} not found: start the dev cluster (bash slurm/dev-cluster.sh start)")
        path = folder / cmd
        # the caller too: the jobs inherit this PATH, and their batch scripts' own srun calls are not counted
        path.write_text(f'#!/bin/sh\necho "{cmd} $(cat /proc/$PPID/comm)" >> {log}\nexec {real} "$@"\n')
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def calls(log: Path) -> collections.Counter:
    """Scheduler calls made by the launcher and ``status`` (Python), not by the jobs' batch scripts."""
    lines = log.read_text().splitlines() if log.exists() else []
    return collections.Counter(cmd for cmd, _, caller in (ln.partition(" ") for ln in lines)
                               if caller.startswith("python"))


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.launch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partition", default="debug")
    ap.add_argument("--tasks-per-job", type=int, default=1)
    ap.add_argument("--array-parallelism", type=int, default=16)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--work", default="", help="folder for jobs and results (default: a new one under ./bench-work)")
    a = ap.parse_args()
    root = REPO / "bench-work"  # on the shared filesystem every node sees (not /tmp)
    root.mkdir(exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="array-scale-", dir=root))
    log = work / "scheduler-calls.log"
    env = shim(work / "shim", log)
    print(subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Flags:")[0].strip())
    print(cpu_line())
    print("nodes:", partition_nodes(a.partition))

    args = ["ptq", "--partition", a.partition, "--folder", str(work / "jobs"), "--results", str(work / "results"),
            "--run-id", "scale", "--seeds", "0,1,2,3,4", "--methods", "manual", "--observers", "minmax",
            "--calib-sizes", "200,400,600,800,1000", "--alphas", "0.81:1.0:0.01", "--centers", "min,zero",
            "--test-size", str(a.test_size), "--tasks-per-job", str(a.tasks_per_job),
            "--array-parallelism", str(a.array_parallelism)]
    t0 = time.perf_counter()
    res = launch(env, *args)
    submit_s = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"submit failed: {res.stderr or res.stdout}")
    submit_calls = calls(log)
    watch = next(ln for ln in res.stdout.splitlines() if ln.startswith("watch:")).split()
    arrays = watch[watch.index("status") + 1:watch.index("--folder")]  # "watch: python -m jobs.launch status ID..."
    print(res.stdout.strip().splitlines()[-2])
    print(f"submit: {submit_s:.1f} s, scheduler calls {dict(submit_calls)}")

    while True:  # wait with squeue, once every 10 s (these calls are the waiting, not status)
        q = subprocess.run(["squeue", "-h", "-j", ",".join(arrays)], capture_output=True, text=True)
        if q.returncode != 0:
            sys.exit(f"squeue failed: {q.stderr.strip()}")
        if not q.stdout.strip():
            break
        time.sleep(10)
    wall = time.perf_counter() - t0
    before = calls(log)
    t1 = time.perf_counter()
    st = launch(env, "status", *arrays, "--folder", str(work / "jobs"), "--results", str(work / "results"),
                "--json")
    status_s = time.perf_counter() - t1
    status_calls = calls(log) - before
    print(f"wall (submit to the last job leaving the queue): {wall:.0f} s")
    print(f"status of {len(arrays)} array(s): {status_s:.1f} s, scheduler calls {dict(status_calls)}")

    import pyarrow.dataset as ds

    table = ds.dataset(work / "results" / "ptq", format="parquet").to_table(
        columns=["run_id", "calib_size", "alpha", "center", "job_id", "host"]).to_pandas()
    keys = table[["run_id", "calib_size", "alpha", "center"]]
    print(f"rows: {len(table)}, distinct configurations: {len(keys.drop_duplicates())}, "
          f"duplicated: {int(keys.duplicated().sum())}, jobs: {table['job_id'].nunique()}, "
          f"hosts: {dict(collections.Counter(table['host']))}")
    print("every configuration exactly once:", len(table) == 1000 and not keys.duplicated().any())
    objs = [json.loads(ln) for ln in st.stdout.splitlines() if ln.startswith("{")]
    jobs = [j for j in objs if j["type"] == "job"]
    print(f"status: {len(jobs)} jobs, {collections.Counter(j.get('state') for j in jobs)}")


if __name__ == "__main__":
    main()
