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
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis.stats import bootstrap_interval, mcnemar
from compress.results import atomic_write_bytes, read_table

log = logging.getLogger(__name__)

TABLES = ("phases", "epochs", "modules", "ptq")
# a row is identified by these columns; a file rewritten under another name must not count twice
ROW_KEYS = {"phases": ("run_id", "phase"), "epochs": ("run_id", "phase", "epoch"), "modules": ("run_id", "module"),
            "ptq": ("run_id", "task", "method", "observer", "weight_observer", "calib_size", "alpha", "center")}
# spec fields that differ between every run by construction, never a searched parameter
NOT_SEARCHED = ("spec_run_id", "spec_results")
DPI = 110


class ReportError(ValueError):
    """Nothing to report (missing folder, no rows, a filter matching nothing): one line for the user."""


@dataclass(frozen=True)
class Filters:
    """Which rows to report: shell patterns on run id and search id, exact model and kind names.

    An empty tuple keeps everything; several values of one filter are alternatives (OR), different
    filters must all hold (AND). E.g. ``Filters(runs=("prune-*",), models=("resnet20a",))``.
    """

    runs: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"{name}={','.join(values)}" for name, values in
                 (("run", self.runs), ("search", self.searches), ("model", self.models), ("kind", self.kinds))
                 if values]
        return " ".join(parts) or "none"

    def mask(self, df: pd.DataFrame) -> pd.Series:
        """Rows of ``df`` that pass every filter."""
        keep = pd.Series(True, index=df.index)
        for column, patterns, glob in (("run_id", self.runs, True), ("search_id", self.searches, True),
                                       ("spec_model", self.models, False), ("kind", self.kinds, False)):
            if not patterns:
                continue
            values = df[column].fillna("").astype(str) if column in df else pd.Series("", index=df.index)
            if glob:
                keep &= values.map(lambda v, p=patterns: any(fnmatch.fnmatchcase(v, x) for x in p))
            else:
                keep &= values.isin(patterns)
        return keep


@dataclass
class Report:
    """What ``build_report`` wrote: the Markdown file, its figures, its tables and a short summary."""

    path: Path
    figures: list[Path] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# reading


