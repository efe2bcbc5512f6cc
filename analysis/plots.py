"""Plotting helpers for the report's figures (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

DPI = 110


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(title: str, ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.4):
    """A titled figure with a grid of axes (always a 2-D array of axes)."""
    plt = pyplot()
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
    plt = pyplot()
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
        ax.xaxis.set_major_formatter(pyplot().FuncFormatter(lambda v, _: f"{v:g}"))


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
