"""The pruning section of the report: runs, configurations, top-1 against sparsity, per-run details."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.load import NOT_SEARCHED
from analysis.plots import baseline, label_axes, legend, new_figure, pyplot
from analysis.significance import CI, Significance, format_p, significant
from analysis.writer import Writer, weights_name

PCT = "top-1 (%)"
INT_FORMATS = {"params": ",", "nonzero before": ",", "nonzero after": ",", "removed": ","}


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
        runs["spec_weights"] = runs["spec_weights"].map(lambda v: weights_name("" if pd.isna(v) else v))
    if "spec_teacher" in runs:
        runs["spec_teacher"] = runs["spec_teacher"].map(lambda v: weights_name(v) if isinstance(v, str) and v else "-")
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


def loss_figure(w: Writer, name: str, title: str, runs: list[tuple[str, pd.DataFrame, pd.DataFrame | None]]) -> None:
    """Loss (left) and top-1 (right) against epochs across phases for one or more runs."""
    fig, axes = new_figure(title, ncols=2)
    ax_loss, ax_acc = axes[0]
    colors = pyplot().get_cmap("tab10")
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
        ax.xaxis.set_major_locator(pyplot().MaxNLocator(integer=True))
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
    p0["weights_name"] = p0["spec_weights"].map(weights_name)
    g = p0.groupby(["spec_model", "weights_name", "spec_test_size"], dropna=False)
    out = g.agg(runs=("run_id", "nunique"), top1=("top1", "mean")).reset_index()
    out[CI] = [sig.interval([sig.correct(r) for r in rows.to_dict("records")]) for _, rows in g]
    out["spec_test_size"] = out["spec_test_size"].map(lambda n: "all" if not n or pd.isna(n) else f"first {int(n)}")
    return out.rename(columns={"spec_model": "model", "weights_name": "weights", "spec_test_size": "test images",
                               "top1": PCT})


def _sparsity_section(w: Writer, phases: pd.DataFrame) -> None:
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
    plt = pyplot()
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


def run_details(w: Writer, run_id: str, phases: pd.DataFrame, epochs: pd.DataFrame | None,
                 modules: pd.DataFrame | None) -> None:
    """One run: its phase table, the loss across phases and epochs, its per-module table."""
    ph = phases[phases["run_id"] == run_id].sort_values("phase")
    last = ph.iloc[-1]
    ep = epochs[epochs["run_id"] == run_id] if epochs is not None else None
    w.text(f"### Run {run_id}",
           f"{last['kind']} of {last.get('spec_model', '')} from {weights_name(last.get('spec_weights'))}, "
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
    loss_figure(w, f"loss_{run_id}", f"loss across phases and epochs, {run_id}", [(run_id, ph, ep)])
    if modules is None:
        return
    _module_part(w, run_id, modules)


def _module_part(w: Writer, run_id: str, modules: pd.DataFrame) -> None:
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


def prune_section(w: Writer, tables: dict[str, pd.DataFrame], summary: list[str]) -> None:
    """Pruning and training: the runs, the configurations, top-1 against sparsity and each run outside a search."""
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
        run_details(w, run_id, phases, epochs, modules)
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