def load_tables(root: str | os.PathLike, filters: Filters = Filters(),
                spec_defaults: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
    """Every table under ``root`` that has rows passing ``filters`` (absent tables are left out).

    ``spec_defaults`` (kind -> ``spec_<field>`` -> default) fills the spec columns of rows written
    before that field existed, so an old run and a new one with the same settings are one
    configuration. Raises ``ReportError`` when the folder is missing, holds no results, or no row passes.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"results folder {root} does not exist")
    found: dict[str, pd.DataFrame] = {}
    for name in TABLES:
        try:
            df = read_table(root, name).to_pandas()
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowException) as e:  # a damaged file, or one of another schema
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ReportError(f"cannot read the {name} table under {root}: {first[:200]}") from e
        if "kind" not in df:
            df["kind"] = name
        for column in ("search_id", "trial_id"):
            if column not in df:
                df[column] = ""
            df[column] = df[column].fillna("")
        for kind, defaults in (spec_defaults or {}).items():
            rows = df["kind"] == kind
            for column, value in defaults.items():
                if column in df and (missing := rows & df[column].isna()).any():
                    df[column] = df[column].astype(object)
                    df.loc[missing, column] = value
        if "written_at" in df and set(ROW_KEYS[name]) <= set(df.columns):
            df = df.sort_values("written_at", kind="stable").drop_duplicates(list(ROW_KEYS[name]), keep="last")
        found[name] = df.reset_index(drop=True)
        log.debug("read %d %s rows under %s", len(df), name, root)
    if not any(len(df) for df in found.values()):
        raise ReportError(f"no results under {root}: no Parquet rows in {', '.join(f'{t}/' for t in TABLES)}")
    kept = {name: df[filters.mask(df)].reset_index(drop=True) for name, df in found.items()}
    kept = {name: df for name, df in kept.items() if len(df)}
    if not kept:
        runs = sorted({r for df in found.values() for r in df["run_id"].dropna().unique()})
        searches = sorted({s for df in found.values() for s in df["search_id"].unique() if s})
        kinds = sorted({k for df in found.values() for k in df["kind"].dropna().unique()})
        models = sorted({m for df in found.values() if "spec_model" in df for m in df["spec_model"].dropna().unique()})
        raise ReportError(f"no results under {root} match {filters.describe()} (there: {len(runs)} runs "
                          f"{_few(runs)}; searches {_few(searches)}; models {_few(models)}; kinds {_few(kinds)})")
    return kept


def _few(values: Sequence[str], n: int = 4) -> str:
    if not values:
        return "none"
    return ", ".join(values[:n]) + (f", ... ({len(values) - n} more)" if len(values) > n else "")


# ----------------------------------------------------------------------------------------------------
# pure helpers


def pareto_front(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Mask of the points no other point beats in both ``x`` and ``y`` (both maximised).

    E.g. (sparsity, top-1) = (0.5, 90), (0.8, 88), (0.8, 85), (0.6, 87) -> True, True, False, False:
    (0.8, 85) loses to (0.8, 88) and (0.6, 87) to (0.8, 88). Of identical points only the first counts.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.lexsort((-y, -x))  # x descending, then y descending
    mask = np.zeros(len(x), dtype=bool)
    best = -math.inf
    for i in order:
        if y[i] > best:
            mask[i] = True
            best = y[i]
    return mask


def varying_spec_columns(df: pd.DataFrame) -> list[str]:
    """The ``spec_<field>`` columns with more than one value among ``df``'s rows: a search's parameters."""
    return [c for c in df.columns if c.startswith("spec_") and c not in NOT_SEARCHED
            and df[c].map(lambda v: "" if pd.isna(v) else str(v)).nunique() > 1]


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


# ----------------------------------------------------------------------------------------------------
# intervals and paired tests (analysis.stats) from the predictions the rows keep


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


# ----------------------------------------------------------------------------------------------------
# plotting helpers (matplotlib's Agg backend: no display needed)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(title: str, ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.4):
    """A titled figure with a grid of axes (always a 2-D array of axes)."""
    plt = _plt()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    fig.suptitle(title, fontsize=12)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    return fig, axes


def label_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def baseline(ax, y: float, label: str, color: str = "0.35") -> None:
    """A horizontal dashed line (the dense or float model) with its value in the label."""
    ax.axhline(y, color=color, linestyle="--", linewidth=1.2, label=label, zorder=1)


def legend(ax, n_max: int = 14) -> None:
    """A legend of at most ``n_max`` entries in a small font, where it hides the least data."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) > n_max:
        handles, labels = handles[:n_max], labels[:n_max - 1] + [f"... {len(handles) - n_max + 1} more"]
    ax.legend(handles, labels, fontsize=8, loc="best", framealpha=0.85)


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG and free it."""
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def value_ticks(ax, x: np.ndarray, max_ticks: int = 8, fmt: str = "g") -> None:
    """x axis for a numeric field: log scale over a wide positive range (e.g. lr 1e-4..1e-2, 100x),
    and the values themselves as ticks (``g`` format) when there are few of them."""
    finite = np.unique(x[np.isfinite(x)])
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() >= 20:
        ax.set_xscale("log")
    if 0 < len(finite) <= max_ticks:
        ax.minorticks_off()
        ax.set_xticks(finite, [format(v, fmt) for v in finite], rotation=30 if len(finite) > 4 else 0)
    else:
        ax.xaxis.set_major_formatter(_plt().FuncFormatter(lambda v, _: f"{v:g}"))


def categorical_positions(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """x positions 0..k-1 for the sorted distinct values and their tick labels."""
    labels = sorted(values.astype(str).unique(), key=_natural_key)
    index = {v: i for i, v in enumerate(labels)}
    return values.astype(str).map(index).to_numpy(dtype=float), labels


def _natural_key(text: str) -> tuple:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


# ----------------------------------------------------------------------------------------------------
# the report


class _Writer:
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


PCT = "top-1 (%)"
INT_FORMATS = {"params": ",", "nonzero before": ",", "nonzero after": ",", "removed": ","}


def _weights_name(value: Any) -> str:
    """The weights file's name; a run's checkpoint keeps its run: ``prune-x/final.pt``."""
    if not value:
        return "(from scratch)"
    path = Path(str(value))
    return f"{path.parent.name}/{path.name}" if path.name in ("final.pt", "state.pt") else path.name


def _run_table(phases: pd.DataFrame, sig: Significance) -> pd.DataFrame:
    """One line per run: how far it got and where it ended."""
    rows = []
    for run_id, g in phases.groupby("run_id", sort=True):
        g = g.sort_values("phase")
        first, last = g.iloc[0], g.iloc[-1]
        planned = last.get("spec_phases")
        planned = int(planned) if last["kind"] == "prune" and pd.notna(planned) else 1
        rows.append({
            "run": run_id, "kind": last["kind"], "model": last.get("spec_model", ""),
            "search": last["search_id"], "seed": last.get("spec_seed"),
            "phases done": f"{int(last['phase'])}/{planned}",
            "start top-1 (%)": first["top1"] if first["phase"] == 0 else float("nan"),
            "final sparsity (%)": 100 * last["sparsity"], "final top-1 (%)": last["top1"],
            f"final {CI}": sig.interval([sig.correct(last)]),
            "change (pp)": last["top1"] - first["top1"] if first["phase"] == 0 else float("nan"),
            "train time (min)": g["train_seconds"].sum() / 60, "job": last.get("job_id", ""),
        })
    return pd.DataFrame(rows)


# spec fields that do not change what a run computes, or differ per run by construction: not part of a configuration
NOT_CONFIGURATION = (*NOT_SEARCHED, "spec_seed", "spec_data_root", "spec_device", "spec_eval_every_epoch",
                     "spec_eval_batch_size")


def configuration_table(phases: pd.DataFrame, labels: np.ndarray | None = None) -> pd.DataFrame:
    """Finished prune runs grouped by their spec less the seed: one line per configuration, best first.

    A configuration is named by the spec fields that differ between configurations. Its top-1 is the
    mean over its runs (seeds), with the min, max and spread; the drop is from the starting (phase 0)
    top-1. Best first: the highest final sparsity (to 0.01%), then the highest mean top-1.

    With the test ``labels`` and the rows' predictions: the 95% interval of the mean top-1 over the
    test images, and each configuration against the best one: its runs paired with the best's by seed
    (seed 0 with seed 0; seeds only one side ran are left out), pooled in one exact McNemar test.
    """
    sig = Significance(labels)
    prune = phases[phases["kind"] == "prune"]
    finals = []
    for _run_id, g in prune.groupby("run_id", sort=True):
        g = g.sort_values("phase")
        last = g.iloc[-1]
        if pd.isna(last.get("spec_phases")) or int(last["phase"]) != int(last["spec_phases"]):
            continue  # unfinished: it would compare an intermediate sparsity
        start = g.iloc[0]["top1"] if g.iloc[0]["phase"] == 0 else float("nan")
        finals.append({**last.to_dict(), "start_top1": start, "total_epochs": int(g["epochs"].sum()),
                       "total_train_seconds": float(g["train_seconds"].sum()), "_correct": sig.correct(last)})
    if not finals:
        return pd.DataFrame()
    runs = pd.DataFrame(finals)
    # weights by file name (one file copied elsewhere is one configuration); no teacher given: "-"
    if "spec_weights" in runs:
        runs["spec_weights"] = runs["spec_weights"].map(lambda v: _weights_name("" if pd.isna(v) else v))
    if "spec_teacher" in runs:
        runs["spec_teacher"] = runs["spec_teacher"].map(lambda v: _weights_name(v) if isinstance(v, str) and v else "-")
    keys = [c for c in runs.columns if c.startswith("spec_") and c not in NOT_CONFIGURATION]
    runs["_key"] = runs[keys].apply(lambda r: tuple("" if pd.isna(v) else str(v) for v in r), axis=1)
    named = [c for c in keys if runs.groupby("_key")[c].first().map(str).nunique() > 1]
    out, by_seed = [], []
    for _key, g in runs.groupby("_key", sort=False):
        first = g.iloc[0]
        top = g["top1"]
        g = g.sort_values(["spec_seed", "run_id"], kind="stable")
        by_seed.append({seed: list(s["_correct"]) for seed, s in g.groupby("spec_seed", sort=True)})
        out.append({
            "configuration": ", ".join(f"{c[5:]}={first[c]}" for c in named) or "(all runs share one spec)",
            "runs": len(g), "seeds": ",".join(str(int(v)) for v in sorted(g["spec_seed"])),
            "epochs": int(first["total_epochs"]), "sparsity (%)": 100 * g["sparsity"].mean(),
            "top-1 mean (%)": top.mean(), CI: sig.interval(list(g["_correct"])), "top-1 min (%)": top.min(),
            "top-1 max (%)": top.max(), "spread (pp)": top.max() - top.min(),
            "drop (pp)": (g["start_top1"] - top).mean(), "train time (min)": g["total_train_seconds"].mean() / 60,
        })
    table = pd.DataFrame(out)
    order = table.assign(_s=table["sparsity (%)"].round(2)).sort_values(["_s", "top-1 mean (%)"],
                                                                         ascending=False, kind="stable")
    best = by_seed[order.index[0]]
    paired, ps = [], []
    for i in order.index:
        seeds = sorted(set(by_seed[i]) & set(best))
        a = [r for s in seeds for r in by_seed[i][s][:len(best[s])]]  # the k-th run of a seed with the k-th
        b = [r for s in seeds for r in best[s][:len(by_seed[i][s])]]
        paired.append(",".join(str(int(s)) for s in seeds) if i != order.index[0] else "(best)")
        ps.append(Significance.paired(a, b) if i != order.index[0] else None)
    order = order.assign(**{"seeds paired with best": paired, "p vs best": [format_p(p) for p in ps],
                            "significant at 0.05": [significant(p) for p in ps]})
    return order.drop(columns="_s").reset_index(drop=True)


def _curve(run_phases: pd.DataFrame, run_epochs: pd.DataFrame | None) -> pd.DataFrame:
    """Per-epoch points of one run on one x axis: epochs counted across phases, phase 0 at x = 0.

    E.g. 2 phases of 3 epochs: phase 1 epochs at x = 1, 2, 3 and phase 2 epochs at x = 4, 5, 6. Without
    an epochs table the phase rows alone give one point at the end of each phase.
    """
    run_phases = run_phases.sort_values("phase")
    start = {}
    x = 0
    for r in run_phases.itertuples():
        start[r.phase] = x
        x += int(r.epochs)
    points = [{"x": 0, "phase": 0, "train_loss": np.nan, "test_loss": p0.test_loss, "top1": p0.top1,
               "train_acc": np.nan} for p0 in run_phases[run_phases["phase"] == 0].itertuples()]
    if run_epochs is not None and len(run_epochs):
        for e in run_epochs.sort_values(["phase", "epoch"]).itertuples():
            if e.phase in start:
                points.append({"x": start[e.phase] + e.epoch, "phase": e.phase, "train_loss": e.train_loss,
                               "test_loss": e.test_loss, "top1": e.top1, "train_acc": e.train_acc})
    else:
        for r in run_phases[run_phases["phase"] > 0].itertuples():
            points.append({"x": start[r.phase] + r.epochs, "phase": r.phase, "train_loss": r.train_loss,
                           "test_loss": r.test_loss, "top1": r.top1, "train_acc": r.train_acc})
    return pd.DataFrame(points, columns=["x", "phase", "train_loss", "test_loss", "top1", "train_acc"])


def _phase_bounds(ax, run_phases: pd.DataFrame) -> None:
    """Dotted vertical lines where each phase starts, labelled on the top axis with the phase and its sparsity."""
    x, starts, labels = 0, [], []
    for r in run_phases.sort_values("phase").itertuples():
        if r.phase > 0:
            ax.axvline(x, color="0.6", linestyle=":", linewidth=1)
            starts.append(x)
            labels.append(f"p{r.phase}: {100 * r.sparsity:.0f}%")
        x += int(r.epochs)
    if starts:
        top = ax.secondary_xaxis("top")
        top.set_xticks(starts, labels, fontsize=7, rotation=30 if len(starts) > 6 else 0)
        top.tick_params(length=0, colors="0.35")


def _plot_series(ax, x: pd.Series, y: pd.Series, **kwargs: Any) -> None:
    ok = y.notna()
    if ok.any():
        ax.plot(x[ok], y[ok], marker="o", markersize=3, **kwargs)


def _loss_figure(w: _Writer, name: str, title: str, runs: list[tuple[str, pd.DataFrame, pd.DataFrame | None]]) -> None:
    """Loss (left) and top-1 (right) against epochs across phases for one or more runs."""
    fig, axes = new_figure(title, ncols=2)
    ax_loss, ax_acc = axes[0]
    colors = _plt().get_cmap("tab10")
    single = len(runs) == 1
    for i, (run_id, ph, ep) in enumerate(runs):
        c = _curve(ph, ep)
        color = colors(i % 10)
        tag = "" if single else f" {run_id}"
        _plot_series(ax_loss, c["x"], c["train_loss"], color=color if not single else "tab:blue",
                     linestyle="--", label="train" if single else None)
        _plot_series(ax_loss, c["x"], c["test_loss"], color=color if not single else "tab:orange",
                     label=f"test{tag}" if single else run_id)
        _plot_series(ax_acc, c["x"], c["top1"], color=color if not single else "tab:orange", label=f"test{tag}")
        if single:
            _plot_series(ax_acc, c["x"], c["train_acc"], color="tab:blue", linestyle="--", label="train")
    first = runs[0][1]
    layouts = {tuple(zip(ph["phase"], ph["epochs"], strict=True)) for _, ph, _ in runs}
    if len(layouts) == 1:  # the runs share their phases: mark where each starts
        _phase_bounds(ax_loss, first)
        _phase_bounds(ax_acc, first)
    dense = first[first["phase"] == 0]
    if len(dense) and first["kind"].iloc[0] == "prune":
        baseline(ax_acc, float(dense["top1"].iloc[0]), f"dense start {float(dense['top1'].iloc[0]):.2f}%")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(_plt().MaxNLocator(integer=True))
    xlabel = "epoch (counted across phases; phase 0 = start)"
    label_axes(ax_loss, "cross-entropy loss" + ("" if single else " (solid: test, dashed: train)"), xlabel,
               "loss (nats/image)")
    label_axes(ax_acc, "accuracy", xlabel, "accuracy (%)")
    legend(ax_loss)
    legend(ax_acc)
    w.figure(fig, name, title)


def _dense_baselines(phases: pd.DataFrame, sig: Significance) -> pd.DataFrame:
    """Phase-0 top-1 of the prune runs per (model, weights, test subset): the dense starting models."""
    p0 = phases[(phases["phase"] == 0) & (phases["kind"] == "prune")].copy()
    if not len(p0):
        return pd.DataFrame(columns=["model", "weights", "test images", "runs", "top-1 (%)", CI])
    p0["weights_name"] = p0["spec_weights"].map(_weights_name)
    g = p0.groupby(["spec_model", "weights_name", "spec_test_size"], dropna=False)
    out = g.agg(runs=("run_id", "nunique"), top1=("top1", "mean")).reset_index()
    out[CI] = [sig.interval([sig.correct(r) for r in rows.to_dict("records")]) for _, rows in g]
    out["spec_test_size"] = out["spec_test_size"].map(lambda n: "all" if not n or pd.isna(n) else f"first {int(n)}")
    return out.rename(columns={"spec_model": "model", "weights_name": "weights", "spec_test_size": "test images",
                               "top1": PCT})


def _sparsity_section(w: _Writer, phases: pd.DataFrame) -> None:
    """Top-1 against sparsity: every phase of every prune run, Pareto front per model, dense lines."""
    prune = phases[phases["kind"] == "prune"]
    if not len(prune):
        return
    w.text("### Top-1 against sparsity",
           "Every evaluated phase of every run and trial is a point (each run a line, its last phase a large "
           "marker). The Pareto front is taken over all of those points, phase 0 included, per model: each is a "
           "model that was evaluated on the test set after its retraining, though only a run's last phase is "
           "kept as a checkpoint. Dashed lines: the dense starting models (phase 0).")
    bases = _dense_baselines(phases, w.sig)
    w.table("dense_baselines", bases, note="Dense starting models (phase 0 of the prune runs):")
    plt = _plt()
    for model, g in prune.groupby("spec_model", sort=True):
        fig, axes = new_figure(f"top-1 against sparsity, {model}", width=8, height=5.5)
        ax = axes[0, 0]
        runs = sorted(g["run_id"].unique())
        colors = plt.get_cmap("tab10" if len(runs) <= 10 else "viridis")
        front = g[pareto_front(g["sparsity"], g["top1"])].sort_values("sparsity")
        # points far below the front (a diverged trial) would squash it: they sit on the bottom edge as triangles
        model_bases = bases.loc[bases["model"] == model, PCT]
        span = max(front["top1"].max(), model_bases.max() if len(model_bases) else -math.inf) - front["top1"].min()
        bottom = front["top1"].min() - max(3.0, 0.3 * span)
        for i, run_id in enumerate(runs):
            r = g[g["run_id"] == run_id].sort_values("phase")
            color = colors(i % 10) if len(runs) <= 10 else colors(i / max(1, len(runs) - 1))
            label = (r["trial_id"].iloc[0] or run_id) if len(runs) <= 10 else None
            ax.plot(100 * r["sparsity"], r["top1"], marker="o", markersize=3, linewidth=0.8, alpha=0.7,
                    color=color, label=label)
            ax.plot(100 * r["sparsity"].iloc[-1], r["top1"].iloc[-1], marker="o", markersize=8, color=color)
            low = r[r["top1"] < bottom]
            ax.plot(100 * low["sparsity"], np.full(len(low), bottom), linestyle="none", marker="v", markersize=7,
                    color=color, clip_on=False)
        ax.plot(100 * front["sparsity"], front["top1"], color="black", linewidth=1.5, label="Pareto front")
        ax.plot(100 * front["sparsity"], front["top1"], linestyle="none", marker="*", markersize=13,
                color="gold", markeredgecolor="black", zorder=5)
        for b in bases[bases["model"] == model].to_dict("records"):
            baseline(ax, b[PCT], f"dense {b['weights']}, {b['test images']} test images: {b[PCT]:.2f}%")
        clipped = int((g["top1"] < bottom).sum())
        if clipped:
            ax.set_ylim(bottom=bottom)
        label_axes(ax, f"{len(runs)} run(s); stars: Pareto front"
                   + (f"; {clipped} point(s) below {bottom:.1f}% drawn as triangles on the bottom edge" if clipped
                      else ""), "sparsity of conv+linear weights (%)", "test top-1 (%)")
        legend(ax)
        w.figure(fig, f"top1_vs_sparsity_{model}", f"top-1 against sparsity, {model}")
        last = g.groupby("run_id")["phase"].max()
        table = pd.DataFrame({"sparsity (%)": 100 * front["sparsity"], PCT: front["top1"],
                              CI: [w.sig.interval([w.sig.correct(r)]) for r in front.to_dict("records")],
                              "run": front["run_id"], "phase": front["phase"],
                              "last phase": [p == last[r] for r, p in zip(front["run_id"], front["phase"],
                                                                          strict=True)]})
        w.table(f"pareto:{model}", table, note=f"Pareto front, {model}:")


def _run_details(w: _Writer, run_id: str, phases: pd.DataFrame, epochs: pd.DataFrame | None,
                 modules: pd.DataFrame | None) -> None:
    """One run: its phase table, the loss across phases and epochs, its per-module table."""
    ph = phases[phases["run_id"] == run_id].sort_values("phase")
    last = ph.iloc[-1]
    ep = epochs[epochs["run_id"] == run_id] if epochs is not None else None
    w.text(f"### Run {run_id}",
           f"{last['kind']} of {last.get('spec_model', '')} from {_weights_name(last.get('spec_weights'))}, "
           f"seed {last.get('spec_seed')}, {last.get('spec_optimizer', '')} lr {last.get('spec_lr')}, "
           + (f"schedule {last.get('spec_schedule')} to {100 * last.get('spec_final_sparsity', 0):.1f}%, "
              if last["kind"] == "prune" else "")
           + f"job {last.get('job_id', '')} on {last.get('host', '')}, commit {str(last.get('git_commit', ''))[:10]}")
    table = pd.DataFrame({
        "phase": ph["phase"], "target sparsity (%)": 100 * ph["target_sparsity"], "sparsity (%)": 100 * ph["sparsity"],
        PCT: ph["top1"], CI: [w.sig.interval([w.sig.correct(r)]) for r in ph.to_dict("records")],
        "test loss": ph["test_loss"], "train loss": ph["train_loss"],
        "train acc (%)": ph["train_acc"], "epochs": ph["epochs"], "train time (s)": ph["train_seconds"]})
    w.table(f"phases:{run_id}", table, {"test loss": ".4f", "train loss": ".4f", "train time (s)": ".1f"})
    _loss_figure(w, f"loss_{run_id}", f"loss across phases and epochs, {run_id}", [(run_id, ph, ep)])
    if modules is None:
        return
    _module_part(w, run_id, modules)


def _module_part(w: _Writer, run_id: str, modules: pd.DataFrame) -> None:
    """The per-module before/after table of a finished run, with a total line."""
    m = modules[modules["run_id"] == run_id]
    if not len(m):
        w.text("(no per-module table: the run has not finished)")
        return
    t = pd.DataFrame({"module": m["module"], "type": m["type"], "params": m["params"],
                      "nonzero before": m["nonzero_before"], "nonzero after": m["nonzero_after"],
                      "removed": m["removed"], "sparsity (%)": 100 * m["sparsity"]})
    params, after = int(t["params"].sum()), int(t["nonzero after"].sum())
    total = pd.DataFrame([{"module": "total", "type": "", "params": params,
                           "nonzero before": int(t["nonzero before"].sum()), "nonzero after": after,
                           "removed": int(t["removed"].sum()),
                           "sparsity (%)": 100 * (1 - after / params) if params else float("nan")}])
    w.table(f"modules:{run_id}", pd.concat([t, total], ignore_index=True), INT_FORMATS,
            note="Per-module weights before and after pruning (conv and linear layers):")


def _prune_section(w: _Writer, tables: dict[str, pd.DataFrame], summary: list[str]) -> None:
    phases = tables.get("phases")
    epochs, modules = tables.get("epochs"), tables.get("modules")
    if phases is None:
        if modules is not None:
            w.text("## Pruning")
            for run_id in sorted(modules["run_id"].unique()):
                w.text(f"### Run {run_id}")
                _module_part(w, run_id, modules)
        return
    w.text("## Pruning and training")
    runs = _run_table(phases, w.sig)
    w.table("runs", runs, {"train time (min)": ".1f"}, note="One line per run (its last phase so far):")
    configs = configuration_table(phases, w.sig.labels)
    if len(configs):
        w.table("configurations", configs, {"train time (min)": ".1f"},
                note="Finished prune runs by configuration (the spec less the seed), best first: highest "
                     "sparsity, then highest mean top-1 over the seeds:")
    _sparsity_section(w, phases)
    # details for runs outside searches, and for each search's best trial (picked in the search section)
    detail = sorted(phases.loc[phases["search_id"] == "", "run_id"].unique())
    for run_id in detail:
        _run_details(w, run_id, phases, epochs, modules)
    prune = phases[phases["kind"] == "prune"]
    if len(prune):
        for model, g in prune.groupby("spec_model"):
            front = g[pareto_front(g["sparsity"], g["top1"])]
            top = front[front["sparsity"] == front["sparsity"].max()].iloc[0]
            summary.append(f"pruning {model}: {g['run_id'].nunique()} run(s); sparsest on the Pareto front "
                           f"{100 * top['sparsity']:.2f}% at top-1 {top['top1']:.2f}% ({top['run_id']} phase "
                           f"{int(top['phase'])})")
    other = phases[phases["kind"] != "prune"]
    if len(other):
        summary.append(f"training: {other['run_id'].nunique()} dense run(s)")


# ----------------------------------------------------------------------------------------------------
# searches


def _effect_figure(w: _Writer, name: str, title: str, trials: pd.DataFrame, params: list[str],
                   metrics: list[tuple[str, str]], stopped: pd.Series | None = None) -> None:
    """One panel per (metric, searched field): the metric of every trial against the field's value."""
    fig, axes = new_figure(title, ncols=len(params), nrows=len(metrics), width=4.6, height=3.8)
    for row, (column, ylabel) in enumerate(metrics):
        for col, p in enumerate(params):
            ax = axes[row, col]
            values = trials[p]
            numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
            if numeric:
                x = values.to_numpy(dtype=float)
                value_ticks(ax, x)
            else:
                x, labels = categorical_positions(values)
                ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0)
                ax.set_xlim(-0.5, len(labels) - 0.5)
            done = ~stopped if stopped is not None else pd.Series(True, index=trials.index)
            ax.scatter(x[done.to_numpy()], trials.loc[done, column], s=30, color="tab:blue",
                       label="finished" if stopped is not None else None)
            if stopped is not None and stopped.any():
                ax.scatter(x[stopped.to_numpy()], trials.loc[stopped, column], s=30, facecolors="none",
                           edgecolors="tab:red", label="stopped early")
            label_axes(ax, f"{ylabel} vs {p.removeprefix('spec_')}", p.removeprefix("spec_"), ylabel)
            if row == 0 and col == 0:
                legend(ax)
    w.figure(fig, name, title)


