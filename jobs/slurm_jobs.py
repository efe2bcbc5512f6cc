"""The SLURM side of a job: the requeueable wrapper it runs in, and what ``status`` shows about it.

    python -m jobs.launch status                      # every job under --folder (slurm-jobs/), newest first
    python -m jobs.launch status 1234 1240_3          # by job id (array tasks as <array>_<task>)
    python -m jobs.launch status slurm-jobs/1234      # by job folder

Preemption and timeouts: SLURM sends USR2 ``--signal-delay`` seconds before the time limit, and a
preemption (or ``job._interrupt()``) sends SIGTERM then USR2. submitit ignores the SIGTERM, and on
USR2 calls ``Requeueable.checkpoint``, which resubmits the same function with the same spec, then
requeues the job (``scontrol requeue``). The job function keeps its own checkpoint: the train/prune
job saves model, masks, optimizer, LR schedule and position (phase, epoch, the phase's epoch rows)
atomically after every epoch (``jobs/training.py``), so the requeued job loses at most the epoch in
flight and redoes it with the same batches: data order and augmentation are a pure function of
(seed, phase, epoch), and nothing else draws from torch's global RNG after the model is built
(no dropout in ResNet-20; RandAugment is seeded from the loader's generator), so no RNG state needs
saving. Rows go out once per phase under fixed file names, written atomically: a requeue neither
loses nor duplicates them.

A cancelled (``scancel``) or failed run keeps the rows of the phases it finished (each complete)
and has no row of the phase in flight, no ``modules`` row and no ``runs/<run_id>/summary.json``;
``finished_runs`` lists the runs that did finish, for analyses that want only those.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from compress.results import PROGRESS, SUMMARY, run_folder, run_folders
from jobs.runs import inspect_run, search_progress
from jobs.text import error_line, table

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^\d+(_\d+)?$")
# SLURM job states that end a job without a result, and those of them that are errors worth showing
STOPPED = {"CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
FAILED = STOPPED - {"CANCELLED"}
PROJECT_LOGGERS = ("compress", "jobs", "sweeps")


def setup_logging(stream: Any = None, level: int = logging.INFO) -> None:
    """The project's log lines (``compress``, ``jobs``, ``sweeps``) to ``stream``, one format, set up once.

    The launcher sends them to stderr (stdout is for results); a SLURM job to its log (stdout, which
    submitit configures only for its own logger); libraries' loggers are left as they are.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in PROJECT_LOGGERS:
        lg = logging.getLogger(name)
        if not lg.handlers:
            lg.addHandler(handler)
        lg.setLevel(level)


class Requeueable(submitit.helpers.Checkpointable):
    """Runs ``fn(*args)`` in a SLURM job; on preemption or timeout requeues it with the same arguments.

    ``fn`` must resume from its own checkpoint when called again with the same arguments (the
    train/prune job does; a PTQ task is short and simply runs again).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        # kept by name ("module:qualname") when it has one, so that reading the job's pickle (``status``
        # does, for every job it shows) imports neither the job's module nor torch (~7 s a status call);
        # a function without an importable name (a closure) is kept as it is
        # a function of the launching script (``__main__``) is kept too: in the job, __main__ is submitit's
        qualname = getattr(fn, "__qualname__", "<none>")  # e.g. a functools.partial has none
        by_value = "<" in qualname or getattr(fn, "__module__", "__main__") == "__main__"
        self.fn: str | Callable[..., Any] = fn if by_value else f"{fn.__module__}:{qualname}"

    def function(self) -> Callable[..., Any]:
        """The wrapped function (imported now when kept by name)."""
        if callable(self.fn):
            return self.fn
        module, _, qualname = self.fn.partition(":")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def __repr__(self) -> str:
        fn = self.fn
        name = fn.replace(":", ".") if isinstance(fn, str) else f"{fn.__module__}.{getattr(fn, '__qualname__', fn)}"
        return f"Requeueable({name})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # set by the sbatch script: a job of its own
            setup_logging(sys.stdout)
        fn = self.function()
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)
        torch = sys.modules.get("torch")  # imported with the job function, if it needs it
        where = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
        if torch is not None:
            if cpus:
                torch.set_num_threads(cpus)  # else one thread per core of the node, not of the job
            where += f", torch sees {torch.cuda.device_count()} GPU(s), {torch.get_num_threads()} CPU thread(s)"
        log.info("job %s on %s: %s, restart %s, %s", os.environ.get("SLURM_JOB_ID", "?"), socket.gethostname(),
                 self, os.environ.get("SLURM_RESTART_COUNT", "0"), where)
        return fn(*args, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called on USR2: the state on disk is the last finished epoch; resubmit the same call."""
        log.warning("preempted or out of time: requeueing %s; it resumes from its last saved epoch", self)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------------------------- watching


