"""Sparsity schedules: the target after each prune/retrain phase, a pure function of the phase.

No torch here: specs validate and plan a schedule (and the CLI lists the schedules) before torch loads.
"""

from __future__ import annotations

from collections.abc import Callable


def _linear(final: float, initial: float, t: float) -> float:
    return initial + (final - initial) * t


def _geometric(final: float, initial: float, t: float) -> float:
    # the kept fraction shrinks by the same factor each phase: 12 phases to 0.92 keep 81% a phase
    return 1 - (1 - initial) * ((1 - final) / (1 - initial)) ** t


def _cubic(final: float, initial: float, t: float) -> float:
    # gradual pruning (Zhu & Gupta 2017): prune fast while many weights are redundant, then slow
    return final + (initial - final) * (1 - t) ** 3


SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "linear": _linear,
    "geometric": _geometric,
    "cubic": _cubic,
}


def phase_targets(final: float, phases: int, schedule: str = "geometric", initial: float = 0.0) -> list[float]:
    """Target sparsity after each of ``phases`` phases; the last is exactly ``final``.

    E.g. final 0.5, 2 phases: linear [0.25, 0.5]; geometric [0.2929, 0.5]; cubic [0.4375, 0.5].
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if phases < 1:
        raise ValueError(f"phases must be >= 1, got {phases}")
    if not 0.0 <= initial <= final < 1.0:
        raise ValueError(f"need 0 <= initial ({initial}) <= final ({final}) < 1")
    f = SCHEDULES[schedule]
    return [final if p == phases else f(final, initial, p / phases) for p in range(1, phases + 1)]