def _prune_search(w: _Writer, search_id: str, phases: pd.DataFrame, epochs: pd.DataFrame | None,
                  modules: pd.DataFrame | None, score: Callable[[dict[str, Any]], float], max_drop: float) -> str:
    """A prune search: the trials' last phases ranked by the search's objective."""
    s = phases[phases["search_id"] == search_id]
    last = s.sort_values("phase").groupby("run_id").tail(1).set_index("run_id")
    dense = s[s["phase"] == 0].set_index("run_id")["top1"]
    last["dense_top1"] = dense.reindex(last.index)
    last["score"] = [score({"dense_top1": d, "top1": t, "sparsity": sp})
                     for d, t, sp in zip(last["dense_top1"], last["top1"], last["sparsity"], strict=True)]
    last["spec_phases"] = last["spec_phases"].fillna(1)
    last["stopped"] = last["phase"] < last["spec_phases"]
    params = varying_spec_columns(s.drop_duplicates("run_id"))
    ranked = last.sort_values("score", ascending=False).reset_index()
    correct = [w.sig.correct(r) for r in ranked.to_dict("records")]
    ps = [None] + [Significance.paired([c], [correct[0]]) for c in correct[1:]]  # each trial against the best
    table = pd.DataFrame({"trial": ranked["trial_id"], "score": ranked["score"],
                          "sparsity (%)": 100 * ranked["sparsity"], PCT: ranked["top1"],
                          CI: [w.sig.interval([c]) for c in correct],
                          "drop (pp)": ranked["dense_top1"] - ranked["top1"],
                          "p vs best": ["(best)"] + [format_p(p) for p in ps[1:]],
                          "significant at 0.05": [significant(p) for p in ps],
                          "phases done": [f"{int(p)}/{int(n)}" for p, n in zip(ranked["phase"], ranked["spec_phases"],
                                                                                strict=True)],
                          **{p.removeprefix("spec_"): ranked[p] for p in params}})
    w.text(f"### Search {search_id} (prune, {len(ranked)} trials)",
           f"Score: the search's objective, 100 x sparsity minus 10 per point of top-1 lost beyond the allowed "
           f"drop of {max_drop:g} points (--max-drop), on each trial's last phase. Trials stopped early by the "
           "scheduler have fewer phases done (hollow red markers).")
    w.table(f"search:{search_id}", table.head(10), {"score": ".3f", **{p.removeprefix("spec_"): "g" for p in params}},
            note="Best trials:")
    if params:
        _effect_figure(w, f"search_{search_id}", f"effect of each searched field, {search_id}",
                       ranked, params, [("score", "score"), ("top1", "last-phase top-1 (%)")],
                       stopped=ranked["stopped"].astype(bool))
    trials = [(r, phases[phases["run_id"] == r], epochs[epochs["run_id"] == r] if epochs is not None else None)
              for r in ranked["run_id"]]
    _loss_figure(w, f"loss_{search_id}", f"loss across phases and epochs, trials of {search_id}", trials)
    best = ranked.iloc[0]
    w.text(f"Best trial {best['trial_id']} in detail:")
    _run_details(w, best["run_id"], phases, epochs, modules)
    return (f"search {search_id}: {len(ranked)} trials, best {best['trial_id']} score {best['score']:.3f} "
            f"(sparsity {100 * best['sparsity']:.2f}%, top-1 {best['top1']:.2f}%)")


