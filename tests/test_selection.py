"""``--select``: parsing selectors and choosing the int8 row to export (plain dict rows, no torch)."""

from __future__ import annotations

import doctest
from typing import Any

import pytest

import jobs.selection
from jobs.selection import Selector, describe, parse_selector, select_row


def row(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(run_id="r1", method="manual", observer="histogram", weight_observer="per_channel",
                                calib_size=10000, alpha=0.99, center="min", engine="fbgemm", task="cifar10",
                                float_top1=90.34, int8_top1=90.0, int8_packed_bytes=50000)
    base.update(kw)
    return base


def pick(rows: list[dict[str, Any]], text: str) -> dict[str, Any]:
    return select_row(rows, parse_selector(text), "r1").row


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(jobs.selection)
    assert result.attempted >= 3
    assert result.failed == 0


# --- parsing ---------------------------------------------------------------------------------

def test_parse_defaults_to_best_and_keeps_the_text() -> None:
    assert parse_selector("method=fx") == Selector("best", None, (("method", "fx"),), "method=fx")


def test_parse_reads_every_kind_of_term_and_ignores_whitespace() -> None:
    text = " smallest , max-drop = 0.3,alpha=0.99 ,  center=- "
    assert parse_selector(text) == Selector("smallest", 0.3, (("alpha", "0.99"), ("center", "-")), text)


def test_parse_max_drop_zero_is_allowed() -> None:
    assert parse_selector("max-drop=0").max_drop == 0.0


@pytest.mark.parametrize("text, words", [
    ("", "select: empty selector; use best, smallest, max-drop=PP or COLUMN=VALUE with COLUMN one of method,"),
    ("   ", "select: empty selector"),
    ("best,,method=fx", "select: empty term in 'best,,method=fx'"),
    ("best,smallest", "select: objective given twice ('best' and 'smallest'); give one of best, smallest"),
    ("smallest, smallest", "objective given twice"),
    ("fastest", "select: unknown term 'fastest'; use best, smallest, max-drop=PP or COLUMN=VALUE with COLUMN one "
                "of method, observer, weight_observer, calib_size, alpha, center, engine, task"),
    ("colour=red", "select: unknown column 'colour' in 'colour=red'; use best, smallest"),
    ("max-drop=abc", "select: 'max-drop=abc' needs a number of percentage points >= 0"),
    ("max-drop=-0.1", "select: 'max-drop=-0.1' needs a number of percentage points >= 0"),
    ("max-drop=nan", "needs a number of percentage points >= 0"),
    ("max-drop=", "needs a number of percentage points >= 0"),
    ("max-drop=0.3,max-drop=0.5", "select: max-drop given twice ('max-drop=0.5')"),
    ("method=fx,alpha=1,method=manual", "select: column 'method' given twice ('method=manual')"),
    ("method=", "select: 'method=' has no value; use method=VALUE, or method=- for an empty one"),
])
def test_parse_errors_are_one_line_naming_the_term(text: str, words: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_selector(text)
    msg = str(err.value)
    assert words in msg
    assert "\n" not in msg


# --- objectives and ties -------------------------------------------------------------------

def test_best_takes_the_highest_int8_top1() -> None:
    rows = [row(int8_top1=89.9), row(int8_top1=90.17, alpha=0.98), row(int8_top1=90.1)]
    assert pick(rows, "best")["alpha"] == 0.98
    assert pick(rows, "method=manual")["alpha"] == 0.98  # best is the default objective


def test_best_tie_prefers_the_smaller_packed_file_with_none_as_largest() -> None:
    rows = [row(int8_top1=90.2, int8_packed_bytes=None, alpha=0.9),
            row(int8_top1=90.2, int8_packed_bytes=60000, alpha=0.95),
            row(int8_top1=90.2, int8_packed_bytes=45000, alpha=0.97),
            row(int8_top1=90.1, int8_packed_bytes=1000, alpha=0.99)]
    assert pick(rows, "best")["alpha"] == 0.97
    assert pick(rows[:2], "best")["alpha"] == 0.95


def test_best_full_tie_keeps_the_earlier_row() -> None:
    rows = [row(alpha=0.9, int8_packed_bytes=None), row(alpha=0.95, int8_packed_bytes=None),
            row(alpha=0.97, int8_packed_bytes=None)]
    assert pick(rows, "best")["alpha"] == 0.9
    rows = [row(alpha=0.95), row(alpha=0.9)]
    assert pick(rows, "best")["alpha"] == 0.95


def test_smallest_takes_the_smallest_packed_file_and_skips_rows_without_one() -> None:
    rows = [row(int8_packed_bytes=None, int8_top1=91.0, alpha=0.9),
            row(int8_packed_bytes=48000, alpha=0.95),
            row(int8_packed_bytes=44167, int8_top1=88.0, alpha=0.97),
            row(int8_packed_bytes=52000, alpha=0.99)]
    assert pick(rows, "smallest")["alpha"] == 0.97


def test_smallest_tie_prefers_higher_int8_top1_then_the_earlier_row() -> None:
    rows = [row(int8_packed_bytes=44000, int8_top1=89.5, alpha=0.9),
            row(int8_packed_bytes=44000, int8_top1=90.1, alpha=0.95),
            row(int8_packed_bytes=44000, int8_top1=90.1, alpha=0.97),
            row(int8_packed_bytes=45000, int8_top1=91.0, alpha=0.99)]
    assert pick(rows, "smallest")["alpha"] == 0.95
    assert pick(rows[2:], "smallest")["alpha"] == 0.97


def test_reasons_say_what_was_chosen_among_how_many() -> None:
    rows = [row(int8_top1=90.17, float_top1=90.34)] + [row(int8_top1=89.0 + i / 10) for i in range(11)]
    assert select_row(rows, parse_selector("best"), "r1").reason == (
        "best: highest int8 top-1 90.17% (float 90.34%, -0.17 pp) of 12 rows "
        "[manual histogram per_channel calib 10000 alpha 0.99 center min]")
    rows = [row(int8_packed_bytes=44167, int8_top1=90.05, method="fx", alpha=None, center=None)] + [
        row(int8_top1=90.1 + i / 100, int8_packed_bytes=50000 + i) for i in range(4)] + [row(int8_top1=85.0)]
    assert select_row(rows, parse_selector("smallest,max-drop=0.3"), "r1").reason == (
        "smallest: 44,167 B packed, the smallest of 5 rows within 0.3 pp of float (int8 90.05%, float 90.34%) "
        "[fx histogram per_channel calib 10000]")


def test_reason_names_the_filters_and_shows_a_gain_with_a_plus_sign() -> None:
    rows = [row(method="fx", int8_top1=90.5, float_top1=90.34, alpha=None, center=None), row(int8_top1=95.0)]
    assert select_row(rows, parse_selector("method=fx"), "r1").reason == (
        "best: highest int8 top-1 90.50% (float 90.34%, +0.16 pp) of 1 row matching method=fx "
        "[fx histogram per_channel calib 10000]")


# --- filters -------------------------------------------------------------------------------

def test_filters_compare_numbers_numerically() -> None:
    rows = [row(alpha=0.98, calib_size=1000), row(alpha=0.99, calib_size=10000, observer="a"),
            row(alpha=1.0, calib_size=10000, observer="b"), row(alpha=0.99000000001, calib_size=1000, observer="c")]
    assert pick(rows, "alpha=0.99,calib_size=10000")["observer"] == "a"
    assert pick(rows, "alpha=1")["observer"] == "b"
    assert pick(rows, "alpha=1.00,calib_size=1e4")["observer"] == "b"
    with pytest.raises(ValueError, match="matches none"):
        pick(rows, "calib_size=ten")


def test_numeric_filters_ignore_float_rounding_in_the_rows() -> None:
    rows = [row(alpha=0.1 * 3, int8_top1=89.0), row(alpha=0.4, int8_top1=91.0)]  # 0.30000000000000004
    assert pick(rows, "alpha=0.3")["int8_top1"] == 89.0


def test_filters_compare_strings_exactly() -> None:
    rows = [row(observer="histogram", int8_top1=89.0), row(observer="histogram_v2", int8_top1=91.0)]
    assert pick(rows, "observer=histogram")["int8_top1"] == 89.0
    with pytest.raises(ValueError, match="matches none"):
        pick(rows, "observer=Histogram")


@pytest.mark.parametrize("value", ["-", "none", "None", "NONE"])
def test_dash_or_none_matches_empty_values_only(value: str) -> None:
    rows = [row(method="manual", int8_top1=91.0), row(method="fx", alpha=None, center=None, int8_top1=89.0)]
    assert pick(rows, f"alpha={value}")["method"] == "fx"
    assert pick(rows, f"center={value}")["method"] == "fx"


def test_a_real_value_never_matches_an_empty_cell() -> None:
    rows = [row(alpha=None, int8_top1=91.0), row(alpha=0.99, int8_top1=89.0)]
    assert pick(rows, "alpha=0.99")["int8_top1"] == 89.0


# --- max-drop --------------------------------------------------------------------------------

def test_max_drop_keeps_a_row_exactly_at_the_limit() -> None:
    # 89.01 - 88.71 is 0.30000000000001137 in floating point: still "exactly" 0.3 pp
    rows = [row(float_top1=89.01, int8_top1=88.71, int8_packed_bytes=40000),
            row(float_top1=89.01, int8_top1=89.0, int8_packed_bytes=50000)]
    assert pick(rows, "smallest,max-drop=0.3")["int8_packed_bytes"] == 40000
    rows = [row(float_top1=90.34, int8_top1=90.04, int8_packed_bytes=40000),
            row(float_top1=90.34, int8_top1=90.3, int8_packed_bytes=50000)]
    assert pick(rows, "smallest,max-drop=0.3")["int8_packed_bytes"] == 40000
    rows = [row(float_top1=91.0, int8_top1=90.5, int8_packed_bytes=40000),
            row(float_top1=91.0, int8_top1=91.0, int8_packed_bytes=50000)]
    assert pick(rows, "smallest,max-drop=0.5")["int8_packed_bytes"] == 40000


def test_max_drop_drops_a_row_slightly_above_the_limit() -> None:
    rows = [row(float_top1=90.34, int8_top1=90.03, int8_packed_bytes=40000),
            row(float_top1=91.0, int8_top1=90.499999, int8_packed_bytes=41000),
            row(float_top1=90.34, int8_top1=90.3, int8_packed_bytes=50000)]
    assert pick(rows, "smallest,max-drop=0.3")["int8_packed_bytes"] == 50000
    assert pick(rows[1:], "smallest,max-drop=0.5")["int8_packed_bytes"] == 50000  # 0.500001 pp is out
    assert pick(rows[1:], "smallest,max-drop=0.500001")["int8_packed_bytes"] == 41000


def test_max_drop_compares_each_row_with_its_own_float_top1() -> None:
    rows = [row(float_top1=92.0, int8_top1=91.0, alpha=0.9), row(float_top1=90.0, int8_top1=89.9, alpha=0.95)]
    assert pick(rows, "max-drop=0.5")["alpha"] == 0.95
    assert pick(rows, "max-drop=1")["alpha"] == 0.9


# --- errors ----------------------------------------------------------------------------------

def test_no_rows() -> None:
    with pytest.raises(ValueError) as err:
        select_row([], parse_selector("best"), "r7")
    assert str(err.value) == "run r7 has no rows to select from"


def test_filter_matching_nothing_lists_the_values_of_the_run_sorted() -> None:
    rows = [row(method="manual"), row(method="fx", alpha=None), row(method="manual", alpha=0.95)]
    with pytest.raises(ValueError) as err:
        select_row(rows, parse_selector("method=pt2e"), "r7")
    assert str(err.value) == "select 'method=pt2e' matches none of the 3 rows of run r7; method values: fx, manual"
    with pytest.raises(ValueError) as err:
        select_row(rows, parse_selector("method=manual, alpha=0.5"), "r7")
    assert str(err.value) == ("select 'method=manual, alpha=0.5' matches none of the 3 rows of run r7; "
                              "alpha values: 0.95, 0.99, -")


def test_filter_matching_nothing_names_the_first_such_column() -> None:
    rows = [row(engine="fbgemm", task="cifar10"), row(engine="qnnpack", task="cifar10")]
    with pytest.raises(ValueError) as err:
        select_row(rows, parse_selector("engine=x86,task=cifar100"), "r7")
    assert str(err.value).endswith("; engine values: fbgemm, qnnpack")


def test_filters_matching_nothing_together_list_the_values_left_by_the_earlier_ones() -> None:
    rows = [row(method="manual", alpha=0.99, calib_size=1000), row(method="fx", alpha=None, calib_size=10000)]
    with pytest.raises(ValueError) as err:
        select_row(rows, parse_selector("method=fx,alpha=0.99"), "r7")
    assert str(err.value) == ("select 'method=fx,alpha=0.99' matches none of the 2 rows of run r7; "
                              "alpha values with method=fx: -")


def test_max_drop_leaving_nothing_names_the_closest_row() -> None:
    rows = [row(float_top1=90.34, int8_top1=89.0, alpha=0.9), row(float_top1=90.34, int8_top1=89.9, alpha=0.95),
            row(float_top1=90.34, int8_top1=90.2, method="fx", alpha=None, center=None)]
    with pytest.raises(ValueError) as err:
        select_row(rows, parse_selector("max-drop=0.1"), "r7")
    assert str(err.value) == ("no row of run r7 is within 0.1 pp of its float top-1 "
                              "(the closest: fx histogram per_channel calib 10000, 0.14 pp below)")
    with pytest.raises(ValueError) as err:
        select_row(rows, parse_selector("method=manual,max-drop=0.2"), "r7")
    assert str(err.value) == ("no row of run r7 matching method=manual is within 0.2 pp of its float top-1 "
                              "(the closest: manual histogram per_channel calib 10000 alpha 0.95 center min, "
                              "0.44 pp below)")


def test_smallest_without_any_packed_size_says_so() -> None:
    rows = [row(int8_packed_bytes=None), row(int8_packed_bytes=None, alpha=0.9), row(int8_packed_bytes=40000,
                                                                                    int8_top1=80.0)]
    with pytest.raises(ValueError) as err:
        select_row(rows, parse_selector("smallest,max-drop=1"), "r7")
    msg = str(err.value)
    assert msg == ("none of the 2 rows of run r7 within 1 pp of float has a packed size (int8_packed_bytes is "
                   "empty); use best, or select rows with a packed file")
    assert pick(rows, "best")["int8_top1"] == 90.0  # best still works on the same rows


def test_errors_leave_the_rows_untouched() -> None:
    rows = [row(), row(alpha=0.9)]
    before = [dict(r) for r in rows]
    for text in ("method=fx", "max-drop=0", "smallest,alpha=-"):
        with pytest.raises(ValueError):
            select_row(rows, parse_selector(text), "r1")
    assert rows == before


# --- describe --------------------------------------------------------------------------------

def test_describe_omits_empty_alpha_and_center() -> None:
    assert describe(row()) == "manual histogram per_channel calib 10000 alpha 0.99 center min"
    assert describe(row(method="fx", observer="minmax", weight_observer="per_tensor", calib_size=1000,
                        alpha=None, center=None)) == "fx minmax per_tensor calib 1000"
    assert describe(row(alpha=1.0, center=None)) == "manual histogram per_channel calib 10000 alpha 1"
