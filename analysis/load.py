"""Reading the result tables for the report: ``load_tables``, its ``Filters`` and ``ReportError``."""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from compress.results import ROW_KEYS, TABLES, read_table

log = logging.getLogger(__name__)

# spec fields that differ between every run by construction, never a searched parameter
NOT_SEARCHED = ("spec_run_id", "spec_results")


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


NO_FILTERS = Filters()  # every row


def load_tables(root: str | os.PathLike, filters: Filters = NO_FILTERS,
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
                          f"{first_few(runs)}; searches {first_few(searches)}; models {first_few(models)}; "
                          f"kinds {first_few(kinds)})")
    return kept


def first_few(values: Sequence[str], n: int = 4) -> str:
    """The first ``n`` values and how many more: ``a, b, c, d, ... (2 more)``; ``none`` when empty."""
    if not values:
        return "none"
    return ", ".join(values[:n]) + (f", ... ({len(values) - n} more)" if len(values) > n else "")
