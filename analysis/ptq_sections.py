"""The post-training quantization section of the report: float against int8, calibration size, alpha, sizes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analysis.plots import baseline, label_axes, legend, new_figure, pyplot, value_ticks
from analysis.significance import CI, Significance, format_p, significant
from analysis.writer import Writer, markdown_table, safe_name, weights_name

PTQ_FORMATS = {"calibration images": ",", "test images": ",", "alpha": ".2f", "float (kB)": ",.1f",
               "int8 (kB)": ",.1f", "packed sparse int8 (kB)": ",.1f", "int8 / float": ".3f",
               "packed / float": ".3f"}


def _model_label(model: Any, weights: Any) -> str:
    """``resnet20a resnet20-12fca82f.th``; a run's checkpoint keeps its run: ``resnet20a prune-x/final.pt``."""
    return f"{model} {weights_name(weights)}"


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


def _calibration_part(w: Writer, label: str, g: pd.DataFrame) -> None:
    """int8 top-1 against calibration size, one line per (method, observer)."""
    d = reference_variant(g)
    if d["calib_size"].nunique() < 2:
        return
    pivot, repeated = _pivot(d, "calib_size", "series")
    fig, axes = new_figure(f"int8 top-1 against calibration size, {label}", width=8, height=5.2)
    ax = axes[0, 0]
    kinds = d.drop_duplicates("series").set_index("series")
    groups = sorted(set(zip(kinds["observer"], kinds["variant"], strict=True)))
    colors = pyplot().get_cmap("tab10")
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


def _alpha_part(w: Writer, label: str, g: pd.DataFrame) -> None:
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


def _float_vs_int8(w: Writer, ptq: pd.DataFrame, summary: list[str]) -> None:
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


def _sizes(w: Writer, ptq: pd.DataFrame) -> None:
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


def ptq_section(w: Writer, ptq: pd.DataFrame | None, summary: list[str]) -> None:
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
