"""The offline report: its tables equal the rows they come from, its PNGs are real images, bad input exits 2.

The results are produced by the real jobs on the synthetic CIFAR-10 once per module: one plain prune run
and two prune runs tagged as trials of one search (as a Ray trial tags them), then read back from Parquet.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner
from PIL import Image

from analysis.load import Filters, load_tables
from analysis.prune_sections import configuration_table, pareto_front
from analysis.ptq_sections import reference_variant
from analysis.report import build_report
from analysis.search_sections import varying_spec_columns
from analysis.writer import markdown_table
from cli.main import cli
from compress.results import write_rows
from jobs import tables as job_tables
from jobs.ptq import plan_tasks, run_ptq
from jobs.specs import PruneSpec, PTQSpec, TuneSpec, spec_defaults
from jobs.training import run_prune
from sweeps.search import prune_score
from tests.helpers import md_tables

SEARCH = "srch"
TRIAL_LRS = {"t0": 1e-3, "t1": 3e-3}


def rows(root: Path, table: str) -> pd.DataFrame:
    return ds.dataset(root / table, format="parquet").to_table().to_pandas()





def num(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_pareto_front_keeps_exactly_the_undominated_points() -> None:
    assert pareto_front([0.5, 0.8, 0.8, 0.6], [90, 88, 85, 87]).tolist() == [True, True, False, False]
    assert pareto_front([0.5, 0.5], [90, 90]).tolist() == [True, False]
    assert pareto_front([0.3], [10]).tolist() == [True]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 60).astype(float), rng.integers(0, 6, 60).astype(float)
    mask = pareto_front(x, y)
    for i in range(len(x)):
        dominated = any(x[j] >= x[i] and y[j] >= y[i] and (x[j], y[j]) != (x[i], y[i]) for j in range(len(x)))
        if dominated:
            assert not mask[i]
    # every undominated (x, y) value appears on the front exactly once
    front = {(x[i], y[i]) for i in np.flatnonzero(mask)}
    assert len(front) == mask.sum()
    assert front == {(a, b) for a, b in zip(x, y, strict=True)
                     if not any(c >= a and d >= b and (c, d) != (a, b) for c, d in zip(x, y, strict=True))}


def test_markdown_table_formats_cells() -> None:
    df = pd.DataFrame({"name": ["a|b", "c"], "params": [268336, 5], "top-1 (%)": [91.7349, float("nan")],
                       "done": [True, False]})
    assert markdown_table(df, {"params": ","}).splitlines() == [
        "| name | params | top-1 (%) | done |",
        "| --- | ---: | ---: | --- |",
        "| a\\|b | 268,336 | 91.73 | yes |",
        "| c | 5 |  | no |",
    ]


def test_varying_spec_columns_are_the_searched_fields() -> None:
    df = pd.DataFrame({"spec_lr": [0.1, 0.2], "spec_seed": [0, 0], "spec_run_id": ["a", "b"], "top1": [1.0, 2.0],
                       "spec_keep_dense": [None, "conv1"]})
    assert varying_spec_columns(df) == ["spec_lr", "spec_keep_dense"]


def _phase_rows(run: str, seed: int, lr: float, tops: list[float], planned: int | None = None) -> list[dict]:
    n = len(tops) - 1
    return [{"run_id": run, "kind": "prune", "phase": p, "top1": t, "sparsity": 0.9 * p / n,
             "epochs": 0 if p == 0 else 5,
             "train_seconds": 0.0 if p == 0 else 60.0, "spec_phases": planned or n, "spec_seed": seed, "spec_lr": lr,
             "spec_run_id": run, "spec_results": f"/r/{run}", "spec_weights": "/a/w.th", "spec_epochs": 5}
            for p, t in enumerate(tops)]


def test_a_run_written_before_a_spec_field_existed_joins_its_configuration(tmp_path: Path) -> None:
    """Old rows lack spec_max_layer_sparsity; they ran without a cap, the default, like the new run here."""
    old = pa.schema([f for f in job_tables.PHASES if f.name != "spec_max_layer_sparsity"])
    for r in _phase_rows("a0", 0, 0.03, [91.7, 91.0, 90.0]):
        write_rows(tmp_path / "phases" / f"a0-p{r['phase']:02d}.parquet", [r], old)
    for r in _phase_rows("a1", 1, 0.03, [91.7, 91.2, 89.6]):
        write_rows(tmp_path / "phases" / f"a1-p{r['phase']:02d}.parquet", [{**r, "spec_max_layer_sparsity": 1.0}],
                   job_tables.PHASES)
    for r in _phase_rows("c0", 0, 0.03, [91.7, 91.1, 90.3]):
        write_rows(tmp_path / "phases" / f"c0-p{r['phase']:02d}.parquet", [{**r, "spec_max_layer_sparsity": 0.97}],
                   job_tables.PHASES)
    table = configuration_table(load_tables(tmp_path, spec_defaults=spec_defaults())["phases"])
    assert table["configuration"].tolist() == ["max_layer_sparsity=0.97", "max_layer_sparsity=1.0"]
    assert table.iloc[1]["runs"] == 2 and table.iloc[1]["seeds"] == "0,1"
    # without the defaults the old run is a configuration of its own
    assert len(configuration_table(load_tables(tmp_path)["phases"])) == 3


def test_configuration_table_groups_seeds_and_puts_the_best_first() -> None:
    phases = pd.DataFrame([
        *_phase_rows("a0", 0, 0.03, [91.7, 91.0, 90.0]), *_phase_rows("a1", 1, 0.03, [91.7, 91.2, 89.6]),
        *_phase_rows("b0", 0, 0.05, [91.7, 91.1, 90.3]),
        *_phase_rows("c0", 0, 0.10, [91.7, 95.0], planned=2),  # unfinished (1 of 2 phases): left out
        *[{**r, "spec_weights": "/elsewhere/w.th"} for r in _phase_rows("d0", 0, 0.03, [91.7, 90.9, 89.0])],
    ])
    table = configuration_table(phases)
    assert table["configuration"].tolist() == ["lr=0.05", "lr=0.03"]  # same weights file name: one configuration
    best, second = table.iloc[0], table.iloc[1]
    assert (best["runs"], best["seeds"], best["epochs"]) == (1, "0", 10) and best["top-1 mean (%)"] == 90.3
    assert (second["runs"], second["seeds"]) == (3, "0,0,1")
    assert second["top-1 mean (%)"] == pytest.approx((90.0 + 89.6 + 89.0) / 3)
    assert (second["top-1 min (%)"], second["top-1 max (%)"]) == (89.0, 90.0)
    assert second["spread (pp)"] == pytest.approx(1.0)
    assert second["drop (pp)"] == pytest.approx(91.7 - (90.0 + 89.6 + 89.0) / 3)
    assert second["sparsity (%)"] == pytest.approx(90.0) and second["train time (min)"] == pytest.approx(2.0)
    # a sparser configuration ranks first whatever its top-1
    sparser = pd.DataFrame([*phases.to_dict("records"),
                            *[{**r, "sparsity": r["sparsity"] * 1.05}
                              for r in _phase_rows("e0", 0, 0.2, [91.7, 80, 70])]])
    assert configuration_table(sparser)["configuration"].tolist() == ["lr=0.2", "lr=0.05", "lr=0.03"]
    assert configuration_table(phases[phases["run_id"] == "c0"]).empty


def test_reference_variant_keeps_unshrunk_ranges() -> None:
    df = pd.DataFrame({"method": ["fx", "manual", "manual", "manual", "manual"],
                       "alpha": [None, 1.0, 1.0, 0.98, 0.98], "center": [None, "min", "zero", "min", "zero"]})
    assert reference_variant(df).index.tolist() == [0, 1]
    assert reference_variant(df[df["alpha"] != 1.0]).index.tolist() == [0, 3]


def ptq_rows(root: Path) -> list[dict]:
    """PTQ rows through the real schema and writer, every int8 top-1 distinct so a swapped cell shows."""
    from compress.results import write_rows
    from jobs import tables

    base = {"kind": "ptq", "engine": "x86", "activation_bits": 7, "weight_observer": "per_channel", "float_top1": 91.73,
            "test_images": 10_000, "float_bytes": 1_084_416, "sparsity": 0.0, "search_id": "", "trial_id": "",
            "spec_model": "resnet20a", "spec_weights": "/w/resnet20-12fca82f.th"}
    out, k = [], 0
    for method, observer, calib in itertools.product(("fx", "manual"), ("minmax", "histogram"), (100, 1000, 10_000)):
        k += 1
        out.append({**base, "run_id": "calib", "task": f"{observer}-{calib}", "method": method,
                    "observer": observer, "calib_size": calib,
                    "alpha": 1.0 if method == "manual" else None, "center": "min" if method == "manual" else None,
                    "int8_top1": 91.0 + k / 100, "int8_bytes": 276_976 + (16 if method == "fx" else 0),
                    "int8_packed_bytes": 302_654})
    for alpha, center in itertools.product((0.97, 0.98, 0.99), ("min", "zero")):
        k += 1
        out.append({**base, "run_id": "alpha", "task": "minmax-10000", "method": "manual", "observer": "minmax",
                    "calib_size": 10_000,
                    "alpha": alpha, "center": center, "int8_top1": 91.0 + k / 100, "int8_bytes": 276_976,
                    "int8_packed_bytes": 302_654})
    write_rows(root / "ptq" / "calib.parquet", [r for r in out if r["run_id"] == "calib"], tables.PTQ)
    write_rows(root / "ptq" / "alpha.parquet", [r for r in out if r["run_id"] == "alpha"], tables.PTQ)
    return out


def test_ptq_tables_put_each_row_in_its_cell(tmp_path: Path) -> None:
    written = pd.DataFrame(ptq_rows(tmp_path / "results"))
    rep = build_report(tmp_path / "results", tmp_path / "out")
    label = "resnet20a resnet20-12fca82f.th"

    calib = rep.tables[f"ptq_calibration:{label}"].set_index("calibration images")
    assert list(calib.index) == [100, 1000, 10_000]
    assert sorted(calib.columns) == ["fx histogram", "fx minmax", "manual histogram", "manual minmax"]
    reference = written[(written["run_id"] == "calib")]
    for r in reference.itertuples():
        assert calib.loc[r.calib_size, f"{r.method} {r.observer}"] == r.int8_top1

    alpha = rep.tables[f"ptq_alpha:{label}:minmax:10000"].set_index("alpha")
    assert list(alpha.index) == [0.97, 0.98, 0.99, 1.0]
    manual = written[(written["method"] == "manual") & (written["observer"] == "minmax")
                     & (written["calib_size"] == 10_000)]
    for r in manual.itertuples():
        assert alpha.loc[r.alpha, f"center {r.center} (%)"] == r.int8_top1
    assert np.isnan(alpha.loc[1.0, "center zero (%)"])  # never measured: an empty cell, not a guess

    best = rep.tables["ptq_best"].set_index("method")
    for method, g in written.groupby("method"):
        top = g.loc[g["int8_top1"].idxmax()]
        assert best.loc[method, "int8 top-1 (%)"] == top["int8_top1"]
        assert best.loc[method, "calibration images"] == top["calib_size"]
        assert best.loc[method, "configurations"] == len(g)
        assert best.loc[method, "change (pp)"] == pytest.approx(top["int8_top1"] - 91.73)

    sizes = rep.tables["ptq_sizes"].set_index("method")
    assert sizes.loc["fx", "int8 (kB)"] == 276.992 and sizes.loc["manual", "int8 (kB)"] == 276.976
    assert sizes.loc["manual", "float (kB)"] == 1084.416

    text = (tmp_path / "out" / "report.md").read_text()
    md = md_tables(text)[f"{label}: calibration size and alpha"]
    assert md[0]["manual minmax"].tolist() == [f"{v:.2f}" for v in calib["manual minmax"]]
    assert md[1]["center min (%)"].tolist() == [f"{v:.2f}" for v in alpha["center min (%)"]]
    assert {p.name for p in rep.figures} == {"ptq_float_vs_int8.png", f"ptq_calibration_{label.replace(' ', '_')}.png",
                                             f"ptq_alpha_{label.replace(' ', '_')}.png", "ptq_sizes.png"}


@pytest.fixture(scope="module")
def ptq_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results root holding only hand-written PTQ rows (no phases, epochs or modules)."""
    root = tmp_path_factory.mktemp("ptq-only")
    ptq_rows(root)
    return root


