"""The searches section of the report: each search's best trials and the effect of each searched field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from analysis.load import NOT_SEARCHED
from analysis.plots import categorical_positions, label_axes, legend, new_figure, value_ticks
from analysis.prune_sections import PCT, loss_figure, run_details
from analysis.ptq_sections import PTQ_FORMATS
from analysis.significance import CI, Significance, format_p, significant
from analysis.writer import Writer


def varying_spec_columns(df: pd.DataFrame) -> list[str]:
    """The ``spec_<field>`` columns with more than one value among ``df``'s rows: a search's parameters."""
    return [c for c in df.columns if c.startswith("spec_") and c not in NOT_SEARCHED
            and df[c].map(lambda v: "" if pd.isna(v) else str(v)).nunique() > 1]


def _effect_figure(w: Writer, name: str, title: str, trials: pd.DataFrame, params: list[str],
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


def _prune_search(w: Writer, search_id: str, phases: pd.DataFrame, epochs: pd.DataFrame | None,
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
    loss_figure(w, f"loss_{search_id}", f"loss across phases and epochs, trials of {search_id}", trials)
    best = ranked.iloc[0]
    w.text(f"Best trial {best['trial_id']} in detail:")
    run_details(w, best["run_id"], phases, epochs, modules)
    return (f"search {search_id}: {len(ranked)} trials, best {best['trial_id']} score {best['score']:.3f} "
            f"(sparsity {100 * best['sparsity']:.2f}%, top-1 {best['top1']:.2f}%)")


def _ptq_search(w: Writer, search_id: str, ptq: pd.DataFrame) -> str:
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


def search_section(w: Writer, tables: dict[str, pd.DataFrame], summary: list[str], max_drop: float,
                    objective: Callable[[dict[str, Any]], float]) -> None:
    """One part per prune and PTQ search; prune trials ranked by ``objective``, a line each in ``summary``."""
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