def _search_section(w: _Writer, tables: dict[str, pd.DataFrame], summary: list[str], max_drop: float,
                    objective: Callable[[dict[str, Any]], float]) -> None:
    phases, ptq = tables.get("phases"), tables.get("ptq")
    prune_ids = sorted(set(phases["search_id"]) - {""}) if phases is not None else []
    ptq_ids = sorted(set(ptq["search_id"]) - {""}) if ptq is not None else []
    if not prune_ids and not ptq_ids:
        return
    w.text("## Searches")
    for search_id in prune_ids:
        summary.append(_prune_search(w, search_id, phases, tables.get("epochs"), tables.get("modules"),
                                     objective, max_drop))
    for search_id in ptq_ids:
        summary.append(_ptq_search(w, search_id, ptq))


# ----------------------------------------------------------------------------------------------------
# PTQ


PTQ_FORMATS = {"calibration images": ",", "test images": ",", "alpha": ".2f", "float (kB)": ",.1f",
               "int8 (kB)": ",.1f", "packed sparse int8 (kB)": ",.1f", "int8 / float": ".3f",
               "packed / float": ".3f"}


def _model_label(model: Any, weights: Any) -> str:
    """``resnet20a resnet20-12fca82f.th``; a run's checkpoint keeps its run: ``resnet20a prune-x/final.pt``."""
    return f"{model} {_weights_name(weights)}"


