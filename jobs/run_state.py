"""The state of a train/prune run between epochs, typed: what ``<results>/runs/<run_id>/state.pt`` holds.

``jobs/training.py`` keeps one ``RunState`` per run and saves ``to_state_dict()`` after every epoch
(``jobs/checkpoints.py``); a resume reads the file back with ``from_state_dict()``. The dict has the
same keys and values as the plain dict the job saved before this class, so a run checkpointed by an
older version resumes: a key in ``OPTIONAL`` is left out until the run sets it, as it always was, and
reads as None from a file that lacks it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from compress.channels import Count

# keys a saved state may lack: before the run reaches them, or in a file written before they existed
OPTIONAL = ("dense_count", "widths", "predictions", "last_top1")


@dataclass(kw_only=True)
class RunState:
    """Everything a resume needs; fields are in the order the job first sets them.

    ``model``, ``masks``, ``optimizer`` and ``scheduler`` are set by each phase's pruning step, before
    the first save, so every saved state holds them.
    """

    spec: dict[str, Any]  # ``dataclasses.asdict`` of the run's spec: a resume refuses another spec
    phase: int  # the phase in progress, from 1; one past the last: only finishing is left
    epoch: int  # the phase's epochs done
    pruned: bool  # the phase's pruning step is done: model and optimizer are the pruned ones
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)  # the phase's epoch rows, written with its row
    before: dict[str, tuple[str, int, int]]  # ``nonzero_counts`` of the starting model, for the module table
    dense_top1: float  # top-1 (%) of the starting model, phase 0
    wall: float = 0.0  # seconds of wall clock spent in the phase so far
    train_seconds: float = 0.0  # seconds spent training over the whole run
    dense_count: Count | None = None  # channels runs: MACs and parameters of the dense model
    widths: dict[str, list[int]] | None = None  # channels runs, once pruned: ``channels.changed``
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # ``MaskSet.state_dict``
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    # the predicted class of every test image after the phase's last epoch (uint8), kept until its row
    # is written; None from then on
    predictions: torch.Tensor | None = None
    last_top1: float | None = None  # top-1 (%) of the last phase written

    def dense(self) -> Count:
        """The dense model's count of a channels run (set with its phase 0)."""
        if self.dense_count is None:
            raise ValueError("the state of a run that removes no channels has no dense_count")
        return self.dense_count

    def to_state_dict(self) -> dict[str, Any]:
        """The dict saved as ``state.pt``: every field, the optional ones only once the run has set them."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state["dense_count"] = None if self.dense_count is None else dataclasses.astuple(self.dense_count)
        # an optional None is a key not reached yet, left out; but a phase row sets predictions back to None
        # as it sets last_top1, and that None is saved from the first row on
        saved_none = {"predictions"} if self.last_top1 is not None else set()
        return {k: v for k, v in state.items() if v is not None or k not in OPTIONAL or k in saved_none}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RunState:
        """A saved state read back, one from before a key in ``OPTIONAL`` existed included (None then)."""
        required = {f.name: state[f.name] for f in dataclasses.fields(cls) if f.name not in (*OPTIONAL, "epoch_rows")}
        dense = state.get("dense_count")
        return cls(**required, epoch_rows=state.get("epoch_rows") or [],  # read leniently, as the job always has
                   dense_count=None if dense is None else Count(*dense), widths=state.get("widths"),
                   predictions=state.get("predictions"), last_top1=state.get("last_top1"))
