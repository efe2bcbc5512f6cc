"""A run folder on disk, read without torch: where it is, what it holds, whether a spec is its own.

    results/runs/<run_id>/spec.json      written when the run starts
    results/runs/<run_id>/progress.json  where it stands (phase, epoch, last top-1, job), after every epoch
    results/runs/<run_id>/lease.json     who runs it now (jobs/lease.py)
    results/runs/<run_id>/summary.json   written when it finishes

Which runs a command means is resolved here too: ``new_specs`` (new runs, one per seed, or the stored
specs of ``--resume``), ``from_run`` (a job that starts from another run's model). Bad input is a
``ValueError`` with one line; the command prints it.

The launcher calls ``check_run`` before it submits anything (a run id that another spec owns is
refused there, not on a node after queueing); the job calls it again when it starts. ``status``
reads every run's progress and lease (``inspect_runs``) and the searches they belong to
(``inspect_searches``), whether they ran here or on SLURM.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from compress.provenance import provenance, spec_row, spec_value
from compress.results import FINAL, PROGRESS, RUNS, SPEC, SUMMARY, default_root, run_folder, run_folders
from jobs import lease
from jobs.specs import TrainFields, spec_from_options
from jobs.text import table


class SpecMismatch(ValueError):
    """A run folder that belongs to another spec (resuming would mix two experiments)."""


def run_dir(spec: TrainFields) -> Path:
    return run_folder(spec.results, spec.run_id)


def require_run_id(spec: Any) -> None:
    """A job needs its run id fixed before it runs (a requeued job must find the same folder and rows)."""
    if not spec.run_id:
        raise ValueError("spec.run_id is empty: call spec.with_defaults() first")


def row_base(spec: Any, device_name: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """What every result row of a job starts with: run id, kind, the spec's columns, provenance, search tags."""
    return {"run_id": spec.run_id, "kind": spec.kind(), **spec_row(spec), **provenance(device_name),
            "search_id": "", "trial_id": "", **(tags or {})}


# fields that say where or how a run goes, not what it computes: a run resumed with another of these
# is the same run (its folder is under ``results``; ``compile`` changes speed, not the rows' meaning)
NOT_IDENTITY = ("results", "compile")


def same_spec_row(row: dict[str, Any], spec: Any) -> str:
    """``same_spec`` for a result row: its ``spec_<field>`` columns against ``spec`` ("" when the same)."""
    want = spec_row(spec)
    defaults = {f"spec_{k}": spec_value(v) for k, v in _defaults(spec).items()}
    row = {**defaults, **{k: v for k, v in row.items() if v is not None or k not in defaults}}
    diff = [f"{k[5:]} {row.get(k)!r} there, {v!r} here" for k, v in want.items()
            if row.get(k) != v and k[5:] not in NOT_IDENTITY]
    return ", ".join(diff[:4]) + (", ..." if len(diff) > 4 else "")


def _defaults(spec: Any) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(spec) if f.default is not dataclasses.MISSING}


def same_spec(stored: dict[str, Any], spec: TrainFields) -> str:
    """"" when ``stored`` (a spec as saved) is ``spec``, else the fields that differ, for the error line.

    The one spec-identity rule (``same_spec_row`` applies it to a row's spec columns): every field but
    ``NOT_IDENTITY``: ``results``, because the run folder is under it (a moved or differently spelled
    root is the same run), and ``compile``.
    """
    here = json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples: lists
    # a field added since the spec was saved has its default there (the run did what the default does)
    there = {**json.loads(json.dumps(_defaults(spec))), **json.loads(json.dumps(stored))}
    diff = [f"{k} {there.get(k)!r} there, {here.get(k)!r} here" for k in sorted(set(there) | set(here))
            if there.get(k) != here.get(k) and k not in NOT_IDENTITY]
    return ", ".join(diff[:4]) + (", ..." if len(diff) > 4 else "")