# settings that change int8 results besides the plotted ones; those that vary name the curves, never averaged
PTQ_VARIANTS = {"weight_observer": "{}", "activation_bits": "{}-bit activations", "engine": "{}",
                "spec_calib_selection": "{} subset", "spec_seed": "seed {}"}


def _with_model(ptq: pd.DataFrame) -> pd.DataFrame:
    """PTQ rows with a model label, a variant (the settings that vary, e.g. ``8-bit activations``) and a series
    name for the curves (``manual minmax``, ``fx histogram per_tensor``)."""
    out = ptq.copy()
    out["model_label"] = [_model_label(m, wt) for m, wt in zip(out["spec_model"], out["spec_weights"], strict=True)]
    varying = [c for c in PTQ_VARIANTS if c in out and out[c].astype(str).nunique() > 1]
    out["variant"] = [", ".join(PTQ_VARIANTS[c].format(v) for c, v in zip(varying, values, strict=True))
                      for values in zip(*(out[c] for c in varying), strict=True)] if varying else ""
    out["series"] = (out["method"] + " " + out["observer"] + out["variant"].map(lambda v: f" ({v})" if v else ""))
    return out


def reference_variant(ptq: pd.DataFrame) -> pd.DataFrame:
    """The rows with an unshrunk activation range: every FX row, and manual rows at alpha 1.0.

    At alpha 1.0 both centers give the same scale, so one center (the first by name) is kept. When no
    manual row has alpha 1.0, the alpha closest to it stands in. E.g. alphas 0.95..1.00 x centers
    min, zero -> the manual rows with alpha 1.0 and center min.
    """
    manual = ptq[ptq["alpha"].notna()]
    if not len(manual):
        return ptq
    alpha = manual["alpha"].iloc[int(np.argmin(np.abs(manual["alpha"].to_numpy() - 1.0)))]
    center = sorted(manual.loc[manual["alpha"] == alpha, "center"].dropna().unique())[:1]
    keep = ptq["alpha"].isna() | ((ptq["alpha"] == alpha) & ptq["center"].isin(center))
    return ptq[keep]