@dataclass(frozen=True)
class JobReport:
    """One job as ``status`` shows it."""

    job_id: str
    state: str        # SLURM's (sacct), e.g. RUNNING, COMPLETED, CANCELLED, FAILED; else from the result pickle
    requeues: int     # times the job went back to the queue (preemption, timeout)
    run_id: str
    progress: str
    log: Path
    error: str = ""   # the exception line of a failed job (the traceback is in the log)


def finished_runs(results: str | os.PathLike) -> set[str]:
    """Run ids under a results root that ran to the end (``runs/<run_id>/summary.json`` exists)."""
    return {p.name for p in run_folders(results, holding=SUMMARY)}


def run_progress(spec: Any, workdir: Path | None = None, job_id: str = "") -> str:
    """Where a run stands, from its own small files: finished, phase/epoch and top-1, or not started.

    With ``job_id``, a run whose progress another job wrote (a submission refused because the run
    was busy) says so instead of showing that job's progress as this one's.
    """
    if not hasattr(spec, "run_id") or not hasattr(spec, "results"):
        return "-"
    results = Path(spec.results)
    if not results.is_absolute() and workdir is not None:
        results = workdir / results
    run = run_folder(results, spec.run_id)
    if (run / PROGRESS).exists() or (run / SUMMARY).exists():
        r = inspect_run(run)
        writer = json.loads((run / PROGRESS).read_text()).get("job_id", "") if (run / PROGRESS).exists() else ""
        if job_id and writer and writer != job_id:
            return f"run written by job {writer}, not this one"
        if r.state == "finished":
            return "finished" + (f": top-1 {r.top1:.2f}%" if r.top1 is not None else "") + (
                f", sparsity {100 * r.sparsity:.1f}%" if r.sparsity is not None else "")
        return r.progress + (f", top-1 {r.top1:.2f}%" if r.top1 is not None else "")
    if getattr(spec, "kind", None) and spec.kind() == "ptq":  # one task of a PTQ sweep: its own row file
        from compress.results import find_unit

        path = results / spec.task_file().relative_to(spec.results)
        where = find_unit(path)  # its file, or merged by compact; a damaged file is warned about and passed over
        if where is None:
            return f"task {spec.task_name()}: " + ("its file is damaged (see the warning)" if path.exists()
                                                   else "no rows yet")
        return f"task {spec.task_name()}: {where[2]} rows written"
    files = sorted(results.glob(f"*/{spec.run_id}*.parquet"))
    return f"{len(files)} result file(s)" if files else "not started"


def job_paths(folder: Path, job_id: str) -> submitit.core.utils.JobPaths:
    return submitit.core.utils.JobPaths(folder / "%j", job_id=job_id, task_id=0)