def check_run(spec: TrainFields) -> str:
    """What is on disk for ``spec.run_id``: "new", "resumes" or "finished"; ``SpecMismatch`` if another spec's.

    Reads only the JSON files (no checkpoint), so the launcher can call it before submitting.
    """
    d = run_dir(spec)
    for name, state in ((SUMMARY, "finished"), (SPEC, "resumes")):
        path = d / name
        if not path.exists():
            continue
        stored = json.loads(path.read_text())
        stored = stored.get("spec", {}) if name == SUMMARY else stored
        diff = same_spec(stored, spec)
        if diff:
            raise SpecMismatch(f"run {spec.run_id} under {spec.results} holds another spec ({diff}); "
                               f"choose another --run-id")
        return state
    return "new"


def settled(results: str | Path) -> Callable[[str, pa.Table], bool]:
    """Whether one result file's rows are final (no job writes that file again): what compaction may merge.

    - ``ptq``: always. A task writes its file once, and a requeued task looks for its rows with
      ``read_unit``, which finds them in the compact file that merged them.
    - ``phases``, ``epochs``: rows of a finished run, or of phases its ``progress.json`` has moved past
      (written before ``state.pt`` moved on: a resume never trains or writes them again).
    - ``modules``: a finished run's (written by the finishing step, which a stopped run redoes).
    - anything else, or a run without its run folder: no.
    """
    root = Path(results)
    known: dict[str, tuple[bool, int]] = {}  # run id -> (finished, first phase not yet final)

    def state(run_id: str) -> tuple[bool, int]:
        if run_id not in known:
            folder = run_folder(root, run_id)
            progress = _read_json(folder / PROGRESS)
            finished = (folder / SUMMARY).exists() or bool(progress.get("finished"))
            known[run_id] = (finished, int(progress.get("phase") or 0))
        return known[run_id]

    def final(table: str, rows: pa.Table) -> bool:
        if table == "ptq":
            return True
        if table not in ("phases", "epochs", "modules") or "run_id" not in rows.column_names:
            return False
        if table == "modules" or "phase" not in rows.column_names:
            return all(state(r)[0] for r in set(rows.column("run_id").to_pylist()))
        pairs = set(zip(rows.column("run_id").to_pylist(), rows.column("phase").to_pylist(), strict=True))
        return all(r is not None and (state(r)[0] or (p is not None and p < state(r)[1])) for r, p in pairs)

    return final


@dataclass(frozen=True)
class RunReport:
    """One run as ``status`` shows it."""

    run_id: str
    kind: str
    state: str       # finished, running, queued, stopped (resumable), or new (nothing trained yet)
    progress: str    # "phase 3/12, epoch 4/10", or "finished"
    top1: float | None
    sparsity: float | None
    owner: str       # the job or process that holds it (running, queued) or last wrote it
    search_id: str
    updated: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def inspect_run(folder: Path) -> RunReport:
    """A run folder's state from its own small files (no checkpoint is loaded)."""
    p = _read_json(folder / PROGRESS)
    spec = _read_json(folder / SPEC)
    held = lease.read_lease(folder)
    live, why = lease.liveness(held) if held else (False, "")
    top1, sparsity = p.get("top1"), p.get("sparsity")
    if p.get("finished") or (folder / SUMMARY).exists():
        state = "finished"
        if not p.get("finished"):  # finished before progress files existed: the summary has the figures
            summary = _read_json(folder / SUMMARY)
            top1, sparsity = summary.get("top1"), summary.get("sparsity")
    elif live:
        state = "queued" if why.endswith("PENDING") else "running"
    else:
        state = "stopped" if p else "new"
    if state == "finished":
        progress = "finished"
    elif p:
        progress = f"phase {p.get('phase')}/{p.get('phases')}, epoch {p.get('epoch')}/{p.get('epochs')}"
    else:
        progress = "-"
    kind = p.get("kind") or ("prune" if "phases" in spec else "train" if spec else "?")
    return RunReport(folder.name, kind, state, progress, top1, sparsity,
                     str(held.get("owner")) if live and held else str(p.get("job_id", "")),
                     p.get("search_id", ""), p.get("updated_at", ""))


