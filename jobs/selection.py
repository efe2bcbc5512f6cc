"""Choose one int8 row of a PTQ sweep to export, from a ``--select`` string (accuracy-aware tuning).

A sweep writes one row per int8 configuration; the user rarely wants "the best" without conditions,
so a selector is an objective plus constraints, comma-separated:

    best                        highest int8 top-1 (the default objective)
    smallest                    smallest packed file (rows without one are not candidates)
    max-drop=0.3                only rows whose int8 top-1 is at most 0.3 pp below their float top-1
    method=manual, alpha=0.99   only rows with these values (``-`` or ``none`` matches an empty value)

Worked example::

    >>> rows = [
    ...     dict(run_id="r1", method="manual", observer="histogram", weight_observer="per_channel",
    ...          calib_size=10000, alpha=0.99, center="min", engine="fbgemm", task="cifar10",
    ...          float_top1=90.34, int8_top1=90.17, int8_packed_bytes=52000),
    ...     dict(run_id="r1", method="fx", observer="minmax", weight_observer="per_tensor",
    ...          calib_size=1000, alpha=None, center=None, engine="fbgemm", task="cifar10",
    ...          float_top1=90.34, int8_top1=90.05, int8_packed_bytes=44167),
    ... ]
    >>> print(select_row(rows, parse_selector("best"), "r1").reason)  # doctest: +NORMALIZE_WHITESPACE
    best: highest int8 top-1 90.17% (float 90.34%, -0.17 pp) of 2 rows
    [manual histogram per_channel calib 10000 alpha 0.99 center min]
    >>> print(select_row(rows, parse_selector("smallest, max-drop=0.3"), "r1").reason)  # doctest: +NORMALIZE_WHITESPACE
    smallest: 44,167 B packed, the smallest of 2 rows within 0.3 pp of float (int8 90.05%, float 90.34%)
    [fx minmax per_tensor calib 1000]
    >>> select_row(rows, parse_selector("method=fx, alpha=-"), "r1").row["int8_top1"]
    90.05

Every mistake (in the selector, or a selector that leaves no row) is one ``ValueError`` line that
names what is wrong and what would be allowed, so the CLI can print it and exit without exporting.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

OBJECTIVES = ("best", "smallest")
COLUMNS = ("method", "observer", "weight_observer", "calib_size", "alpha", "center", "engine", "task")
NONE_VALUES = ("-", "none")
DROP_EPS = 1e-9  # float_top1 - int8_top1 picks up rounding noise; a row exactly at max-drop must stay
_ALLOWED = f"use best, smallest, max-drop=PP or COLUMN=VALUE with COLUMN one of {', '.join(COLUMNS)}"


@dataclass(frozen=True)
class Selector:
    """A parsed ``--select`` string: kept whole so the choice can be explained and recorded."""

    objective: str  # "best" | "smallest"
    max_drop: float | None
    filters: tuple[tuple[str, str], ...]
    text: str  # the selector as given


@dataclass(frozen=True)
class Choice:
    """The chosen row and why, so the user and the export manifest see the same one-line reason."""

    row: dict[str, Any]
    reason: str


def parse_selector(text: str) -> Selector:
    """Parse a selector up front, so a typo fails before any row is read or anything is exported."""
    if not text or not text.strip():
        raise ValueError(f"select: empty selector; {_ALLOWED}")
    objective: str | None = None
    max_drop: float | None = None
    filters: list[tuple[str, str]] = []
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            raise ValueError(f"select: empty term in '{text}'; {_ALLOWED}")
        if term in OBJECTIVES:
            if objective is not None:
                raise ValueError(f"select: objective given twice ('{objective}' and '{term}'); "
                                 f"give one of {', '.join(OBJECTIVES)}")
            objective = term
            continue
        if "=" not in term:
            raise ValueError(f"select: unknown term '{term}'; {_ALLOWED}")
        key, value = (s.strip() for s in term.split("=", 1))
        if key == "max-drop":
            if max_drop is not None:
                raise ValueError(f"select: max-drop given twice ('{term}'); give it once")
            max_drop = _parse_drop(value, term)
        elif key in COLUMNS:
            if any(k == key for k, _ in filters):
                raise ValueError(f"select: column '{key}' given twice ('{term}'); give each column once")
            if not value:
                raise ValueError(f"select: '{term}' has no value; use {key}=VALUE, or {key}=- for an empty one")
            filters.append((key, value))
        else:
            raise ValueError(f"select: unknown column '{key}' in '{term}'; {_ALLOWED}")
    return Selector(objective=objective or "best", max_drop=max_drop, filters=tuple(filters), text=text)


def _parse_drop(value: str, term: str) -> float:
    try:
        drop = float(value)
    except ValueError:
        drop = math.nan
    if not math.isfinite(drop) or drop < 0:
        raise ValueError(f"select: '{term}' needs a number of percentage points >= 0, e.g. max-drop=0.5")
    return drop


def describe(row: dict[str, Any]) -> str:
    """A short description of a row's configuration, to name it in a reason or an error."""
    parts = [str(row.get("method")), str(row.get("observer")), str(row.get("weight_observer")),
             f"calib {_fmt(row.get('calib_size'))}"]
    for col in ("alpha", "center"):
        if not _is_none(row.get(col)):
            parts.append(f"{col} {_fmt(row[col])}")
    return " ".join(parts)


