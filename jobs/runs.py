"""A run folder on disk, read without torch: where it is, what it holds, whether a spec is its own.

    results/runs/<run_id>/spec.json      written when the run starts
    results/runs/<run_id>/summary.json   written when it finishes

The launcher calls ``check_run`` before it submits anything (a run id that another spec owns is
refused there, not on a node after queueing); the job calls it again when it starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jobs.specs import TrainFields


class SpecMismatch(ValueError):
    """A run folder that belongs to another spec (resuming would mix two experiments)."""


def run_dir(spec: TrainFields) -> Path:
    return Path(spec.results) / "runs" / spec.run_id


def same_spec(stored: dict[str, Any], spec: TrainFields) -> str:
    """"" when ``stored`` (a spec as saved) is ``spec``, else the fields that differ, for the error line.

    ``results`` is left out: the run folder is under it, so a moved or differently spelled root is the same run.
    """
    there, here = json.loads(json.dumps(stored)), json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples: lists
    diff = [f"{k} {there.get(k)!r} there, {here.get(k)!r} here" for k in sorted(set(there) | set(here))
            if there.get(k) != here.get(k) and k != "results"]
    return ", ".join(diff[:4]) + (", ..." if len(diff) > 4 else "")


def check_run(spec: TrainFields) -> str:
    """What is on disk for ``spec.run_id``: "new", "resumes" or "finished"; ``SpecMismatch`` if another spec's.

    Reads only the JSON files (no checkpoint), so the launcher can call it before submitting.
    """
    d = run_dir(spec)
    for name, state in (("summary.json", "finished"), ("spec.json", "resumes")):
        path = d / name
        if not path.exists():
            continue
        stored = json.loads(path.read_text())
        stored = stored.get("spec", {}) if name == "summary.json" else stored
        diff = same_spec(stored, spec)
        if diff:
            raise SpecMismatch(f"run {spec.run_id} under {spec.results} holds another spec ({diff}); "
                               f"choose another --run-id")
        return state
    return "new"
