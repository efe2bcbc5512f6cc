"""Intervals and paired tests (``analysis.stats``) from the predictions the rows keep, as table cells."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from analysis.stats import bootstrap_interval, mcnemar

SIGNIFICANCE = 0.05  # the level of the "significant at 0.05" calls
CI = "top-1 95% CI"
NONE = "-"  # a cell that cannot be computed: no predictions in the row, no labels, nothing to pair


def format_interval(interval: tuple[float, float] | None) -> str:
    """An interval in percent, two decimals like the top-1 beside it: (89.685, 90.851) -> ``[89.69, 90.85]``."""
    return NONE if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def format_p(p: float | None) -> str:
    """A p-value: three decimals, two significant digits below 0.001: 0.03857 -> ``0.039``, 2.1e-05 -> ``2.1e-05``."""
    if p is None:
        return NONE
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


class Significance:
    """Per-image correctness of rows, and the table cells made from it: intervals and McNemar p-values.

    ``labels``: the test labels in test-set order (a row evaluated on the first N test images uses the
    first N); None: every cell shows ``-``. A row's predictions count only when they reproduce the row's
    top-1 against these labels exactly, so labels of another data set give ``-``, not wrong numbers
    (``mismatched`` names those rows).
    """

    def __init__(self, labels: np.ndarray | None) -> None:
        self.labels = None if labels is None else np.asarray(labels)
        self.mismatched: set[str] = set()
        self._seen: dict[tuple[bytes, float], np.ndarray | None] = {}

    def correct(self, row: Mapping[str, Any], top1: str = "top1",
                predictions: str = "predictions") -> np.ndarray | None:
        """Which test images the row's model got right (bool, test-set order), or None."""
        pred, value = row.get(predictions), row.get(top1)
        if self.labels is None or not isinstance(pred, bytes | bytearray) or value is None or value != value:
            return None
        key = (bytes(pred), float(value))
        if key not in self._seen:
            # one byte a prediction, two (int16) for more than 256 classes (``compress.loops.evaluate``)
            wide = (row.get("data_classes") or 0) > 256
            p = np.frombuffer(key[0], dtype="<i2" if wide else np.uint8)
            right = p == self.labels[:len(p)] if len(p) <= len(self.labels) else None
            ok = right is not None and abs(100.0 * int(right.sum()) / max(1, len(p)) - key[1]) <= 1e-9
            self._seen[key] = right if ok else None
        if self._seen[key] is None:
            self.mismatched.add(" ".join(str(row.get(k)) for k in ("run_id", "phase", "method", "observer",
                                                                   "calib_size") if row.get(k) is not None))
        return self._seen[key]

    def interval(self, runs: Sequence[np.ndarray | None]) -> str:
        """The 95% interval of the runs' mean top-1 (one run: its top-1); ``-`` unless every run has its images."""
        if not runs or any(r is None for r in runs) or len({len(r) for r in runs}) != 1:
            return NONE
        return format_interval(bootstrap_interval(np.stack(runs)))

    @staticmethod
    def paired(a: Sequence[np.ndarray | None], b: Sequence[np.ndarray | None]) -> float | None:
        """McNemar p of runs ``a`` against runs ``b``, paired in order (pooled); None when they cannot pair up."""
        if not a or len(a) != len(b) or any(r is None for r in (*a, *b)) or len({len(r) for r in (*a, *b)}) != 1:
            return None
        return mcnemar(np.stack(a), np.stack(b))[2]


def significant(p: float | None) -> str:
    """The call of a p-value at ``SIGNIFICANCE``: ``yes``, ``no``, or ``-`` without one."""
    return NONE if p is None else ("yes" if p < SIGNIFICANCE else "no")
