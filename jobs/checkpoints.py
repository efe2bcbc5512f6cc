"""A run's checkpoints: ``state.pt`` after every epoch, the one before kept as ``state.prev.pt``.

``save_state`` writes a new ``state.pt`` atomically and keeps the last one as ``state.prev.pt``
until the new one is whole; ``read_state`` reads the newest that reads, so a ``state.pt`` damaged on
disk costs one epoch. Where it runs: on the CPU (the job moves what it reads to its device).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from compress.errors import exception_line
from compress.results import PREVIOUS_STATE as PREVIOUS
from compress.results import STATE, WriteError, torch_save_atomic

log = logging.getLogger(__name__)

STATE_KEYS = ("spec", "phase", "epoch", "pruned", "model", "masks")  # what every saved state holds


class CheckpointError(ValueError):
    """No checkpoint of a run reads: one line naming the files and what to do."""


def read_state(run_dir: Path, run_id: str) -> dict[str, Any] | None:
    """The newest checkpoint of a run that reads (to the CPU): ``state.pt``, else ``state.prev.pt``.

    None when the run has neither. A damaged ``state.pt`` (truncated on disk, half-copied, not a
    checkpoint) is renamed ``state.pt.damaged`` with one warning line, so the next save cannot make
    it the previous one; the run goes on from the epoch before. ``CheckpointError`` (one line) when
    no file reads.
    """
    damaged: list[str] = []
    for path in (run_dir / STATE, run_dir / PREVIOUS):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            missing = [k for k in STATE_KEYS if k not in state]
            if missing:
                raise KeyError(f"not a checkpoint of a run: no {', '.join(missing)}")
        except Exception as e:  # torch's zip reader, unpickling and our own check raise many kinds
            damaged.append(f"{path} ({exception_line(e)})")
            continue
        if damaged:
            bad = run_dir / STATE
            bad.replace(bad.with_name("state.pt.damaged"))
            log.warning("run %s: checkpoint %s cannot be read, kept as state.pt.damaged; resuming from %s "
                        "(phase %d epoch %d)", run_id, damaged[0], path.name, state["phase"], state["epoch"])
        return state
    if damaged:
        raise CheckpointError(
            f"run {run_id}: no checkpoint reads: {'; '.join(damaged)}. Its rows of finished epochs and phases are "
            f"kept: start it again under another --run-id, or delete {run_dir} to run this one from the start")
    return None


def save_state(state: dict[str, Any], run_dir: Path) -> None:
    """``state`` as ``state.pt``, the last one kept as ``state.prev.pt`` until this one is whole.

    Should the new one fail to be written (a full disk), ``state.prev.pt`` is what a resume reads.
    """
    path, prev = run_dir / STATE, run_dir / PREVIOUS
    try:
        if path.exists():
            os.replace(path, prev)
    except OSError as e:  # the one error line of any failed write (a read-only remount, a lost mount)
        raise WriteError(e.errno, f"cannot write {prev}: {e.strerror or e}") from e
    torch_save_atomic(state, path)


def remove_states(run_dir: Path) -> None:
    """A finished run's checkpoints, gone (its ``final.pt`` holds the model)."""
    for name in (STATE, PREVIOUS):
        (run_dir / name).unlink(missing_ok=True)
