"""What several test modules share: model set-ups, report parsing, run comparisons and polling.

Test modules import from here (or from ``conftest.py``), never from one another.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from compress.results import read_table
from jobs.runs import run_dir
from jobs.specs import PruneSpec

VOLATILE = {"run_id", "spec_run_id", "spec_results", "train_seconds", "wall_seconds", "images_per_second",
            "seconds", "git_commit", "git_dirty", "job_id", "host", "python_version", "torch_version",
            "torchvision_version", "device_name", "written_at", "search_id", "trial_id"}
PHASES, EPOCHS = 2, 4   # the interrupted runs: 2 phases of 4 epochs (~3 s each on one CPU)


def _random_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.05)
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics so folding has something to fold."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_bn(m, gen)
    return model.eval()


def md_tables(text: str) -> dict[str, list[pd.DataFrame]]:
    """Markdown tables of a report by the ``###``/``##`` heading above them, cells as strings."""
    found: dict[str, list[pd.DataFrame]] = {}
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        if lines[i].startswith("|"):
            block = list(itertools.takewhile(lambda s: s.startswith("|"), lines[i:]))
            cells = [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in block]
            found.setdefault(heading, []).append(pd.DataFrame(cells[2:], columns=cells[0]))
            i += len(block)
            continue
        i += 1
    return found


def rows(spec: PruneSpec, table: str) -> pd.DataFrame:
    df = read_table(spec.results, table).to_pandas()
    df = df[df["run_id"] == spec.run_id]
    keys = ["phase", "epoch"] if table == "epochs" else ["phase"]
    return df.drop(columns=sorted(VOLATILE & set(df.columns))).sort_values(keys).reset_index(drop=True)


def assert_same_rows(spec: PruneSpec, ref: PruneSpec) -> None:
    """Exactly one row per phase and per epoch, each equal to the uninterrupted run's."""
    for table, n in (("phases", PHASES + 1), ("epochs", PHASES * EPOCHS)):
        got, want = rows(spec, table), rows(ref, table)
        assert len(got) == n
        assert not got.duplicated(subset=[c for c in ("phase", "epoch") if c in got]).any()
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def wait_until(what: str, cond: Callable[[], Any], timeout: float = 120.0, every: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def mid_phase(spec: PruneSpec) -> Callable[[], dict | None]:
    """A condition: the run's checkpoint is inside a phase (pruned, 1 <= epoch < epochs)."""
    path = run_dir(spec) / "state.pt"

    def check() -> dict | None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except (FileNotFoundError, EOFError, RuntimeError):
            return None
        inside = state["pruned"] and 1 <= state["epoch"] < spec.epochs
        return state if inside else None

    return check


def interrupt_phase(monkeypatch: pytest.MonkeyPatch, phase: int) -> None:
    """Training raises KeyboardInterrupt as phase ``phase`` starts, as Ctrl-C would; ``monkeypatch.undo()`` ends it."""
    import jobs.training

    real = jobs.training.train_one_epoch

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("desc", "").startswith(f"phase {phase}"):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs.training, "train_one_epoch", interrupted)