def inspect_runs(results: str | Path, last: int = 0) -> list[RunReport]:
    """Every run under a results root, newest first (``last``: the newest N only)."""
    folders = [d for d in run_folders(results) if (d / SPEC).exists() or (d / PROGRESS).exists()]
    folders.sort(key=lambda d: max((d / n).stat().st_mtime for n in (SPEC, PROGRESS) if (d / n).exists()),
                 reverse=True)
    return [inspect_run(d) for d in (folders[:last] if last else folders)]


@dataclass(frozen=True)
class SearchReport:
    """A search's trials by state (from its trials' run folders)."""

    search_id: str
    trials: int
    finished: int
    running: int
    stopped: int
    best_top1: float | None


def inspect_searches(runs: list[RunReport]) -> list[SearchReport]:
    out = []
    for sid in dict.fromkeys(r.search_id for r in runs if r.search_id):
        mine = [r for r in runs if r.search_id == sid]
        done = [r.top1 for r in mine if r.state == "finished" and r.top1 is not None]
        out.append(SearchReport(sid, len(mine), sum(r.state == "finished" for r in mine),
                                sum(r.state in ("running", "queued") for r in mine),
                                sum(r.state in ("stopped", "new") for r in mine), max(done) if done else None))
    return out


def search_progress(results: str | Path, search_id: str) -> str:
    """"trials: 3 finished, 1 running, 0 stopped" for a search id, from its trials' run folders."""
    runs = [inspect_run(d) for d in run_folders(results, f"{search_id}-*")]
    (s,) = inspect_searches(runs) or [SearchReport(search_id, 0, 0, 0, 0, None)]
    return f"trials: {s.finished} finished, {s.running} running, {s.stopped} stopped"


def format_runs(runs: list[RunReport]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}%"

    rows = [("RUN", "KIND", "STATE", "PROGRESS", "TOP-1", "SPARSITY", "JOB", "UPDATED")]
    rows += [(r.run_id, r.kind, r.state, r.progress, pct(r.top1),
              "-" if r.sparsity is None else f"{100 * r.sparsity:.1f}%", r.owner or "-", r.updated or "-")
             for r in runs]
    return table(rows)


def format_searches(searches: list[SearchReport]) -> str:
    rows = [("SEARCH", "TRIALS", "FINISHED", "RUNNING", "STOPPED", "BEST TOP-1")]
    rows += [(s.search_id, str(s.trials), str(s.finished), str(s.running), str(s.stopped),
              "-" if s.best_top1 is None else f"{s.best_top1:.2f}%") for s in searches]
    return table(rows)


RUN_STATES = {"new": "new run", "resumes": "resuming where it stopped", "finished": "already finished"}


def seed_specs(cls: type, options: dict[str, Any], seeds: str) -> list[Any]:
    """One spec per seed of ``--seeds 0,1,2`` (a given ``--run-id`` gets ``-s<seed>``), else one spec."""
    if not seeds:
        return [spec_from_options(cls, options).with_defaults()]
    try:
        values = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds={seeds!r} is invalid: use comma-separated integers, e.g. 0,1,2") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"seeds={seeds!r} is invalid: give distinct seeds, e.g. 0,1,2")
    run_id = options.get("run_id") or ""
    return [spec_from_options(cls, {**options, "seed": s, "run_id": f"{run_id}-s{s}" if run_id else ""}).with_defaults()
            for s in values]


def _closest(name: str, known: list[str]) -> list[str]:
    """Up to three known run ids that look like ``name`` (for a typo's error line)."""
    return difflib.get_close_matches(name, known, n=3, cutoff=0.5)