def select_row(rows: list[dict[str, Any]], selector: Selector, run_id: str) -> Choice:
    """Pick the row the selector asks for; raise one ValueError line when no row qualifies."""
    if not rows:
        raise ValueError(f"run {run_id} has no rows to select from")
    cands = list(enumerate(rows))
    for i, (col, value) in enumerate(selector.filters):
        kept = [(j, r) for j, r in cands if _matches(r.get(col), value)]
        if not kept:
            raise ValueError(_no_match(rows, cands, selector, i, run_id))
        cands = kept
    scope = f"matching {_filters_text(selector)}" if selector.filters else ""

    if selector.max_drop is not None:
        kept = [(j, r) for j, r in cands if _drop(r) <= selector.max_drop + DROP_EPS]
        if not kept:
            _, closest = min(cands, key=lambda c: (_drop(c[1]), c[0]))
            where = f" {scope}" if scope else ""
            raise ValueError(f"no row of run {run_id}{where} is within {selector.max_drop:g} pp of its float top-1 "
                             f"(the closest: {describe(closest)}, {_drop(closest):.2f} pp below)")
        cands = kept
        scope = f"{scope} within {selector.max_drop:g} pp of float".strip()

    if selector.objective == "smallest":
        sized = [(j, r) for j, r in cands if not _is_none(r.get("int8_packed_bytes"))]
        if not sized:
            where = f" {scope}" if scope else ""
            raise ValueError(f"none of the {_rows(len(cands))} of run {run_id}{where} has a packed size "
                             "(int8_packed_bytes is empty); use best, or select rows with a packed file")
        _, row = min(sized, key=lambda c: (c[1]["int8_packed_bytes"], -c[1]["int8_top1"], c[0]))
        reason = (f"smallest: {int(row['int8_packed_bytes']):,} B packed, the smallest of "
                  f"{_rows(len(sized))}{' ' + scope if scope else ''} "
                  f"(int8 {row['int8_top1']:.2f}%, float {row['float_top1']:.2f}%) [{describe(row)}]")
    else:
        _, row = min(cands, key=lambda c: (-c[1]["int8_top1"], *_size_key(c[1]), c[0]))
        diff = round(row["int8_top1"] - row["float_top1"], 2) + 0.0  # + 0.0: no "-0.00"
        reason = (f"best: highest int8 top-1 {row['int8_top1']:.2f}% (float {row['float_top1']:.2f}%, "
                  f"{diff:+.2f} pp) of {_rows(len(cands))}{' ' + scope if scope else ''} [{describe(row)}]")
    return Choice(row=row, reason=reason)


def _no_match(rows: list[dict[str, Any]], cands: list[tuple[int, dict[str, Any]]], selector: Selector,
              i: int, run_id: str) -> str:
    """Name the first filter column that matched nothing and the values it could have taken.

    A filter that matches no row of the run lists the run's values; one that only fails in
    combination with the filters before it lists the values left by those filters.
    """
    head = f"select '{selector.text}' matches none of the {_rows(len(rows))} of run {run_id}"
    for col, value in selector.filters:
        if not any(_matches(r.get(col), value) for r in rows):
            return f"{head}; {col} values: {_values(rows, col)}"
    col = selector.filters[i][0]
    before = ", ".join(f"{k}={v}" for k, v in selector.filters[:i])
    return f"{head}; {col} values with {before}: {_values([r for _, r in cands], col)}"


def _matches(cell: Any, value: str) -> bool:
    """Numbers compare numerically (alpha=1 matches 1.0), strings exactly, ``-``/``none`` match None."""
    if value.lower() in NONE_VALUES:
        return _is_none(cell)
    if _is_none(cell):
        return False
    if isinstance(cell, numbers.Real) and not isinstance(cell, bool):
        try:
            wanted = float(value)
        except ValueError:
            return False
        return math.isclose(float(cell), wanted, rel_tol=1e-9, abs_tol=1e-12)
    return str(cell) == value


def _is_none(cell: Any) -> bool:
    # a row read back through pandas may carry NaN where the sweep wrote None
    return cell is None or (isinstance(cell, float) and math.isnan(cell))


def _drop(row: dict[str, Any]) -> float:
    return float(row["float_top1"]) - float(row["int8_top1"])


def _size_key(row: dict[str, Any]) -> tuple[bool, float]:
    size = row.get("int8_packed_bytes")
    return (True, 0.0) if _is_none(size) else (False, float(size))


def _fmt(v: Any) -> str:
    if _is_none(v):
        return "-"
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return str(int(v))
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return f"{float(v):g}"
    return str(v)


def _values(rows: list[dict[str, Any]], col: str) -> str:
    def key(v: Any) -> tuple[int, float, str]:
        if _is_none(v):
            return (2, 0.0, "")
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            return (0, float(v), "")
        return (1, 0.0, str(v))

    shown: list[str] = []
    for v in sorted((r.get(col) for r in rows), key=key):
        if _fmt(v) not in shown:
            shown.append(_fmt(v))
    return ", ".join(shown)


def _filters_text(selector: Selector) -> str:
    return ", ".join(f"{k}={v}" for k, v in selector.filters)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"
