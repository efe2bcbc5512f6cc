"""Offline report from the Parquet result tables: Markdown tables with PNG plots beside them.

    python -m jobs.launch report results --out results/report
    python -m jobs.launch report ~/copied/results --out /tmp/report --search tune-prune-20250101-120000
    python -m jobs.launch report results --out r --kind prune --model resnet20a --run 'prune-2025*'
    python -m jobs.launch report results --out r --data-root ../shared/data    # with intervals and p-values

Only the tables under a results root are read (``phases/``, ``epochs/``, ``modules/``, ``ptq/``):
a results folder copied off the cluster is enough, without checkpoints, SLURM, a GPU or torch.
Everything here runs on the CPU (pandas, and matplotlib with the Agg backend). A section is written
for each kind of result that has rows after filtering:

- pruning: one line per run; per run, its phases, the loss across phases and epochs and the
  per-module before/after table; top-1 against sparsity for every phase of every run and trial with
  the Pareto front over all of them and the dense starting model drawn as a line;
- PTQ: int8 top-1 against calibration size per observer, against alpha per center (the alpha
  table), float against int8 per model, and the model sizes (float, int8, packed sparse int8);
- searches: the best trials and the effect of each searched spec field on the objective.

The values in the Markdown tables are the values of the rows (top-1 and sparsity in percent, shown
with two decimals); ``Report.tables`` holds the same tables unformatted, as DataFrames.

Decided by significance, not by digits: given the test labels (``labels``, the CLI's ``--data-root``),
each top-1 of a row that keeps its predicted classes gets a 95% bootstrap interval over the test
images, int8 is tested against its float model, and each configuration (runs paired by seed) or
search trial against the best one, by the exact McNemar test (``analysis.stats``). At 90% on 10,000
images the interval is about +-0.59 points, wider than most seed-to-seed differences. Rows written
before predictions were kept show ``-`` there.

This module puts the report together (``build_report``); ``analysis.load`` reads and filters the tables,
``analysis.prune_sections``, ``analysis.ptq_sections`` and ``analysis.search_sections`` write the sections
through ``analysis.writer``, with ``analysis.significance`` for the intervals and p-values and
``analysis.plots`` for the figures.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.load import NO_FILTERS, Filters, ReportError, first_few, load_tables
from analysis.prune_sections import prune_section
from analysis.ptq_sections import ptq_section
from analysis.search_sections import search_section
from analysis.significance import CI, Significance
from analysis.writer import Report, Writer
from compress.results import atomic_write_bytes

log = logging.getLogger(__name__)


def _provenance(w: Writer, tables: dict[str, pd.DataFrame]) -> None:
    rows = pd.concat([df.assign(table=name) for name, df in tables.items()], ignore_index=True)
    if "git_commit" not in rows:
        return
    g = rows.groupby(rows["git_commit"].fillna("").str[:10], dropna=False)
    prov = pd.DataFrame({"rows": g.size(), "runs": g["run_id"].nunique(),
                         "uncommitted changes": g["git_dirty"].any() if "git_dirty" in rows else False,
                         "hosts": g["host"].agg(lambda h: ", ".join(sorted(set(h.dropna()))[:4])),
                         "jobs": g["job_id"].nunique(),
                         "first written": g["written_at"].min().dt.strftime("%Y-%m-%d %H:%M"),
                         "last written": g["written_at"].max().dt.strftime("%Y-%m-%d %H:%M")}).reset_index()
    w.text("## Provenance")
    w.table("provenance", prov.rename(columns={"git_commit": "git commit"}))


def _significance_note(labels: np.ndarray | None) -> str:
    """How to read the interval and p-value columns (or why they are empty)."""
    if labels is None:
        return ("Intervals and p-values: not computed, the test labels were not given (`--data-root DIR` or "
                "`COMPRESS_DATA`); those cells show -.")
    return (f"{CI}: percentile bootstrap interval of top-1 over the test images (10,000 resamples, seed 0): how far "
            "the top-1 could move on another test set of the same size (not from seed to seed: see the spread). "
            "p: exact two-sided McNemar test on the images exactly one of the two models gets right (runs paired "
            "by seed and pooled); significant at 0.05: p < 0.05 (among many comparisons of equal models, one in "
            "twenty falls below it by chance). -: the row keeps no predictions (written before they were kept), "
            "or there is nothing to pair.")


def build_report(root: str | os.PathLike, out: str | os.PathLike, filters: Filters = NO_FILTERS,
                 max_drop: float = 1.5, spec_defaults: Mapping[str, Mapping[str, Any]] | None = None,
                 objective: Callable[[dict[str, Any]], float] | None = None,
                 labels: np.ndarray | None = None) -> Report:
    """Read the tables under ``root``, write ``out/report.md`` and its PNGs; returns what was written.

    ``labels``: the CIFAR-10 test labels in test-set order (``compress.data.load_test_labels``). With
    them, every top-1 of a row that keeps its predictions gets a 95% bootstrap interval, int8 is tested
    against its float model and each configuration or trial against the best one (exact McNemar);
    without them, or for rows written before predictions were kept, those cells show ``-``.

    ``objective`` scores a prune search's trial from its last phase row (the search's own objective,
    ``sweeps.search.prune_score`` with ``max_drop``, handed in by the caller so analysis does not import
    the searches); ``max_drop`` is shown beside it. Without it, trials rank by top-1.
    ``spec_defaults``: see ``load_tables``.
    """
    objective = objective or (lambda row: float(row["top1"]))
    tables = load_tables(root, filters, spec_defaults)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create the report folder {out}: {e.strerror}") from e
    if not os.access(out, os.W_OK):
        raise ReportError(f"cannot write to the report folder {out}")
    w = Writer(out, Significance(labels))
    counts = ", ".join(f"{name} {len(df):,}" for name, df in tables.items())
    w.text("# Compression results",
           f"Results: `{Path(root).resolve()}`, filters: {filters.describe()}, rows: {counts}. "
           f"Written {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Top-1 is the test-set accuracy "
           "(of the first N test images where a run used a test subset); sparsity counts the zero weights of "
           "every conv and linear layer.",
           _significance_note(labels))
    summary: list[str] = [f"read {counts} rows from {root} (filters: {filters.describe()})"]
    prune_section(w, tables, summary)
    ptq_section(w, tables.get("ptq"), summary)
    search_section(w, tables, summary, max_drop, objective)
    if w.sig.mismatched:
        names = sorted(w.sig.mismatched)
        line = (f"the predictions of {len(names)} row(s) do not give their top-1 against the test labels given "
                f"(labels of another data set?); their intervals and p-values show -: {first_few(names)}")
        log.warning(line)
        summary.append(line)
        w.text(f"Note: {line}.")
    _provenance(w, tables)
    atomic_write_bytes(w.report.path, "\n".join(w.lines).encode())
    summary.append(f"report: {w.report.path} ({len(w.report.figures)} figures, {len(w.report.tables)} tables)")
    w.report.summary = summary
    return w.report


__all__ = ["Filters", "Report", "ReportError", "build_report"]
