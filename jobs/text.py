"""What the commands print: one fixed-width table renderer and one error-line rule.

Every text table of the project (the per-module table of a prune run, the PTQ rows, ``status``'s
runs, searches and SLURM jobs) goes through ``table``; every "why did it fail" line (a SLURM job's
traceback or log, a Ray trial's exception, a submitit error) goes through ``error_line``. Metrics
live in Parquet; these are for eyes only (STYLE.md 7: never parse them).

Hand-written rather than ``rich.table``: the output is plain text that stays the same on a
terminal, in a SLURM log and under ``--json``-less pipes, and is 15 lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotation only: the CLI prints tables before torch is imported
    from compress.prune import ModuleRow


def table(rows: Sequence[Sequence[str]], right: Iterable[int] = (), rule: bool = False, total: bool = False,
          last_free: bool = False) -> str:
    """``rows[0]`` is the header; columns two spaces apart, left-aligned unless their index is in ``right``.

    ``rule``: a dashed line under the header (and above the last row with ``total``). ``last_free``:
    the last column is not padded (a long path). E.g. ``table([("a", "n"), ("xy", "10")], right={1})``
    is ``"a    n\\nxy  10"``.
    """
    right = set(right)
    ncol = len(rows[0])
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]
    if last_free:
        widths[-1] = 0

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    lines = [line(r) for r in rows]
    if rule:
        dash = "-" * max(len(ln) for ln in lines)
        lines.insert(1, dash)
        if total:
            lines.insert(len(lines) - 1, dash)
    return "\n".join(lines)


def format_modules(rows: list[ModuleRow]) -> str:
    """The per-module before/after table of a prune run, with a total line."""
    body = [(r.module, f"{r.params:,}", f"{r.nonzero_before:,}", f"{r.nonzero_after:,}", f"{r.removed:,}",
             f"{100 * r.sparsity:.2f}%") for r in rows]
    p = sum(r.params for r in rows)
    b = sum(r.nonzero_before for r in rows)
    a = sum(r.nonzero_after for r in rows)
    head = ("module", "params", "before", "after", "removed", "sparsity")
    total = ("total", f"{p:,}", f"{b:,}", f"{a:,}", f"{b - a:,}", f"{100 * (1 - a / p):.2f}%")
    if any(r.channels_after is not None for r in rows):  # a channel-pruned run: output channels kept
        head = (*head, "channels")
        body = [(*line, f"{r.channels_after}/{r.channels_before}" if r.channels_after is not None else "")
                for line, r in zip(body, rows, strict=True)]
        total = (*total, "")
    return table([head, *body, total], right=range(1, len(head)), rule=True, total=True)


# lines of a job log that say what went wrong (Python exceptions, SLURM's own kill messages)
_ERRORISH = re.compile(r"Error|error:|Killed|CANCELLED|DUE TO")


def error_line(error: BaseException | str | None, log: bool = False) -> str:
    """The one line that says why something failed ("" for nothing).

    An exception: ``Type: first line`` of its cause (Ray wraps a trial's exception; ``cause`` is the
    original). A traceback text: its last non-empty line (``compress.data.DataError: ...``). A log
    (``log=True``): the last line that looks like an error, else the last line.
    """
    if error is None:
        return ""
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None) or error
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[0] if text else ''}"
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    if log:
        lines = [ln for ln in lines if _ERRORISH.search(ln)] or lines
    return lines[-1] if lines else ""
