"""What every result row carries besides its own columns: its spec, as ``spec_<field>`` columns, and its
provenance (git commit, job id, host, versions, device, time)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import socket
import subprocess
import types
import typing
from pathlib import Path
from typing import Any

import pyarrow as pa

PROJECT_DIR = Path(__file__).resolve().parent.parent

PROVENANCE_FIELDS: dict[str, pa.DataType] = {
    "git_commit": pa.string(),
    "git_dirty": pa.bool_(),
    "job_id": pa.string(),
    "host": pa.string(),
    "python_version": pa.string(),
    "torch_version": pa.string(),
    "torchvision_version": pa.string(),
    "device_name": pa.string(),
    "written_at": pa.timestamp("us", tz="UTC"),
}


def _arrow_type(tp: Any) -> pa.DataType:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _arrow_type(args[0])
    if origin is tuple or tp is tuple:
        return pa.string()  # tuples are stored comma-joined: "minmax,histogram"
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}.get(tp, pa.string())


def spec_fields(*spec_classes: type) -> dict[str, pa.DataType]:
    """``spec_<field>`` columns for the union of the given spec dataclasses' fields."""
    out: dict[str, pa.DataType] = {}
    for cls in spec_classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f"spec_{f.name}", _arrow_type(hints[f.name]))
    return out


def spec_value(v: Any) -> Any:
    """One spec field as a column value: tuples comma-joined, the rest as is."""
    return ",".join(map(str, v)) if isinstance(v, tuple) else v


def spec_row(spec: Any) -> dict[str, Any]:
    """A spec dataclass flattened to ``spec_<field>`` values (tuples comma-joined)."""
    return {f"spec_{f.name}": spec_value(getattr(spec, f.name)) for f in dataclasses.fields(spec)}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


_STATIC: dict[str, Any] = {}


def job_id() -> str:
    """SLURM job id (with array task), else 'local-<pid>'."""
    jid = os.environ.get("SLURM_ARRAY_JOB_ID")
    if jid and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{jid}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or f"local-{os.getpid()}"


def provenance(device: str = "") -> dict[str, Any]:
    """Where and with what a row was produced: git commit, job id, host, versions, device, time."""
    if not _STATIC:
        import torch
        import torchvision

        _STATIC.update(
            git_commit=_git("rev-parse", "HEAD"),
            git_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
            python_version=platform.python_version(),
            torch_version=torch.__version__,
            torchvision_version=torchvision.__version__,
        )
    return {
        **_STATIC,
        "job_id": job_id(),
        "host": socket.gethostname(),
        "device_name": device,
        "written_at": _dt.datetime.now(_dt.UTC),
    }