def _pivot(d: pd.DataFrame, index: str, columns: str) -> tuple[pd.DataFrame, str]:
    """int8 top-1 by (index, columns) and a note when a cell averages repeated measurements of one configuration."""
    pivot = d.pivot_table(index=index, columns=columns, values="int8_top1", aggfunc="mean").sort_index()
    counts = d.pivot_table(index=index, columns=columns, values="int8_top1", aggfunc="size")
    repeated = int((counts > 1).to_numpy().sum())
    if not repeated:
        return pivot, ""
    spread = float(np.nanmax(d.pivot_table(index=index, columns=columns, values="int8_top1",
                                           aggfunc=lambda v: v.max() - v.min()).to_numpy()))
    if spread == 0:
        return pivot, f" {repeated} cell(s) were measured more than once, with identical results."
    return pivot, f" {repeated} cell(s) average repeated measurements (largest spread {spread:.2f} pp)."


def _float_line(ax, g: pd.DataFrame) -> None:
    top1 = float(g["float_top1"].mean())
    baseline(ax, top1, f"float {top1:.2f}%")


def _calibration_part(w: _Writer, label: str, g: pd.DataFrame) -> None:
    """int8 top-1 against calibration size, one line per (method, observer)."""
    d = reference_variant(g)
    if d["calib_size"].nunique() < 2:
        return
    pivot, repeated = _pivot(d, "calib_size", "series")
    fig, axes = new_figure(f"int8 top-1 against calibration size, {label}", width=8, height=5.2)
    ax = axes[0, 0]
    kinds = d.drop_duplicates("series").set_index("series")
    groups = sorted(set(zip(kinds["observer"], kinds["variant"], strict=True)))
    colors = _plt().get_cmap("tab10")
    for series in pivot.columns:  # colour: observer (and variant); line and marker: method
        col = pivot[series].dropna()
        method, group = kinds.loc[series, "method"], (kinds.loc[series, "observer"], kinds.loc[series, "variant"])
        ax.plot(col.index, col.to_numpy(), color=colors(groups.index(group) % 10),
                marker="o" if method == "manual" else "s", linestyle="-" if method == "manual" else "--",
                label=series)
    _float_line(ax, g)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(pivot.index, [f"{int(n):,}" for n in pivot.index], rotation=30 if len(pivot) > 5 else 0)
    label_axes(ax, f"{int(g['test_images'].iloc[0]):,} test images; manual rows at alpha "
                   f"{_alphas(d)}", "calibration images from the training set (log scale)", "int8 test top-1 (%)")
    legend(ax)
    name = safe_name(label)
    w.figure(fig, f"ptq_calibration_{name}", f"int8 top-1 against calibration size, {label}")
    table = pivot.reset_index().rename(columns={"calib_size": "calibration images"})
    table.columns.name = None
    w.table(f"ptq_calibration:{label}", table, PTQ_FORMATS,
            note=f"int8 top-1 (%) per calibration size, {label} (float {g['float_top1'].mean():.2f}%).{repeated}")


