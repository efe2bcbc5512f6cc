"""Faults a shared cluster throws at a run, injected for real, and what each leaves in the results.

    bash slurm/dev-cluster.sh start
    COMPRESS_DATA=../shared/data COMPRESS_WEIGHTS=../shared/weights/resnet20-12fca82f.th \
        python bench/faults.py --work /tmp/faults            # ~10 min on a 2-core machine

Every scenario runs a short prune (real CIFAR-10, a 500-image training subset, 2 phases of 4
epochs) through the command line as a user would, injects its fault while the run is inside a
phase, recovers the way the tool says to (nothing, or ``--resume``), and prints one table line:
the rows expected (one per phase and per epoch), found, duplicated, lost, rows whose spec is not
the run's (mixed), and the state ``status`` shows at the end. The SLURM scenarios need the dev
cluster (or any cluster with a ``debug`` partition and accounting); the file-system ones mount
tmpfs filesystems and need root; the Ray ones run a local search.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parent.parent
PHASES, EPOCHS = 2, 4


def launch(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "jobs.launch", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=1800)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])}... exited {p.returncode}: {p.stderr.strip()[-500:]}")
    return p


def prune_args(results: Path, run_id: str, *extra: str) -> list[str]:
    return ["prune", "--results", str(results), "--run-id", run_id, "--phases", str(PHASES), "--epochs", str(EPOCHS),
            "--final-sparsity", "0.5", "--train-size", "500", "--test-size", "200", "--batch-size", "50",
            "--eval-batch-size", "200", "--no-randaugment", *extra]


def wait_until(what: str, cond: Callable[[], object], timeout: float = 600, every: float = 0.2) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


def progress(results: Path, run_id: str) -> dict:
    try:
        return json.loads((results / "runs" / run_id / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def mid_phase(results: Path, run_id: str) -> Callable[[], bool]:
    """The run is inside a phase: phase >= 1 and 1 <= epoch < epochs (so a fault costs some work)."""
    def inside() -> bool:
        p = progress(results, run_id)
        return bool(p) and p.get("phase", 0) >= 1 and 1 <= p.get("epoch", 0) < p.get("epochs", 0)
    return inside


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                         text=True).stdout
    states = [ln.split("|")[1].split()[0] for ln in out.splitlines() if ln.split("|")[0] == job_id]
    return states[-1] if states else ""


def wait_job(job_id: str) -> str:
    return str(wait_until(f"job {job_id} to end", lambda: (lambda s: s if s and s not in (
        "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED") else None)(
        sacct_state(job_id)), 900, 1.0))


def job_python(job_id: str) -> int:
    out = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True).stdout
    for line in out.splitlines()[1:]:
        pid = line.split()[0]
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"submitit.core._submit" in argv and Path(argv[0].decode()).name.startswith("python"):
                return int(pid)
    raise RuntimeError(f"no Python process in job {job_id}")


def submitted(p: subprocess.CompletedProcess) -> list[str]:
    return [ln.split("submitted job ", 1)[1].split(":", 1)[0] for ln in p.stdout.splitlines()
            if ln.startswith("submitted job ")]


def count_rows(results: Path, run_ids: list[str], phases: int = PHASES, epochs: int = EPOCHS) -> dict[str, int]:
    """Expected, found, duplicated, lost and mixed rows of the phases and epochs tables for these runs."""
    out = dict(expected=0, found=0, duplicated=0, lost=0, mixed=0)
    for table, keys in (("phases", ["phase"]), ("epochs", ["phase", "epoch"])):
        if not (results / table).exists():
            rows = []
        else:
            rows = ds.dataset(results / table, format="parquet").to_table().to_pylist()
        for run_id in run_ids:
            mine = [r for r in rows if r["run_id"] == run_id]
            want = ({(p,) for p in range(phases + 1)} if table == "phases" else
                    {(p, e) for p in range(1, phases + 1) for e in range(1, epochs + 1)})
            got = [tuple(r[k] for k in keys) for r in mine]
            spec = json.loads((results / "runs" / run_id / "spec.json").read_text())
            out["expected"] += len(want)
            out["found"] += len(got)
            out["duplicated"] += len(got) - len(set(got))
            out["lost"] += len(want - set(got))
            out["mixed"] += sum(any(r.get(f"spec_{k}") != (",".join(map(str, v)) if isinstance(v, list) else v)
                                    for k, v in spec.items() if k != "results" and f"spec_{k}" in r) for r in mine)
    return out


def status_state(results: Path, run_id: str) -> str:
    p = launch("status", run_id, "--results", str(results), "--json", check=False)
    states = [json.loads(ln)["state"] for ln in p.stdout.splitlines() if ln.strip()]
    return ",".join(states) or f"? ({p.stderr.strip()})"


# --- scenarios: each returns (run ids to count, extra note) ---------------------------------------

def slurm(results: Path, folder: Path) -> list[str]:
    return ["--partition", "debug", "--folder", str(folder)]


def s_requeue(results: Path, folder: Path) -> tuple[list[str], str]:
    (job,) = submitted(launch(*prune_args(results, "requeue"), *slurm(results, folder)))
    wait_until("mid-phase", mid_phase(results, "requeue"))
    subprocess.run(["scontrol", "requeue", job], check=True)
    return ["requeue"], f"job {job} {wait_job(job)}"


def s_preempt(results: Path, folder: Path) -> tuple[list[str], str]:
    import submitit

    (job,) = submitted(launch(*prune_args(results, "preempt"), *slurm(results, folder)))
    wait_until("mid-phase", mid_phase(results, "preempt"))
    submitit.SlurmJob(folder=folder / "%j", job_id=job)._interrupt()  # SIGTERM, then USR2: as on preemption
    return ["preempt"], f"job {job} {wait_job(job)}"


def s_kill9(results: Path, folder: Path) -> tuple[list[str], str]:
    (job,) = submitted(launch(*prune_args(results, "kill9"), *slurm(results, folder)))
    wait_until("mid-phase", mid_phase(results, "kill9"))
    os.kill(job_python(job), signal.SIGKILL)
    first = wait_job(job)
    (again,) = submitted(launch("prune", "--resume", "kill9", "--results", str(results), *slurm(results, folder)))
    return ["kill9"], f"job {job} {first}, --resume job {again} {wait_job(again)}"


def s_scancel(results: Path, folder: Path) -> tuple[list[str], str]:
    (job,) = submitted(launch(*prune_args(results, "scancel"), *slurm(results, folder)))
    wait_until("mid-phase", mid_phase(results, "scancel"))
    subprocess.run(["scancel", job], check=True)
    first = wait_job(job)
    wait_until("the cancelled job's processes to go", lambda: job not in subprocess.run(
        ["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout, 60, 0.5)
    (again,) = submitted(launch("prune", "--resume", "scancel", "--results", str(results), *slurm(results, folder)))
    return ["scancel"], f"job {job} {first}, --resume job {again} {wait_job(again)}"


def s_array_task(results: Path, folder: Path) -> tuple[list[str], str]:
    jobs = submitted(launch(*prune_args(results, "arr", "--seeds", "0,1,2"), "--array-parallelism", "3",
                            *slurm(results, folder)))
    task = jobs[1]
    wait_until("mid-phase", mid_phase(results, "arr-s1"))
    subprocess.run(["scancel", task], check=True)
    ends = [wait_job(j) for j in jobs]
    (again,) = submitted(launch("prune", "--resume", "arr-s1", "--results", str(results), *slurm(results, folder)))
    return ["arr-s0", "arr-s1", "arr-s2"], f"tasks {'/'.join(ends)}, --resume arr-s1 {wait_job(again)}"


def s_two_submissions(results: Path, folder: Path) -> tuple[list[str], str]:
    args = [*prune_args(results, "twice"), *slurm(results, folder)]
    (job,) = submitted(launch(*args))
    second = launch(*args, check=False)
    other = launch(*args[:-4], "--seed", "5", *slurm(results, folder), check=False)
    return ["twice"], (f"job {job} {wait_job(job)}; same spec: exit {second.returncode}, another spec: exit "
                       f"{other.returncode} ({other.stderr.strip()[:60]}...)")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _local_run(results: Path, run_id: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.launch", *prune_args(results, run_id)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def s_read_only(results: Path, folder: Path) -> tuple:
    with tmpfs(results.parent / "ro-mnt", "64m") as mnt:
        res = mnt / "results"
        p = _local_run(res, "readonly")
        wait_until("mid-phase", mid_phase(res, "readonly"))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        _, err = p.communicate(timeout=600)
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        launch("prune", "--resume", "readonly", "--results", str(res))
        counts = count_rows(res, ["readonly"])
        shutil.copytree(res, results, dirs_exist_ok=True)
    return ["readonly"], f"run exit {p.returncode}: {err.strip().splitlines()[-1][:70]}...; --resume ok", counts


def s_full_disk(results: Path, folder: Path) -> tuple:
    with tmpfs(results.parent / "full-mnt", "40m") as mnt:
        res = mnt / "results"
        p = _local_run(res, "fulldisk")
        wait_until("mid-phase", mid_phase(res, "fulldisk"))
        with open(mnt / "filler", "wb") as f, contextlib.suppress(OSError):  # another job takes the space
            while True:
                f.write(b"\0" * 2**20)
        _, err = p.communicate(timeout=600)
        (mnt / "filler").unlink()
        launch("prune", "--resume", "fulldisk", "--results", str(res))
        counts = count_rows(res, ["fulldisk"])
        shutil.copytree(res, results, dirs_exist_ok=True)
    return ["fulldisk"], f"run exit {p.returncode}: {err.strip().splitlines()[-1][:70]}...; --resume ok", counts


def _search(results: Path, search_id: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.launch", "tune", "prune", "--results", str(results), "--phases", str(PHASES),
            "--epochs", str(EPOCHS), "--final-sparsity", "0.5", "--train-size", "500", "--test-size", "200",
            "--batch-size", "50", "--eval-batch-size", "200", "--no-randaugment", "--space", "lr=grid:0.001,0.002",
            "--searcher", "grid", "--scheduler", "fifo", "--num-samples", "1", "--max-concurrent", "2",
            "--search-id", search_id, *extra]


def _trial_runs(results: Path, search_id: str) -> list[str]:
    return sorted(d.name for d in (results / "runs").glob(f"{search_id}-*"))


def s_ray_driver(results: Path, folder: Path) -> tuple[list[str], str]:
    p = subprocess.Popen(_search(results, "driver"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until("both trials mid-phase", lambda: len(_trial_runs(results, "driver")) == 2 and all(
        mid_phase(results, r)() for r in _trial_runs(results, "driver")))
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(2)
    again = subprocess.run(_search(results, "driver", "--resume"), cwd=REPO, capture_output=True, text=True)
    lines = [ln.strip() for ln in again.stdout.splitlines() if ln.startswith("  ")]
    return _trial_runs(results, "driver"), f"--resume exit {again.returncode}: {'; '.join(lines)[:110]}"


def s_ray_trial(results: Path, folder: Path) -> tuple[list[str], str]:
    p = subprocess.Popen(_search(results, "trial"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    wait_until("both trials mid-phase", lambda: len(_trial_runs(results, "trial")) == 2 and all(
        mid_phase(results, r)() for r in _trial_runs(results, "trial")))
    victim = json.loads((results / "runs" / _trial_runs(results, "trial")[0] / "lease.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)  # the Ray worker process running that trial
    out, _ = p.communicate(timeout=900)
    failed = [ln.strip() for ln in out.splitlines() if "failed" in ln]
    again = subprocess.run(_search(results, "trial", "--resume"), cwd=REPO, capture_output=True, text=True)
    lines = [ln.strip() for ln in again.stdout.splitlines() if ln.startswith("  ")]
    return _trial_runs(results, "trial"), (f"first: {len(failed)} trial failed; --resume exit {again.returncode}: "
                                           f"{'; '.join(lines)[:90]}")


SCENARIOS = {
    "requeue (scontrol requeue)": s_requeue,
    "preemption (SIGTERM+USR2)": s_preempt,
    "kill -9 of the job, --resume": s_kill9,
    "scancel, --resume": s_scancel,
    "one array task cancelled, --resume": s_array_task,
    "two submissions, one run id": s_two_submissions,
    "results made read-only, --resume": s_read_only,
    "full disk, --resume": s_full_disk,
    "Ray driver kill -9, tune --resume": s_ray_driver,
    "Ray trial worker kill -9, tune --resume": s_ray_trial,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/faults", help="a fresh folder for results and job folders")
    ap.add_argument("--only", default="", help="comma-separated scenario name prefixes")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    results, folder = work / "results", work / "jobs"
    header = ("fault", "expected", "found", "duplicated", "lost", "mixed", "status", "what happened")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, fn in SCENARIOS.items():
        if a.only and not any(name.startswith(o) for o in a.only.split(",")):
            continue
        t0 = time.perf_counter()
        try:
            out = fn(results, folder)
        except Exception as e:  # a scenario that breaks is a line of the table too
            print(f"{name} | - | - | - | - | - | - | FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        runs, note = out[0], out[1]
        counts = out[2] if len(out) > 2 else count_rows(results, runs)
        states = ",".join(sorted({status_state(results, r) for r in runs}))
        print(f"{name} | {counts['expected']} | {counts['found']} | {counts['duplicated']} | {counts['lost']} | "
              f"{counts['mixed']} | {states} | {note} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
