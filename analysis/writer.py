"""The Markdown report as it is written: ``Writer`` collects text, tables and figures into a ``Report``;
the table and name formatting it uses."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.plots import save_figure
from analysis.significance import Significance
from compress.results import FINAL, STATE


@dataclass
class Report:
    """What ``build_report`` wrote: the Markdown file, its figures, its tables and a short summary."""

    path: Path
    figures: list[Path] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)


class Writer:
    """Collects Markdown, figures and tables while the sections are built."""

    def __init__(self, out: Path, sig: Significance | None = None) -> None:
        self.out = out
        self.sig = sig or Significance(None)
        self.lines: list[str] = []
        self.report = Report(path=out / "report.md")

    def text(self, *paragraphs: str) -> None:
        for p in paragraphs:
            self.lines.extend([p, ""])

    def table(self, name: str, df: pd.DataFrame, formats: dict[str, str] | None = None, note: str = "") -> None:
        self.report.tables[name] = df.reset_index(drop=True)
        if note:
            self.text(note)
        self.text(markdown_table(df, formats))

    def figure(self, fig, name: str, caption: str) -> None:
        stem, n = safe_name(name), 1
        while self.out / f"{stem}.png" in self.report.figures:  # two names that map to one file name
            n += 1
            stem = f"{safe_name(name)}-{n}"
        path = save_figure(fig, self.out / f"{stem}.png")
        self.report.figures.append(path)
        self.text(f"![{caption}]({path.name})")


def markdown_table(df: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """``df`` as a Markdown table; ``formats`` maps a column to a format spec (default: 2 decimals for floats).

    Missing values print as an empty cell. E.g. formats={"params": ","} writes 268336 as 268,336.
    """
    formats = formats or {}

    def cell(column: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return ""
        if column in formats:
            return format(v, formats[column])
        if isinstance(v, float | np.floating):
            return f"{v:.2f}"
        if isinstance(v, bool | np.bool_):
            return "yes" if v else "no"
        return str(v).replace("|", "\\|")

    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(c, v) for c, v in zip(df.columns, row, strict=True)) + " |")
    return "\n".join(lines)


def safe_name(text: str) -> str:
    """A file-name fragment: e.g. ``tune-prune/3 a`` -> ``tune-prune_3_a``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def weights_name(value: Any) -> str:
    """The weights file's name; a run's checkpoint keeps its run: ``prune-x/final.pt``."""
    if not value:
        return "(from scratch)"
    path = Path(str(value))
    return f"{path.parent.name}/{path.name}" if path.name in (FINAL, STATE) else path.name