@pytest.mark.parametrize("args, words", [
    (["{missing}"], "does not exist"),
    (["{empty}"], "no results under"),
    (["{ptq}", "--run", "nope"], "match run=nope"),
    (["{ptq}", "--model", "resnet20b"], "match model=resnet20b"),
    (["{ptq}", "--kind", "prune"], "match kind=prune"),
    (["{ptq}", "--search", "tune-*"], "match search=tune-*"),
    (["{ptq}", "--max-drop", "-1"], "max_drop"),
])
def test_nothing_to_report_is_one_line_and_exit_2(ptq_only: Path, tmp_path: Path, args: list[str], words: str) -> None:
    (tmp_path / "empty" / "phases").mkdir(parents=True)
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "ptq": ptq_only}
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["report", *(a.format(**paths) for a in args), "--out", str(out)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
    assert not out.exists()


def test_a_damaged_file_is_left_out_with_one_warning_and_the_rest_reported(ptq_only: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A half-copied file, an empty one and one whose pages do not read: each warned about once by name,
    and the report is the report of the other files."""
    copy = tmp_path / "results"
    shutil.copytree(ptq_only, copy)
    bad = {"half-copied.parquet": b"PAR1 not really", "empty.parquet": b""}
    for name, data in bad.items():
        (copy / "ptq" / name).write_bytes(data)
    good = (copy / "ptq" / "alpha.parquet").read_bytes()
    footer = len(good) - 8 - int.from_bytes(good[-8:-4], "little")  # the pages before it, overwritten
    (copy / "ptq" / "zz-pages.parquet").write_bytes(good[:4] + b"\xff" * (footer - 4) + good[footer:])
    with caplog.at_level(logging.WARNING, logger="compress"):
        res = CliRunner().invoke(cli, ["report", str(copy), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3, warned
    for name in (*bad, "zz-pages.parquet"):
        (line,) = [w for w in warned if str(copy / "ptq" / name) in w]
        assert line.startswith("damaged result file") and "run its ptq command again" in line
    assert (tmp_path / "out" / "report.md").is_file()
    whole = build_report(ptq_only, tmp_path / "whole")
    damaged = build_report(copy, tmp_path / "again")
    assert whole.tables.keys() == damaged.tables.keys()
    for name, table in whole.tables.items():
        pd.testing.assert_frame_equal(table, damaged.tables[name], obj=name)


def test_out_that_is_a_file_is_refused(ptq_only: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    out.write_text("keep me")
    res = CliRunner().invoke(cli, ["report", str(ptq_only), "--out", str(out)])
    assert res.exit_code == 2 and "is a file" in res.output
    assert out.read_text() == "keep me"


def test_default_out_is_beside_the_results(ptq_only: Path, tmp_path: Path) -> None:
    copy = tmp_path / "results"
    shutil.copytree(ptq_only, copy)
    res = CliRunner().invoke(cli, ["report", str(copy), "--kind", "ptq"])
    assert res.exit_code == 0, res.output
    assert (copy / "report" / "report.md").is_file()
    assert res.output.strip().splitlines()[-1].startswith(f"report: {copy / 'report' / 'report.md'}")
    assert "## Pruning" not in (copy / "report" / "report.md").read_text()


# ---- on the results of real tiny jobs: one shared set per module, ~15 s of CPU (marker slow) ----


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, synthetic_cifar: Path, synthetic_weights: Path) -> Path:
    """A results root written by three real tiny prune runs (2 phases x 1 epoch, 50 images)."""
    root = tmp_path_factory.mktemp("results")
    base = PruneSpec(weights=str(synthetic_weights), data_root=str(synthetic_cifar), results=str(root),
                     phases=2, epochs=1, final_sparsity=0.5, batch_size=50, train_size=50, test_size=50,
                     eval_batch_size=50, randaugment=False, device="cpu")
    run_prune(dataclasses.replace(base, run_id="solo", seed=0))
    for i, (trial, lr) in enumerate(TRIAL_LRS.items()):
        run_prune(dataclasses.replace(base, run_id=f"{SEARCH}-{trial}", seed=i, lr=lr),
                  tags={"search_id": SEARCH, "trial_id": trial})
    ptq = PTQSpec(weights=str(synthetic_weights), data_root=str(synthetic_cifar), results=str(root),
                  test_size=50, eval_batch_size=50, calib_batch_size=25, device="cpu")
    sweeps = [  # the reference lab's two tables, then the pruned model
        dataclasses.replace(ptq, run_id="ptq-calib", observers=("minmax", "moving_average"), calib_sizes=(20, 50)),
        dataclasses.replace(ptq, run_id="ptq-alpha", methods=("manual",), calib_sizes=(40,), alphas=(0.98, 1.0),
                            centers=("min", "zero")),
        dataclasses.replace(ptq, run_id="ptq-pruned", methods=("manual",), calib_sizes=(20,),
                            weights=str(root / "runs" / "solo" / "final.pt")),
    ]
    for sweep in sweeps:
        for task in plan_tasks(sweep):
            run_ptq(task)
    return root


@pytest.fixture(scope="module")
def cli_report(results: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The report written by ``python -m jobs.launch report RESULTS --out DIR`` and what it printed."""
    out = tmp_path_factory.mktemp("report")
    res = CliRunner().invoke(cli, ["report", str(results), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.mark.slow
def test_report_tables_equal_the_rows(results: Path, cli_report: tuple[Path, str]) -> None:
    out, printed = cli_report
    tables = md_tables((out / "report.md").read_text())
    phases, modules = rows(results, "phases"), rows(results, "modules")

    runs = tables["Pruning and training"][0].set_index("run")
    assert sorted(runs.index) == sorted(phases["run_id"].unique())
    for run_id, g in phases.groupby("run_id"):
        last = g.loc[g["phase"].idxmax()]
        line = runs.loc[run_id]
        assert line["final top-1 (%)"] == f"{last['top1']:.2f}"
        assert line["final sparsity (%)"] == f"{100 * last['sparsity']:.2f}"
        assert line["start top-1 (%)"] == f"{g.loc[g['phase'] == 0, 'top1'].iloc[0]:.2f}"
        assert line["phases done"] == "2/2"
        assert line["search"] == last["search_id"]

    # solo and trial t0 differ only in run id: one configuration of two runs; t1's lr makes another
    configs = tables["Pruning and training"][1].set_index("configuration")
    finals = phases.loc[phases.groupby("run_id")["phase"].idxmax()].set_index("run_id")["top1"]
    shared = (finals["solo"] + finals[f"{SEARCH}-t0"]) / 2
    assert configs.loc["lr=0.001", "runs"] == "2" and configs.loc["lr=0.003", "runs"] == "1"
    assert configs.loc["lr=0.001", "top-1 mean (%)"] == f"{shared:.2f}"
    assert configs.loc["lr=0.003", "top-1 mean (%)"] == f"{finals[f'{SEARCH}-t1']:.2f}"
    means = [num(v) for v in configs["top-1 mean (%)"]]
    assert means == sorted(means, reverse=True)

    phase_table, module_table = tables["Run solo"]
    solo = phases[phases["run_id"] == "solo"].sort_values("phase")
    assert phase_table["phase"].astype(int).tolist() == solo["phase"].tolist()
    assert phase_table["top-1 (%)"].tolist() == [f"{v:.2f}" for v in solo["top1"]]
    assert phase_table["test loss"].tolist() == [f"{v:.4f}" for v in solo["test_loss"]]

    m = modules[modules["run_id"] == "solo"].set_index("module")
    body, total = module_table.iloc[:-1].set_index("module"), module_table.iloc[-1]
    assert sorted(body.index) == sorted(m.index)
    for name, r in body.iterrows():
        assert [num(r[c]) for c in ("params", "nonzero before", "nonzero after", "removed")] == \
            [m.loc[name, c] for c in ("params", "nonzero_before", "nonzero_after", "removed")]
        assert r["sparsity (%)"] == f"{100 * m.loc[name, 'sparsity']:.2f}"
    assert total["module"] == "total" and num(total["params"]) == m["params"].sum() == 268_336
    assert num(total["nonzero after"]) == m["nonzero_after"].sum()
    assert total["sparsity (%)"] == f"{100 * (1 - m['nonzero_after'].sum() / m['params'].sum()):.2f}" == "50.00"
    assert "pruning resnet20a: 3 run(s)" in printed


@pytest.mark.slow
def test_pareto_table_holds_the_undominated_phases(results: Path, cli_report: tuple[Path, str]) -> None:
    out, _ = cli_report
    dense, front = md_tables((out / "report.md").read_text())["Top-1 against sparsity"]
    assert list(dense.columns) == ["model", "weights", "test images", "runs", "top-1 (%)", "top-1 95% CI"]
    phases = rows(results, "phases")
    points = {(round(100 * s, 2), round(t, 2)) for s, t in zip(phases["sparsity"], phases["top1"], strict=True)}
    undominated = {p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)}
    assert {(num(s), num(t)) for s, t in zip(front["sparsity (%)"], front["top-1 (%)"], strict=True)} == undominated


@pytest.mark.slow
def test_search_section_ranks_trials_by_the_objective(results: Path, cli_report: tuple[Path, str]) -> None:
    out, printed = cli_report
    text = (out / "report.md").read_text()
    best_trials = md_tables(text)[f"Search {SEARCH} (prune, 2 trials)"][0]
    phases = rows(results, "phases")
    trials = phases[phases["search_id"] == SEARCH]
    expected = {}
    for trial, g in trials.groupby("trial_id"):
        last = g.loc[g["phase"].idxmax()]
        row = {"dense_top1": g.loc[g["phase"] == 0, "top1"].iloc[0], "top1": last["top1"], "sparsity": last["sparsity"]}
        expected[trial] = prune_score(row, TuneSpec())
        assert g["spec_lr"].iloc[0] == TRIAL_LRS[trial]
    assert best_trials["trial"].tolist() == sorted(expected, key=lambda t: -expected[t])
    for r in best_trials.itertuples():
        assert r.score == f"{expected[r.trial]:.3f}"
        assert num(r.lr) == TRIAL_LRS[r.trial]
    # lr and seed vary between the trials: both are the searched fields, each gets panels
    assert set(best_trials.columns) >= {"lr", "seed"}
    assert f"![effect of each searched field, {SEARCH}](search_{SEARCH}.png)" in text
    assert f"search {SEARCH}: 2 trials" in printed


@pytest.mark.slow
def test_every_figure_is_a_real_png(cli_report: tuple[Path, str]) -> None:
    out, _ = cli_report
    text = (out / "report.md").read_text()
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"top1_vs_sparsity_resnet20a.png", "loss_solo.png", f"loss_{SEARCH}.png", f"search_{SEARCH}.png"} <= names
    assert len([n for n in names if n.startswith(f"loss_{SEARCH}-t")]) == 1  # the best trial's own figure
    for p in pngs:
        assert f"]({p.name})" in text
        assert p.stat().st_size > 15_000
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width >= 500 and im.height >= 350
            assert len(set(im.convert("L").get_flattened_data())) > 20  # drawn, not blank


@pytest.mark.slow
def test_library_tables_hold_the_row_values(results: Path, tmp_path: Path) -> None:
    rep = build_report(results, tmp_path, Filters(runs=("solo",)))
    phases = rows(results, "phases")
    solo = phases[phases["run_id"] == "solo"].sort_values("phase")
    assert list(rep.tables["runs"]["run"]) == ["solo"]
    assert rep.tables["configurations"]["top-1 mean (%)"].tolist() == [solo["top1"].iloc[-1]]
    assert rep.tables["runs"]["final top-1 (%)"].iloc[0] == solo["top1"].iloc[-1]
    assert rep.tables["phases:solo"]["test loss"].tolist() == solo["test_loss"].tolist()
    assert "search:srch" not in rep.tables
    dense = rep.tables["dense_baselines"]
    assert dense[["model", "weights", "runs"]].values.tolist() == [["resnet20a", "resnet20a-init.pt", 1]]
    assert dense["top-1 (%)"].iloc[0] == solo["top1"].iloc[0]


@pytest.mark.slow
def test_cli_filters_select_runs(results: Path, tmp_path: Path) -> None:
    args = ["--run", f"{SEARCH}-*", "--run", "solo", "--model", "resnet20a", "--kind", "prune", "--search", SEARCH]
    res = CliRunner().invoke(cli, ["report", str(results), "--out", str(tmp_path), *args])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "report.md").read_text()
    assert set(md_tables(text)["Pruning and training"][0]["run"]) == {f"{SEARCH}-t0", f"{SEARCH}-t1"}
    assert "## Post-training quantization" not in text


@pytest.mark.slow
@pytest.mark.parametrize("filters, kept", [
    (Filters(searches=(SEARCH,)), {f"{SEARCH}-t0", f"{SEARCH}-t1"}),
    (Filters(runs=("solo", f"{SEARCH}-t1")), {"solo", f"{SEARCH}-t1"}),
    (Filters(runs=("s*",), kinds=("prune",)), {"solo", f"{SEARCH}-t0", f"{SEARCH}-t1"}),
    (Filters(kinds=("ptq",)), {"ptq-calib", "ptq-alpha", "ptq-pruned"}),
    (Filters(runs=("ptq-*", "solo"), models=("resnet20a",)), {"solo", "ptq-calib", "ptq-alpha", "ptq-pruned"}),
])
def test_filters_keep_the_matching_rows_of_every_table(results: Path, filters: Filters, kept: set[str]) -> None:
    tables = load_tables(results, filters)
    assert {r for df in tables.values() for r in df["run_id"]} == kept
    for name, df in tables.items():
        assert len(df) == rows(results, name)["run_id"].isin(kept).sum()


@pytest.mark.slow
def test_a_copied_folder_with_only_some_tables_is_enough(results: Path, tmp_path: Path) -> None:
    """No checkpoints, no modules table, and a duplicated file: the report still counts each row once."""
    copy = tmp_path / "laptop"
    shutil.copytree(results / "phases", copy / "phases")
    shutil.copy(copy / "phases" / "solo-p01.parquet", copy / "phases" / "solo-p01-again.parquet")
    rep = build_report(copy, tmp_path / "out")
    assert len(rep.tables["phases:solo"]) == 3
    assert not any(name.startswith("modules:") for name in rep.tables)
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.slow
def test_ptq_rows_of_the_real_jobs_reach_the_report(results: Path, cli_report: tuple[Path, str]) -> None:
    out, printed = cli_report
    tables = md_tables((out / "report.md").read_text())
    ptq = rows(results, "ptq")
    sizes = tables["Model size"][0]
    pruned = ptq[ptq["run_id"] == "ptq-pruned"].iloc[0]
    line = sizes[sizes["model"] == "resnet20a solo/final.pt"].iloc[0]
    assert line["sparsity (%)"] == f"{100 * pruned['sparsity']:.2f}" == "50.00"
    assert line["int8 (kB)"] == f"{pruned['int8_bytes'] / 1000:,.1f}"
    assert line["packed sparse int8 (kB)"] == f"{pruned['int8_packed_bytes'] / 1000:,.1f}"
    assert pruned["int8_packed_bytes"] < pruned["int8_bytes"] < pruned["float_bytes"]

    label = f"resnet20a {Path(str(ptq['spec_weights'].iloc[0])).name}"
    calib, alpha = tables[f"{label}: calibration size and alpha"]
    dense = ptq[ptq["spec_weights"] == ptq.loc[ptq["run_id"] == "ptq-calib", "spec_weights"].iloc[0]]
    for r in dense[dense["run_id"] == "ptq-calib"].itertuples():
        cell = calib.loc[calib["calibration images"] == str(r.calib_size), f"{r.method} {r.observer}"].item()
        assert cell == f"{r.int8_top1:.2f}"
    for r in dense[dense["run_id"] == "ptq-alpha"].itertuples():
        assert alpha.loc[alpha["alpha"] == f"{r.alpha:.2f}", f"center {r.center} (%)"].item() == f"{r.int8_top1:.2f}"
    assert printed.count("PTQ resnet20a") == 3  # (dense: fx, manual), (pruned: manual)


def test_ptq_settings_that_vary_name_the_curves_instead_of_being_averaged(tmp_path: Path) -> None:
    """8-bit rows beside 7-bit rows of the same configuration get their own table; nothing is averaged."""
    from compress.results import write_rows
    from jobs import tables

    written = ptq_rows(tmp_path / "results")
    eight = [{**r, "run_id": "alpha8", "activation_bits": 8, "int8_top1": r["int8_top1"] + 0.5}
             for r in written if r["run_id"] == "alpha"]
    write_rows(tmp_path / "results" / "ptq" / "alpha8.parquet", eight, tables.PTQ)
    rep = build_report(tmp_path / "results", tmp_path / "out")
    label = "resnet20a resnet20-12fca82f.th"
    seven = rep.tables[f"ptq_alpha:{label}:minmax:10000:7-bit activations"].set_index("alpha")
    eight_table = rep.tables[f"ptq_alpha:{label}:minmax:10000:8-bit activations"].set_index("alpha")
    for r in eight:
        assert eight_table.loc[r["alpha"], f"center {r['center']} (%)"] == r["int8_top1"]
    for r in written:
        if r["run_id"] == "alpha":
            assert seven.loc[r["alpha"], f"center {r['center']} (%)"] == r["int8_top1"]
    calib = rep.tables[f"ptq_calibration:{label}"]
    assert "manual minmax (7-bit activations)" in calib.columns
    assert "average repeated" not in (tmp_path / "out" / "report.md").read_text()


def test_a_ptq_search_lists_its_trials_by_int8_top1(tmp_path: Path) -> None:
    from compress.results import write_rows
    from jobs import tables

    base = ptq_rows(tmp_path / "unused")[0]
    trials = [{**base, "run_id": f"tune-ptq-{t}", "task": f"minmax-{n}", "search_id": "tune-ptq", "trial_id": t,
               "calib_size": n, "spec_calib_sizes": str(n), "spec_centers": center, "int8_top1": top1}
              for t, n, center, top1 in (("a", 100, "min", 91.1), ("b", 1000, "zero", 91.6), ("c", 5000, "min", 91.4))]
    write_rows(tmp_path / "results" / "ptq" / "search.parquet", trials, tables.PTQ)
    rep = build_report(tmp_path / "results", tmp_path / "out", Filters(searches=("tune-*",)))
    best = rep.tables["search:tune-ptq"]
    assert best["trial"].tolist() == ["b", "c", "a"]
    assert best["int8 top-1 (%)"].tolist() == [91.6, 91.4, 91.1]
    assert best["calib_sizes"].tolist() == ["1000", "5000", "100"]
    assert best["centers"].tolist() == ["zero", "min", "min"]
    assert (tmp_path / "out" / "search_tune-ptq.png").stat().st_size > 15_000
    assert rep.summary[-2] == "search tune-ptq: 3 trials, best b int8 top-1 91.60%"
