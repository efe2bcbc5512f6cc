"""The report's intervals and p-values: rows with predictions written to real Parquet files, each rendered cell
checked against ``analysis.stats`` on the same per-image correctness; rows without predictions show ``-``.

The rows are made from chosen per-image correctness over 10,000 labels: a prediction is the label where the
model is right and the next class where it is wrong, and each row's top-1 is what those predictions score.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner

from analysis.load import Filters, load_tables
from analysis.prune_sections import configuration_table
from analysis.report import build_report
from analysis.significance import format_interval, format_p
from analysis.stats import bootstrap_interval, mcnemar
from cli.main import cli
from compress.data import load_cifar10, load_test_labels
from compress.results import write_rows
from jobs import tables
from jobs.specs import PruneSpec
from jobs.training import run_prune
from tests.helpers import md_tables

N = 10_000
LABELS = np.random.default_rng(42).integers(0, 10, N)
OLD_PHASES = pa.schema([f for f in tables.PHASES if f.name != "predictions"])  # a file from before the column
OLD_PTQ = pa.schema([f for f in tables.PTQ if f.name not in ("predictions", "float_predictions")])


def correctness(right: int, seed: int) -> np.ndarray:
    out = np.zeros(N, bool)
    out[np.random.default_rng(seed).choice(N, right, replace=False)] = True
    return out


def flip(correct: np.ndarray, lose: int, gain: int, seed: int) -> np.ndarray:
    """``correct`` with ``lose`` right images made wrong and ``gain`` wrong ones made right: McNemar b, c."""
    rng = np.random.default_rng(seed)
    out = correct.copy()
    out[rng.choice(np.flatnonzero(correct), lose, replace=False)] = False
    out[rng.choice(np.flatnonzero(~correct), gain, replace=False)] = True
    return out


def predictions(correct: np.ndarray, labels: np.ndarray = LABELS) -> bytes:
    return np.where(correct, labels, (labels + 1) % 10).astype(np.uint8).tobytes()


def top1(correct: np.ndarray) -> float:
    return 100.0 * int(correct.sum()) / len(correct)


def interval(*runs: np.ndarray) -> str:
    lo, hi = bootstrap_interval(np.stack(runs))
    return f"[{lo:.2f}, {hi:.2f}]"


def p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


DENSE = correctness(9_173, seed=1)
A = {0: correctness(9_030, seed=10), 1: correctness(9_020, seed=11)}  # the best configuration
B = {s: flip(c, 150, 50, seed=20 + s) for s, c in A.items()}  # clearly worse: 100 images per seed
E = {s: flip(c, 10, 8, seed=30 + s) for s, c in A.items()}  # 2 images per seed: no evidence
C = {2: correctness(8_990, seed=12)}  # a seed the best configuration never ran: nothing to pair


def phase_rows(run: str, seed: int, lr: float, final: np.ndarray | None, search: str = "", trial: str = "",
               final_top1: float | None = None) -> list[dict]:
    """Phase 0 (the dense model) and phase 1 (``final``, or no predictions when None) of a finished prune run."""
    base = {"run_id": run, "kind": "prune", "spec_phases": 1, "spec_seed": seed, "spec_lr": lr, "spec_run_id": run,
            "spec_results": "/r", "spec_weights": "/a/w.th", "spec_epochs": 5, "spec_model": "resnet20a",
            "search_id": search, "trial_id": trial}
    last = {"phase": 1, "sparsity": 0.9, "target_sparsity": 0.9, "epochs": 5, "train_seconds": 60.0,
            "top1": top1(final) if final is not None else final_top1}
    if final is not None:
        last["predictions"] = predictions(final)
    return [{**base, "phase": 0, "sparsity": 0.0, "target_sparsity": 0.0, "epochs": 0, "train_seconds": 0.0,
             "top1": top1(DENSE), "predictions": predictions(DENSE)}, {**base, **last}]


def write_phases(root: Path, rows: list[dict]) -> None:
    for r in rows:
        schema = tables.PHASES if "predictions" in r else OLD_PHASES
        write_rows(root / "phases" / f"{r['run_id']}-p{r['phase']:02d}.parquet", [r], schema)


def ptq_row(run: str, method: str, observer: str, int8: np.ndarray | None, float_: np.ndarray | None,
            **extra) -> dict:
    row = {"run_id": run, "kind": "ptq", "task": f"{observer}-1000", "method": method, "observer": observer,
           "weight_observer": "per_channel", "engine": "x86", "activation_bits": 7, "calib_size": 1000,
           "alpha": 1.0 if method == "manual" else None, "center": "min" if method == "manual" else None,
           "float_top1": top1(float_ if float_ is not None else DENSE), "test_images": N, "float_bytes": 1_084_416,
           "int8_bytes": 276_976, "int8_packed_bytes": 302_654, "sparsity": 0.0, "search_id": "", "trial_id": "",
           "spec_model": "resnet20a", "spec_weights": "/w/resnet20-12fca82f.th", **extra}
    row["int8_top1"] = top1(int8) if int8 is not None else 91.0
    if int8 is not None:
        row.update(predictions=predictions(int8), float_predictions=predictions(float_))
    return row


FX, MANUAL = flip(DENSE, 30, 10, seed=40), flip(DENSE, 5, 6, seed=41)  # int8 against float: b=10, c=30; 6, 5
TRIALS = {"a": flip(DENSE, 20, 25, seed=50), "b": flip(DENSE, 90, 30, seed=51), "c": None}
SEARCH = {"x": flip(A[0], 60, 20, seed=60), "y": flip(A[0], 200, 20, seed=61)}  # prune trials: x 89.90, y 88.50


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stats-results")
    rows = [r for s, c in A.items() for r in phase_rows(f"a{s}", s, 0.03, c)]
    rows += [r for s, c in B.items() for r in phase_rows(f"b{s}", s, 0.05, c)]
    rows += [r for s, c in E.items() for r in phase_rows(f"e{s}", s, 0.04, c)]
    rows += phase_rows("c2", 2, 0.02, C[2])
    rows += [{k: v for k, v in r.items() if k != "predictions"}  # written before predictions were kept
             for r in phase_rows("old0", 0, 0.01, None, final_top1=90.0)]
    rows += [r for t, c in SEARCH.items()
             for r in phase_rows(f"srch-{t}", 0, 0.3 if t == "x" else 0.6, c, search="srch", trial=t)]
    write_phases(root, rows)
    write_rows(root / "ptq" / "p.parquet", [ptq_row("p", "fx", "minmax", FX, DENSE),
                                            ptq_row("p", "manual", "minmax", MANUAL, DENSE)], tables.PTQ)
    trials = [ptq_row(f"tune-ptq-{t}", "manual", "histogram", c, DENSE if c is not None else None,
                      search_id="tune-ptq", trial_id=t, spec_weights="/w/other.th", calib_size=100 * (i + 1),
                      task=f"histogram-{100 * (i + 1)}", spec_calib_sizes=str(100 * (i + 1)))
              for i, (t, c) in enumerate(TRIALS.items())]
    write_rows(root / "ptq" / "search.parquet", [r for r in trials if "predictions" in r], tables.PTQ)
    write_rows(root / "ptq" / "search-old.parquet", [r for r in trials if "predictions" not in r], OLD_PTQ)
    return root


@pytest.fixture(scope="module")
def report(results: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("stats-report")
    rep = build_report(results, out, labels=LABELS)
    return rep, md_tables((out / "report.md").read_text()), (out / "report.md").read_text()


def test_formats() -> None:
    assert format_interval((89.685, 90.851)) == "[89.69, 90.85]" and format_interval(None) == "-"
    assert format_p(0.03857421875) == "0.039" and format_p(2.1e-05) == "2.1e-05" and format_p(1.0) == "1.000"
    assert format_p(None) == "-"


def test_every_run_and_phase_top1_has_its_interval(results: Path, report, tmp_path: Path) -> None:
    rep, md, text = report
    runs = md["Pruning and training"][0].set_index("run")
    finals = {**{f"a{s}": c for s, c in A.items()}, **{f"b{s}": c for s, c in B.items()},
              **{f"e{s}": c for s, c in E.items()}, "c2": C[2]}
    for run, c in finals.items():
        assert runs.loc[run, "final top-1 (%)"] == f"{top1(c):.2f}"
        assert runs.loc[run, "final top-1 95% CI"] == interval(c)
    assert runs.loc["old0", "final top-1 95% CI"] == "-"
    phases = md["Run a0"][0]
    assert phases["top-1 95% CI"].tolist() == [interval(DENSE), interval(A[0])]
    lo, hi = map(float, phases["top-1 95% CI"][1].strip("[]").split(", "))
    assert lo < top1(A[0]) < hi and hi - lo == pytest.approx(2 * 1.96 * 100 * np.sqrt(0.903 * 0.097 / N), abs=0.06)
    assert md["Run old0"][0]["top-1 95% CI"].tolist() == ["-", "-"]  # both rows written without predictions
    dense = rep.tables["dense_baselines"]
    assert dense["top-1 95% CI"].tolist() == ["-"]  # the mean of all runs' phase 0, and old0 has no predictions
    only_new = build_report(results, tmp_path, Filters(runs=("a*",)), labels=LABELS)
    assert only_new.tables["dense_baselines"]["top-1 95% CI"].tolist() == [interval(DENSE, DENSE)] == [interval(DENSE)]
    pareto = rep.tables["pareto:resnet20a"].set_index(["run", "phase"])
    assert pareto.loc[("a0", 1), "top-1 95% CI"] == interval(A[0])
    assert pareto.loc[("a0", 0), "top-1 95% CI"] == interval(DENSE)
    assert "percentile bootstrap interval of top-1 over the test images" in text


def test_configurations_are_tested_against_the_best_on_paired_seeds(results: Path, report) -> None:
    rep, md, _ = report
    configs = md["Pruning and training"][1].set_index("configuration")
    assert list(configs.index)[0] == "lr=0.03"
    best = configs.loc["lr=0.03"]
    assert best["top-1 95% CI"] == interval(A[0], A[1])
    assert (best["seeds paired with best"], best["p vs best"], best["significant at 0.05"]) == ("(best)", "-", "-")
    for name, runs, call in (("lr=0.05", B, "yes"), ("lr=0.04", E, "no")):
        b, c, p = mcnemar(np.stack([runs[0], runs[1]]), np.stack([A[0], A[1]]))
        assert (b, c) == ((100, 300) if runs is B else (16, 20)) and (p < 0.05) == (call == "yes")
        line = configs.loc[name]
        assert line["top-1 95% CI"] == interval(runs[0], runs[1])
        assert (line["seeds paired with best"], line["p vs best"], line["significant at 0.05"]) == ("0,1", p_text(p),
                                                                                                    call)
    assert tuple(configs.loc["lr=0.02", ["seeds paired with best", "p vs best", "significant at 0.05"]]) == ("", "-",
                                                                                                              "-")
    assert tuple(configs.loc["lr=0.01", ["top-1 95% CI", "p vs best", "significant at 0.05"]]) == ("-", "-", "-")
    # the library call gives the same table
    pd.testing.assert_frame_equal(configuration_table(load_tables(results)["phases"], LABELS),
                                  rep.tables["configurations"])


def test_prune_search_trials_against_the_best(report) -> None:
    _, md, _ = report
    trials = md["Search srch (prune, 2 trials)"][0].set_index("trial")
    x, y = SEARCH["x"], SEARCH["y"]
    assert list(trials.index) == ["x", "y"]
    assert trials.loc["x", "top-1 95% CI"] == interval(x) and trials.loc["y", "top-1 95% CI"] == interval(y)
    p = mcnemar(y, x)[2]
    assert tuple(trials.loc["y", ["p vs best", "significant at 0.05"]]) == (p_text(p), "yes")
    assert tuple(trials.loc["x", ["p vs best", "significant at 0.05"]]) == ("(best)", "-")


def test_int8_is_tested_against_its_float_model(report) -> None:
    rep, md, _ = report
    best = md["Float against int8"][0]
    best = best[best["model"] == "resnet20a resnet20-12fca82f.th"].set_index("method")
    for method, int8, call in (("fx", FX, "yes"), ("manual", MANUAL, "no")):
        b, c, p = mcnemar(int8, DENSE)
        assert (b, c) == ((10, 30) if method == "fx" else (6, 5))
        line = best.loc[method]
        assert line["int8 top-1 (%)"] == f"{top1(int8):.2f}" and line["int8 top-1 95% CI"] == interval(int8)
        assert line["float top-1 95% CI"] == interval(DENSE)
        assert (line["p vs float"], line["significant at 0.05"]) == (p_text(p), call)
    assert best.loc["fx", "p vs float"] == "0.002"  # 2 P(X <= 10), X ~ Bin(40, 1/2) = 0.00222
    search = rep.tables["search:tune-ptq"].set_index("trial")
    assert list(search.index) == ["a", "b", "c"]  # by int8 top-1: a 91.78, b 91.13, c 91.00 (no predictions)
    a, b = TRIALS["a"], TRIALS["b"]
    assert search.loc["a", "top-1 95% CI"] == interval(a) and search.loc["a", "p vs best"] == "(best)"
    assert search.loc["a", "p vs float"] == p_text(mcnemar(a, DENSE)[2])
    assert tuple(search.loc["b", ["p vs float", "p vs best", "significant at 0.05"]]) == (
        p_text(mcnemar(b, DENSE)[2]), p_text(mcnemar(b, a)[2]), "yes")
    assert tuple(search.loc["c", ["top-1 95% CI", "p vs float", "p vs best", "significant at 0.05"]]) == ("-",) * 4


def test_without_labels_every_cell_is_a_dash_and_the_report_says_why(results: Path, tmp_path: Path) -> None:
    rep = build_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "the test labels were not given" in text
    for name, df in rep.tables.items():
        for column in df.columns:
            if "CI" in column or column.startswith("p vs") or column == "significant at 0.05":
                assert set(df[column]) <= {"-", "(best)"}, (name, column)


def test_labels_of_another_data_set_give_dashes_not_wrong_numbers(results: Path, tmp_path: Path) -> None:
    rep = build_report(results, tmp_path, Filters(runs=("a*",)), labels=np.roll(LABELS, 1))
    assert set(rep.tables["runs"]["final top-1 95% CI"]) == {"-"}
    assert any("do not give their top-1 against the test labels" in line for line in rep.summary)
    assert "Note: the predictions of 4 row(s)" in (tmp_path / "report.md").read_text()


def test_old_files_alone_still_render(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "predictions"} for r in phase_rows("old", 0, 0.01, A[0])]
    write_phases(tmp_path / "results", rows)
    rep = build_report(tmp_path / "results", tmp_path / "out", labels=LABELS)
    assert rep.tables["runs"]["final top-1 95% CI"].tolist() == ["-"]
    assert rep.tables["configurations"][["top-1 95% CI", "p vs best"]].values.tolist() == [["-", "-"]]


@pytest.mark.slow  # one short prune run (~5 s)
def test_cli_reads_the_labels_from_the_data_root(synthetic_cifar: Path, synthetic_weights: Path,
                                                  tmp_path: Path) -> None:
    """A real run's rows and the synthetic test set's labels: the interval of each phase through the command."""
    assert (load_test_labels(synthetic_cifar) == load_cifar10(synthetic_cifar).test_y.numpy()).all()
    spec = PruneSpec(weights=str(synthetic_weights), data_root=str(synthetic_cifar), results=str(tmp_path / "r"),
                     run_id="solo", phases=1, epochs=1, final_sparsity=0.5, batch_size=50, train_size=50,
                     test_size=60, eval_batch_size=50, randaugment=False, device="cpu")
    run_prune(dataclasses.replace(spec))
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "r"), "--out", str(tmp_path / "out"),
                                   "--data-root", str(synthetic_cifar)])
    assert res.exit_code == 0, res.output
    shown = md_tables((tmp_path / "out" / "report.md").read_text())["Run solo"][0]
    labels = load_test_labels(synthetic_cifar)
    rows = pd.read_parquet(tmp_path / "r" / "phases").sort_values("phase")
    want = [interval(np.frombuffer(p, np.uint8) == labels[:60]) for p in rows["predictions"]]
    assert shown["top-1 95% CI"].tolist() == want and len(want) == 2
    bad = CliRunner().invoke(cli, ["report", str(tmp_path / "r"), "--out", str(tmp_path / "out2"),
                                   "--data-root", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and bad.output.startswith("error: CIFAR-10 not found under")
    assert not (tmp_path / "out2").exists()