def _alphas(d: pd.DataFrame) -> str:
    values = sorted(d["alpha"].dropna().unique())
    return ", ".join(f"{a:g}" for a in values) or "-"


def _alpha_groups(g: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """Manual rows per (observer, calibration size, variant) that hold two or more alphas."""
    manual = g[g["alpha"].notna()]
    return [(key, d) for key, d in manual.groupby(["observer", "calib_size", "variant"], sort=True)
            if d["alpha"].nunique() >= 2]


def _alpha_part(w: _Writer, label: str, g: pd.DataFrame) -> None:
    """The alpha table: int8 top-1 against alpha, one line per center, per (observer, weights, calibration size)."""
    groups = _alpha_groups(g)
    if not groups:
        return
    fig, axes = new_figure(f"int8 top-1 against alpha, {label}", ncols=min(3, len(groups)),
                           nrows=math.ceil(len(groups) / 3), width=6.4, height=4.6)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, ((observer, calib, variant), d) in zip(axes.flat, groups, strict=False):
        what = f"manual, {observer}, {int(calib):,} calibration images" + (f", {variant}" if variant else "")
        pivot, repeated = _pivot(d, "alpha", "center")
        for center in pivot.columns:
            col = pivot[center].dropna()
            ax.plot(col.index, col.to_numpy(), marker="o", label=f"center {center}")
        _float_line(ax, d)
        value_ticks(ax, pivot.index.to_numpy(dtype=float), max_ticks=12, fmt=".2f")
        label_axes(ax, what, "alpha (activation range factor)", "int8 test top-1 (%)")
        legend(ax)
        table = pivot.reset_index()
        table.columns.name = None
        table = table.rename(columns={c: f"center {c} (%)" for c in pivot.columns})
        w.report.tables[f"ptq_alpha:{label}:{observer}:{int(calib)}" + (f":{variant}" if variant else "")] = table
        w.text(f"int8 top-1 against alpha, {label}, {what} (float {d['float_top1'].mean():.2f}%).{repeated}",
               markdown_table(table, PTQ_FORMATS))
    w.figure(fig, f"ptq_alpha_{safe_name(label)}", f"int8 top-1 against alpha, {label}")


def _best_int8(ptq: pd.DataFrame, sig: Significance) -> pd.DataFrame:
    """Per model and method, the configuration with the highest int8 top-1; with the test labels, the
    intervals of both top-1s and the McNemar p of int8 against float on the same images."""
    idx = ptq.groupby(["model_label", "test_images", "method"], sort=True)["int8_top1"].idxmax()
    best = ptq.loc[idx]
    records = best.to_dict("records")
    floats = [sig.correct(r, "float_top1", "float_predictions") for r in records]
    int8s = [sig.correct(r, "int8_top1") for r in records]
    ps = [Significance.paired([i], [f]) for i, f in zip(int8s, floats, strict=True)]
    return pd.DataFrame({
        "model": best["model_label"], "sparsity (%)": 100 * best["sparsity"], "test images": best["test_images"],
        "float top-1 (%)": best["float_top1"], f"float {CI}": [sig.interval([f]) for f in floats],
        "method": best["method"], "int8 top-1 (%)": best["int8_top1"], f"int8 {CI}": [sig.interval([i]) for i in int8s],
        "change (pp)": best["int8_top1"] - best["float_top1"], "p vs float": [format_p(p) for p in ps],
        "significant at 0.05": [significant(p) for p in ps], "observer": best["observer"],
        "weights": best["weight_observer"], "activation bits": best["activation_bits"],
        "calibration images": best["calib_size"], "alpha": best["alpha"], "center": best["center"],
        "configurations": ptq.groupby(["model_label", "test_images", "method"], sort=True).size().to_numpy()})


def _float_vs_int8(w: _Writer, ptq: pd.DataFrame, summary: list[str]) -> None:
    best = _best_int8(ptq, w.sig)
    w.text("### Float against int8",
           "Per model, the best int8 configuration of each method against the float model on the same test images.")
    w.table("ptq_best", best, PTQ_FORMATS)
    models = list(dict.fromkeys(best["model"]))
    methods = sorted(best["method"].unique())
    fig, axes = new_figure("float against best int8 top-1 per model", width=max(6.4, 2.2 * len(models) + 2.5),
                           height=4.8)
    ax = axes[0, 0]
    width = 0.8 / (1 + len(methods))
    bars = [("float", best.groupby("model", sort=False)["float top-1 (%)"].first())]
    bars += [(f"int8 {m} (best)", best[best["method"] == m].groupby("model", sort=False)["int8 top-1 (%)"].first())
             for m in methods]
    values = []
    for i, (name, series) in enumerate(bars):
        ys = [series.get(mo, np.nan) for mo in models]
        values.extend(v for v in ys if v == v)
        rects = ax.bar(np.arange(len(models)) + (i - len(methods) / 2) * width, ys, width, label=name)
        ax.bar_label(rects, fmt="%.2f", fontsize=8, padding=2)
    low, high = min(values), max(values)
    ax.set_ylim(max(0.0, low - max(1.0, 0.5 * (high - low))), min(100.0, high + max(0.6, 0.3 * (high - low))))
    sparse = best.groupby("model", sort=False)["sparsity (%)"].first()
    ax.set_xticks(range(len(models)), [f"{m}\n{sparse[m]:.0f}% sparse" for m in models], fontsize=8)
    label_axes(ax, "y axis zoomed to the values", "model and weights", "test top-1 (%)")
    legend(ax)
    w.figure(fig, "ptq_float_vs_int8", "float against best int8 top-1 per model")
    for r in best.to_dict("records"):
        config = f"{r['observer']}, {r['calibration images']:,} calibration images"
        if r["alpha"] == r["alpha"] and r["alpha"] is not None:
            config += f", alpha {r['alpha']:g} center {r['center']}"
        summary.append(f"PTQ {r['model']}: float {r['float top-1 (%)']:.2f}%, best {r['method']} int8 "
                       f"{r['int8 top-1 (%)']:.2f}% ({config})")


def _sizes(w: _Writer, ptq: pd.DataFrame) -> None:
    """Float, int8 and packed sparse int8 storage per model, method and weight scheme."""
    g = ptq.groupby(["model_label", "method", "weight_observer"], sort=True)
    first = g.first()
    table = pd.DataFrame({
        "model": [k[0] for k in first.index], "method": [k[1] for k in first.index],
        "weights": [k[2] for k in first.index], "sparsity (%)": 100 * first["sparsity"].to_numpy(),
        "float (kB)": first["float_bytes"].to_numpy() / 1000, "int8 (kB)": first["int8_bytes"].to_numpy() / 1000,
        "packed sparse int8 (kB)": first["int8_packed_bytes"].to_numpy() / 1000,
        "int8 / float": (first["int8_bytes"] / first["float_bytes"]).to_numpy(),
        "packed / float": (first["int8_packed_bytes"] / first["float_bytes"]).to_numpy()})
    w.text("### Model size",
           "Storage of the weights and quantization parameters: float32, int8 stored dense, and int8 packed for "
           "sparse models (the packed file: per weight tensor a bitmask or relative indexing, plus the nonzero "
           "int8 values; PT2E rows ship a .pt2 program instead and have none). 1 kB = 1,000 bytes.")
    w.table("ptq_sizes", table, PTQ_FORMATS)
    fig, axes = new_figure("model size: float, int8, packed sparse int8", width=max(6.4, 1.8 * len(table) + 3),
                           height=4.8)
    ax = axes[0, 0]
    x = np.arange(len(table))
    for i, (column, name) in enumerate((("float (kB)", "float32"), ("int8 (kB)", "int8 dense"),
                                        ("packed sparse int8 (kB)", "int8 packed (bitmask + nonzeros)"))):
        rects = ax.bar(x + (i - 1) * 0.27, table[column], 0.27, label=name)
        ax.bar_label(rects, fmt="%.0f", fontsize=7, padding=2)
    ticks = [f"{m}\n{meth}, {wo}, {s:.0f}% sparse" for m, meth, wo, s in
             zip(table["model"], table["method"], table["weights"], table["sparsity (%)"], strict=True)]
    ax.set_xticks(x, ticks, fontsize=7)
    label_axes(ax, "storage of weights and quantization parameters", "model, method, weight scheme", "size (kB)")
    legend(ax)
    w.figure(fig, "ptq_sizes", "model size: float, int8, packed sparse int8")


def _ptq_section(w: _Writer, ptq: pd.DataFrame | None, summary: list[str]) -> None:
    """Post-training quantization: float against int8, calibration size, alpha, sizes."""
    if ptq is None:
        return
    ptq = _with_model(ptq)
    w.text("## Post-training quantization",
           f"{len(ptq):,} configurations from {ptq['run_id'].nunique()} sweep(s). int8 models run on the CPU "
           f"(engine {', '.join(sorted(ptq['engine'].dropna().unique()))}); manual = hand-written PTQ, fx = FX "
           "graph mode. alpha scales the activation ranges of the manual path around the minimum or around zero "
           "(its center); FX rows have none.")
    _float_vs_int8(w, ptq, summary)
    for (label, _), g in ptq.groupby(["model_label", "test_images"], sort=True):
        if reference_variant(g)["calib_size"].nunique() >= 2 or _alpha_groups(g):
            w.text(f"### {label}: calibration size and alpha")
        _calibration_part(w, label, g)
        _alpha_part(w, label, g)
    _sizes(w, ptq)


def _ptq_search(w: _Writer, search_id: str, ptq: pd.DataFrame) -> str:
    """A PTQ search: each trial's best int8 top-1 (its objective) against the searched fields."""
    s = ptq[ptq["search_id"] == search_id]
    best = s.loc[s.groupby("run_id")["int8_top1"].idxmax()].sort_values("int8_top1", ascending=False)
    params = varying_spec_columns(s.drop_duplicates("run_id"))
    records = best.to_dict("records")
    int8s = [w.sig.correct(r, "int8_top1") for r in records]
    vs_float = [Significance.paired([i], [w.sig.correct(r, "float_top1", "float_predictions")])
                for i, r in zip(int8s, records, strict=True)]
    vs_best = [None] + [Significance.paired([i], [int8s[0]]) for i in int8s[1:]]
    table = pd.DataFrame({"trial": best["trial_id"], "int8 top-1 (%)": best["int8_top1"],
                          CI: [w.sig.interval([i]) for i in int8s], "float top-1 (%)": best["float_top1"],
                          "p vs float": [format_p(p) for p in vs_float],
                          "p vs best": ["(best)"] + [format_p(p) for p in vs_best[1:]],
                          "significant at 0.05": [significant(p) for p in vs_best], "method": best["method"],
                          "observer": best["observer"], "calibration images": best["calib_size"],
                          **{p.removeprefix("spec_"): best[p] for p in params}})
    w.text(f"### Search {search_id} (ptq, {len(best)} trials)", "Score: the int8 top-1 of the trial's configuration.")
    w.table(f"search:{search_id}", table.head(10), {**PTQ_FORMATS, **{p.removeprefix("spec_"): "g" for p in params
                                                                      if pd.api.types.is_float_dtype(best[p])}},
            note="Best trials:")
    if params:
        _effect_figure(w, f"search_{search_id}", f"effect of each searched field, {search_id}",
                       best.reset_index(drop=True), params, [("int8_top1", "int8 top-1 (%)")])
    top = best.iloc[0]
    return f"search {search_id}: {len(best)} trials, best {top['trial_id']} int8 top-1 {top['int8_top1']:.2f}%"


# ----------------------------------------------------------------------------------------------------


def _provenance(w: _Writer, tables: dict[str, pd.DataFrame]) -> None:
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


def build_report(root: str | os.PathLike, out: str | os.PathLike, filters: Filters = Filters(),
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
    w = _Writer(out, Significance(labels))
    counts = ", ".join(f"{name} {len(df):,}" for name, df in tables.items())
    w.text("# Compression results",
           f"Results: `{Path(root).resolve()}`, filters: {filters.describe()}, rows: {counts}. "
           f"Written {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Top-1 is the test-set accuracy "
           "(of the first N test images where a run used a test subset); sparsity counts the zero weights of "
           "every conv and linear layer.",
           _significance_note(labels))
    summary: list[str] = [f"read {counts} rows from {root} (filters: {filters.describe()})"]
    _prune_section(w, tables, summary)
    _ptq_section(w, tables.get("ptq"), summary)
    _search_section(w, tables, summary, max_drop, objective)
    if w.sig.mismatched:
        names = sorted(w.sig.mismatched)
        line = (f"the predictions of {len(names)} row(s) do not give their top-1 against the test labels given "
                f"(labels of another data set?); their intervals and p-values show -: {_few(names)}")
        log.warning(line)
        summary.append(line)
        w.text(f"Note: {line}.")
    _provenance(w, tables)
    atomic_write_bytes(w.report.path, "\n".join(w.lines).encode())
    summary.append(f"report: {w.report.path} ({len(w.report.figures)} figures, {len(w.report.tables)} tables)")
    w.report.summary = summary
    return w.report


__all__ = ["Filters", "Report", "ReportError", "build_report", "load_tables", "markdown_table", "pareto_front",
           "reference_variant", "varying_spec_columns"]