def find_jobs(targets: Sequence[str], folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """(jobs root, job id) for each target: a job id, a job's folder, or a root of job folders.

    No target: every job under ``folder``. Newest first; an array id alone means all its tasks.
    """
    root = Path(folder).expanduser().resolve()
    found: list[tuple[Path, str]] = []

    def under(r: Path, prefix: str = "") -> list[tuple[Path, str]]:
        # a job folder holds <id>_submitted.pkl; an array's own folder holds only its sbatch script
        ids = [p.name for p in r.iterdir() if JOB_ID.match(p.name) and (p / f"{p.name}_submitted.pkl").exists()
               ] if r.is_dir() else []
        return [(r, i) for i in ids if not prefix or i == prefix or i.startswith(prefix + "_")]

    for t in targets or [str(root)]:
        p = Path(t).expanduser()
        if JOB_ID.match(t) and not p.exists():
            hits = under(root, t)
            if not hits:
                raise FileNotFoundError(f"no job {t} under {root} (pass --folder, the job folder of the launch)")
            found += hits
        elif p.is_dir() and JOB_ID.match(p.name) and any(p.glob(f"{p.name}_*")):
            found.append((p.resolve().parent, p.name))
        elif p.is_dir():
            found += under(p.resolve())
        else:
            raise FileNotFoundError(f"{t} is neither a job id nor a job folder")
    return sorted(dict.fromkeys(found), key=lambda rj: [int(x) for x in rj[1].split("_")], reverse=True)


def sacct_records(job_ids: Iterable[str]) -> dict[str, list[dict[str, str]]]:
    """Accounting records per job id (one per run: a requeued job has several), oldest first.

    Empty when sacct is missing or fails (no accounting): callers fall back to the job's files.
    """
    from submitit.slurm.slurm import read_job_id

    mains = sorted({j.split("_")[0] for j in job_ids})
    if not mains or shutil.which("sacct") is None:
        return {}
    cmd = ["sacct", "-D", "-X", "--parsable2", "-o", "JobID,State,ExitCode,Elapsed,WorkDir,NodeList",
           "-j", ",".join(mains)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return {}
    if res.returncode != 0:
        return {}
    lines = res.stdout.splitlines()
    out: dict[str, list[dict[str, str]]] = {}
    if len(lines) < 2:
        return out
    names = lines[0].split("|")
    for line in lines[1:]:
        rec = dict(zip(names, line.split("|"), strict=False))
        try:
            parsed = read_job_id(rec["JobID"])
        except (ValueError, KeyError):
            continue
        for p in parsed:
            ids = [f"{p[0]}_{i}" for i in range(int(p[1]), int(p[2]) + 1)] if len(p) == 3 else ["_".join(p)]
            for jid in ids:
                out.setdefault(jid, []).append(rec)
    return out


def _error_line(paths: submitit.core.utils.JobPaths) -> str:
    """The exception of a failed job: last line of the pickled traceback, else of the log."""
    if paths.result_pickle.exists():
        try:
            kind, value = submitit.core.utils.pickle_load(paths.result_pickle)
        except Exception as e:  # a result that cannot be unpickled here is itself worth showing
            return f"result pickle unreadable: {type(e).__name__}: {e}"
        return error_line(str(value)) if kind == "error" else ""
    if paths.stdout.exists():
        return error_line(paths.stdout.read_text(errors="replace"), log=True)
    return ""


def inspect_job(root: Path, job_id: str, records: dict[str, list[dict[str, str]]]) -> JobReport:
    """State, requeues, progress, log and error of one job."""
    paths = job_paths(root, job_id)
    recs = records.get(job_id) or []
    if recs:
        state = recs[-1]["State"].split()[0]
        requeues = sum(r["State"].split()[0] in ("REQUEUED", "PREEMPTED") for r in recs[:-1])
        workdir = Path(recs[-1]["WorkDir"]) if recs[-1].get("WorkDir") else None
    else:  # no accounting: what the job's own files say
        requeues, workdir = 0, None
        state = "UNKNOWN"
        if paths.result_pickle.exists():
            try:
                state = {"success": "COMPLETED", "error": "FAILED"}.get(
                    submitit.core.utils.pickle_load(paths.result_pickle)[0], "UNKNOWN")
            except Exception:
                state = "UNKNOWN"
    spec, run_id, search = None, "", None
    if paths.submitted_pickle.exists():
        try:
            delayed = submitit.core.utils.DelayedSubmission.load(paths.submitted_pickle)
            spec = delayed.args[0] if delayed.args else None
            if isinstance(spec, str) and len(delayed.args) >= 3:  # run_search(kind, base, tune_spec)
                spec, search = delayed.args[1], delayed.args[2]
            run_id = search.search_id if search is not None else getattr(spec, "run_id", "")
        except Exception as e:
            log.debug("cannot read %s: %s", paths.submitted_pickle, e)
    if spec is None or state == "PENDING":
        progress = "-"
    elif search is not None:
        progress = search_progress(Path(workdir or ".") / spec.results, search.search_id)
    else:
        progress = run_progress(spec, workdir, job_id)
    if state in STOPPED and not progress.startswith(("finished", "-", "not started", "run written by")):
        progress = f"stopped at {progress}"
    error = _error_line(paths) if state in FAILED else ""
    return JobReport(job_id, state, requeues, run_id, progress, paths.stdout, error)


def inspect_jobs(targets: Sequence[str] = (), folder: str | os.PathLike = "slurm-jobs",
                 last: int = 0) -> list[JobReport]:
    """``JobReport`` for each target (job ids, job folders, roots of job folders), newest first."""
    jobs = find_jobs(targets, folder)
    if last:
        jobs = jobs[:last]
    records = sacct_records(j for _, j in jobs)
    return [inspect_job(root, jid, records) for root, jid in jobs]


def final_report(job: Any, timeout: float = 60.0) -> JobReport:
    """A submitted job's report once SLURM's accounting has its final state (or ``timeout`` passed).

    ``job.result()`` returns (or raises) as soon as the job's result pickle exists, while sacct may
    still say RUNNING for a few seconds: waiting here is what lets ``--wait`` print the real end state.
    """
    import time

    root = Path(job.paths.folder).resolve().parent
    deadline = time.monotonic() + timeout
    while True:
        r = inspect_job(root, job.job_id, sacct_records([job.job_id]))
        if r.state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING") or \
                time.monotonic() > deadline:
            return r
        time.sleep(1.0)


def format_reports(reports: Sequence[JobReport], cwd: Path | None = None) -> str:
    """A table: job, state (with requeues), run, progress, log; a failed job's error under it."""
    cwd = cwd or Path.cwd()

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(cwd))
        except ValueError:
            return str(p)

    rows = [("JOB", "STATE", "RUN", "PROGRESS", "LOG")]
    rows += [(r.job_id, r.state + (f" (requeued {r.requeues}x)" if r.requeues else ""), r.run_id or "-", r.progress,
              rel(r.log)) for r in reports]
    lines = table(rows, last_free=True).splitlines()
    out = lines[:1]
    for ln, r in zip(lines[1:], reports, strict=True):
        out += [ln, f"    error: {r.error}"] if r.error else [ln]
    return "\n".join(out)