def from_run(options: dict[str, Any], run: str, given: set[str]) -> dict[str, Any]:
    """Options for a job that consumes a run's model: ``--run ID`` (its final.pt), or ``--weights`` of a run's file.

    The model (string and arguments), the data (source, image size, normalisation) and the data root
    come from that run's spec.json unless ``given`` (typed on the command line; the data root only
    while that folder exists; else $COMPRESS_DATA as usual).
    """
    results = Path(options.get("results") or default_root())
    if run:
        final = run_folder(results, run) / FINAL
        if not final.is_file():
            close = _closest(run, [d.name for d in run_folders(results, holding=FINAL)])
            raise ValueError(f"no finished run {run!r} under {results}/{RUNS} (a run has {FINAL} once it finished)"
                             + (f"; the closest: {', '.join(close)}" if close else ""))
        if options.get("weights"):
            raise ValueError("--run and --weights both name the starting model: give one")
        options = {**options, "weights": str(final)}
    weights = Path(options.get("weights") or "")
    source = weights.parent / SPEC if weights.name else None
    if source is None or not source.is_file():
        return options
    stored = json.loads(source.read_text())
    out = dict(options)
    for name in ("model", "model_args", "data", "image_size", "data_mean", "data_std"):  # what built the model
        if name in options and name not in given and stored.get(name):
            value = stored[name]
            out[name] = ",".join(map(str, value)) if isinstance(value, list) else value
    if "data_root" not in given and stored.get("data_root") and Path(stored["data_root"]).exists():
        out["data_root"] = stored["data_root"]
    return out


def resume_specs(cls: type, ids: str, options: dict[str, Any], given: set[str]) -> list[Any]:
    """The stored specs of ``--resume a,b``: an id not under the results root is refused, with the closest ones.

    Spec options ``given`` on the command line must agree with the stored spec (a resumed run keeps it).
    """
    results = Path(options.get("results") or default_root())
    known = [d.name for d in run_folders(results, holding=SPEC)]
    specs = []
    for run_id in [r.strip() for r in ids.split(",") if r.strip()]:
        if run_id not in known:
            close = _closest(run_id, known)
            raise ValueError(f"no run {run_id!r} under {results}/{RUNS} to resume" +
                             (f"; the closest: {', '.join(close)}" if close else f" ({len(known)} run(s) there)"))
        stored = json.loads((run_folder(results, run_id) / SPEC).read_text())
        kind = cls.__name__.removesuffix("Spec").lower()
        # A run started by an older version lacks the fields added since: those take their defaults,
        # which is what that version did. Fields this kind does not have mean another kind of run.
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n in fields.keys() - set(stored)
                   if fields[n].default is dataclasses.MISSING and fields[n].default_factory is dataclasses.MISSING]
        if set(stored) - fields.keys() or missing:
            raise ValueError(f"run {run_id} is not a {kind} run (its {SPEC} has other fields): resume it with the "
                             f"command that started it")
        try:
            spec = spec_from_options(cls, {**stored, "results": str(results)})
        except (TypeError, ValueError) as e:
            raise ValueError(f"run {run_id}'s {SPEC} cannot be read back: {e}") from e
        differs = [f"--{k.replace('_', '-')}" for k in sorted(given - {"results", "run_id"})
                   if k in stored and spec_from_options(cls, {**stored, k: options[k]}) != spec]
        if differs:
            raise ValueError(f"{', '.join(differs)} differ(s) from run {run_id}'s spec: a resumed run keeps its spec "
                             f"(start a new run with another --run-id to change it)")
        specs.append(spec)
    return specs


def new_specs(cls: type, options: dict[str, Any], seeds: str, resume: str, run: str, given: set[str]) -> list[Any]:
    """The specs a prune/train command runs: resumed ones, or new ones whose run ids are not taken yet."""
    if resume:
        if seeds or options.get("run_id") or run:
            raise ValueError("--resume takes the run ids to resume (comma-separated); --seeds, --run-id and --run "
                             "do not go with it")
        return resume_specs(cls, resume, options, given)
    specs = seed_specs(cls, from_run(options, run, given), seeds)
    for spec in specs:
        state = check_run(spec)
        if state != "new":
            raise ValueError(f"run {spec.run_id} already exists under {spec.results} ({RUN_STATES[state]}): resume "
                             f"it with --resume {spec.run_id}, or choose another --run-id")
    return specs
