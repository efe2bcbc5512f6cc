"""Who owns a run: one lease file per run folder, so two jobs never write one run id.

    runs/<run_id>/lease.json   {"owner": "1234_5" | "local-4711", "host", "pid", "user", "since", "token"}

A job takes the lease when it starts (``acquire``) and drops it when it ends normally or with an
error (``release``); a signal (requeue, preemption, kill) leaves it behind, and it goes stale by
itself: a lease is live while its owner is, that is

- a SLURM job (``owner`` is a job id) that ``squeue`` still lists (pending, running, requeued...);
- a local process (``local-<pid>``) on this host whose pid exists; on another host it cannot be
  checked, and counts as live (the message names the file to remove once that process is gone);
- a submission in flight (``submit-<pid>``, written before ``sbatch`` and replaced by the job id
  right after it): live for ``CLAIM_SECONDS`` at most.

A requeued SLURM job keeps its job id, so it takes its own lease back. The launcher takes the
lease *before* it submits (``claim``), so a second submission with the same ``--run-id`` is refused
at once, with one line, instead of both jobs queueing and mixing their rows; the job then finds the
claim's token (passed to it with the spec) and adopts the lease.

The lease is created with ``os.link`` of a complete temporary file, which fails if the name exists
(atomic on local filesystems and on NFS), so a reader never sees half a lease. Taking over a stale
lease is a rename, then a read-back: two jobs racing over one stale lease in the same millisecond
could both proceed, which this file does not try to prevent (a scheduler-side lock would).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from compress.provenance import job_id
from compress.results import LEASE, RUNS, atomic_write_bytes, current_umask

CLAIM_SECONDS = 600
# squeue states of a job that may still write (anything else, or no longer listed: gone)
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


class RunBusy(ValueError):
    """Another job holds the run: its message is the one line a user sees."""


def lease_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LEASE


def read_lease(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The lease of a run folder, or None when nobody holds it (or the file is unreadable)."""
    try:
        return json.loads(lease_path(run_dir).read_text())
    except (OSError, ValueError):
        return None


def _record(owner: str, token: str) -> dict[str, Any]:
    return {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "user": getpass.getuser(),
            "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "token": token}


def _slurm_state(owner: str) -> str | None:
    """The job's squeue state; "" when squeue no longer lists it; None when there is no squeue to ask."""
    if shutil.which("squeue") is None:
        return None
    out = subprocess.run(["squeue", "-h", "-j", owner, "-o", "%T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return "" if "Invalid job id" in out.stderr else None
    return out.stdout.split()[0] if out.stdout.split() else ""


def liveness(lease: dict[str, Any]) -> tuple[bool, str]:
    """Whether the lease's owner may still write, and how that was decided (for the error line)."""
    owner = str(lease.get("owner", ""))
    host = lease.get("host", "?")
    if owner.startswith(("local-", "submit-")):
        since = _dt.datetime.fromisoformat(lease.get("since", "1970-01-01T00:00:00+00:00"))
        if owner.startswith("submit-") and (_dt.datetime.now(_dt.UTC) - since).total_seconds() > CLAIM_SECONDS:
            return False, "a submission that never handed over"
        if host != socket.gethostname():
            return True, f"process {lease.get('pid')} on {host}, which cannot be checked from here"
        try:
            os.kill(int(lease.get("pid", 0)), 0)
        except ProcessLookupError:
            return False, f"process {lease.get('pid')} is gone"
        except PermissionError:
            pass  # exists, another user's
        return True, f"process {lease.get('pid')} on {host}"
    state = _slurm_state(owner)
    if state is None:
        return True, f"SLURM job {owner}, whose state cannot be read here (no squeue)"
    if state in LIVE_STATES:
        return True, f"SLURM job {owner} is {state}"
    return False, f"SLURM job {owner} is {state or 'gone'}"


def _write_new(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` with ``record`` unless it exists (link of a complete file: all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.chmod(tmp, 0o666 & ~current_umask())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _replace(path: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(record).encode())


def _busy(run_dir: Path, lease: dict[str, Any], why: str) -> RunBusy:
    return RunBusy(f"run {run_dir.name} is in use by {lease.get('owner')} (user {lease.get('user', '?')}, since "
                   f"{lease.get('since', '?')}: {why}); choose another --run-id, or wait for it "
                   f"(if that job is gone for good, remove {lease_path(run_dir)})")


def acquire(run_dir: str | os.PathLike, token: str = "") -> dict[str, Any]:
    """Take the lease for this process's job (``job_id()``); raises ``RunBusy`` if a live owner holds it.

    Taken over without asking: a lease of this same job id (a requeue), one whose ``token`` is
    ``token`` (the claim the launcher made for this job), and a stale one.
    """
    run_dir = Path(run_dir)
    me = job_id()
    record = _record(me, token)
    path = lease_path(run_dir)
    for _ in range(3):  # created, or read and judged; a lease dropped between the two gets another try
        if _write_new(path, record):
            return record
        held = read_lease(run_dir)
        if held is None:
            continue
        mine = held.get("owner") == me or (token and held.get("token") == token)
        if not mine:
            live, why = liveness(held)
            if live:
                raise _busy(run_dir, held, why)
        _replace(path, record)
        if (read_lease(run_dir) or {}).get("pid") == record["pid"] and read_lease(run_dir)["owner"] == me:
            return record
    raise RunBusy(f"run {run_dir.name}: cannot take {path}: another job keeps taking it")


def claim(run_dir: str | os.PathLike) -> str:
    """Before a submission: take the lease for the job about to be submitted; returns its token."""
    token = secrets.token_hex(8)
    run_dir = Path(run_dir)
    path = lease_path(run_dir)
    record = _record(f"submit-{os.getpid()}", token)
    if _write_new(path, record):
        return token
    held = read_lease(run_dir) or {}
    live, why = liveness(held) if held else (False, "")
    if live:
        raise _busy(run_dir, held, why)
    _replace(path, record)
    return token


def hand_over(run_dir: str | os.PathLike, token: str, owner: str) -> None:
    """After the submission: the claim with ``token`` now names the job (unless the job already took it)."""
    held = read_lease(run_dir)
    if held is not None and held.get("token") == token and str(held.get("owner", "")).startswith("submit-"):
        _replace(lease_path(run_dir), {**held, "owner": owner})


def release(run_dir: str | os.PathLike, token: str = "") -> None:
    """Drop the lease if this job holds it (a lease another job took over is left alone)."""
    held = read_lease(run_dir)
    if held is not None and (held.get("owner") == job_id() or (token and held.get("token") == token)):
        # a read-only or vanished folder: the lease goes stale with this process anyway
        with contextlib.suppress(OSError):
            lease_path(run_dir).unlink(missing_ok=True)


def live_leases(results: str | os.PathLike) -> list[tuple[str, dict[str, Any], str]]:
    """(run id, lease, why) of every run under the results root ``results`` whose owner may still write."""
    out = []
    for path in sorted((Path(results) / RUNS).glob(f"*/{LEASE}")):
        held = read_lease(path.parent)
        if held is not None:
            live, why = liveness(held)
            if live:
                out.append((path.parent.name, held, why))
    return out
