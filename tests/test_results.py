"""Parquet result tables: atomic writes, one schema per table, spec and provenance on every row."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from compress.compact import CompactError, compact_results
from compress.provenance import PROJECT_DIR, PROVENANCE_FIELDS, job_id, provenance, spec_row
from compress.results import (
    atomic_write_bytes,
    find_unit,
    make_schema,
    read_table,
    read_unit,
    table_files,
    write_rows,
)
from jobs import tables
from jobs.specs import PruneSpec, TrainSpec

SCHEMA = make_schema({"run_id": pa.string(), "phase": pa.int64(), "top1": pa.float64()}, PruneSpec)


def _row(**kw) -> dict:
    return {"run_id": "r", "phase": 1, "top1": 50.0, **kw}


def test_write_rows_leaves_no_temporary_files_and_reads_back(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "phases" / "r-p01.parquet", [_row(), _row(phase=2)], SCHEMA)
    assert [p.name for p in path.parent.iterdir()] == ["r-p01.parquet"]
    table = pq.read_table(path)
    assert table.schema == SCHEMA
    assert table.column("phase").to_pylist() == [1, 2]


def test_missing_columns_are_null(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "a.parquet", [{"run_id": "r"}], SCHEMA)
    row = pq.read_table(path).to_pylist()[0]
    assert row["phase"] is None and row["top1"] is None and row["git_commit"] is None and row["spec_seed"] is None


def test_unknown_column_is_a_key_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="not_a_column"):
        write_rows(tmp_path / "t" / "a.parquet", [_row(not_a_column=1)], SCHEMA)
    assert not (tmp_path / "t").exists()


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    write_rows(path, [_row()], SCHEMA)
    old = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]


def test_rewriting_a_unit_of_work_replaces_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "phases" / "r-p01.parquet"
    write_rows(path, [_row(top1=10.0)], SCHEMA)
    write_rows(path, [_row(top1=20.0)], SCHEMA)
    assert read_table(tmp_path, "phases").column("top1").to_pylist() == [20.0]


def test_every_file_of_a_table_has_the_one_schema(tmp_path: Path) -> None:
    folder = tmp_path / "phases"
    prune = PruneSpec(run_id="p", keep_dense=("conv1", "linear"))
    train = TrainSpec(run_id="t")
    write_rows(folder / "p-p00.parquet", [{"run_id": "p", "phase": 0, **spec_row(prune), **provenance("cpu")}],
               tables.PHASES)
    write_rows(folder / "t-p01.parquet", [{"run_id": "t", "top1": 1.0, **spec_row(train)}], tables.PHASES)
    write_rows(folder / "x-p01.parquet", [], tables.PHASES)
    for f in folder.iterdir():
        assert pq.read_schema(f).remove_metadata() == tables.PHASES.remove_metadata(), f.name
    table = ds.dataset(folder, format="parquet").to_table()
    assert table.num_rows == 2
    rows = {r["run_id"]: r for r in table.to_pylist()}
    assert rows["p"]["spec_keep_dense"] == "conv1,linear" and rows["p"]["spec_phases"] == 12
    assert rows["t"]["spec_phases"] is None and rows["t"]["spec_epochs"] == 30


def test_schema_columns_are_table_then_spec_then_provenance() -> None:
    names = SCHEMA.names
    spec_cols = [f"spec_{f.name}" for f in dataclasses.fields(PruneSpec)]
    assert names == ["run_id", "phase", "top1", *spec_cols, *PROVENANCE_FIELDS]
    assert SCHEMA.field("spec_final_sparsity").type == pa.float64()
    assert SCHEMA.field("spec_keep_dense").type == pa.string()
    assert SCHEMA.field("spec_randaugment").type == pa.bool_()


def test_read_table_of_a_missing_table() -> None:
    with pytest.raises(FileNotFoundError, match="no ptq results under"):
        read_table("/nonexistent-results", "ptq")


def test_provenance_names_commit_versions_host_and_time() -> None:
    p = provenance("cpu")
    assert set(PROVENANCE_FIELDS) == set(p)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", p["git_commit"]) and p["git_commit"] == head
    assert isinstance(p["git_dirty"], bool)
    import torch
    import torchvision

    assert p["torch_version"] == torch.__version__ and p["torchvision_version"] == torchvision.__version__
    assert p["device_name"] == "cpu" and p["host"]
    assert p["written_at"].tzinfo is not None and abs(dt.datetime.now(dt.UTC) - p["written_at"]).total_seconds() < 60
    assert p["job_id"] == f"local-{os.getpid()}"


def test_job_id_from_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert job_id() == "4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert job_id() == "4240_3"


def test_spec_row_flattens_every_field() -> None:
    spec = PruneSpec(run_id="x", keep_dense=("conv1", "linear"), seed=3)
    row = spec_row(spec)
    assert row["spec_keep_dense"] == "conv1,linear" and row["spec_seed"] == 3 and row["spec_run_id"] == "x"
    assert len(row) == len(dataclasses.fields(PruneSpec))


def test_read_table_keeps_a_column_that_older_files_lack(tmp_path: Path) -> None:
    """A spec field added later: files written before it read null there, and the column is not dropped."""
    old = pa.schema([f for f in SCHEMA if f.name != "spec_max_layer_sparsity"])
    write_rows(tmp_path / "phases" / "a-old-p01.parquet", [_row(run_id="old")], old)
    write_rows(tmp_path / "phases" / "b-new-p01.parquet", [_row(run_id="new", spec_max_layer_sparsity=0.97)], SCHEMA)
    rows = {r["run_id"]: r for r in read_table(tmp_path, "phases").to_pylist()}
    assert rows["new"]["spec_max_layer_sparsity"] == 0.97 and rows["old"]["spec_max_layer_sparsity"] is None
    (tmp_path / "phases" / ".c-p01.parquet.123.tmp").write_bytes(b"partial")  # a write in progress: not read
    (tmp_path / "phases" / "_c-p01.parquet").write_bytes(b"partial")
    assert read_table(tmp_path, "phases").num_rows == 2


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o027])
def test_result_files_get_the_mode_the_umask_gives(tmp_path: Path, umask: int) -> None:
    """Teammates on a shared filesystem read what a job wrote: not mkstemp's 0600 whatever the umask."""
    import torch

    from compress.results import atomic_write_bytes, torch_save_atomic, write_rows

    saved = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
        torch_save_atomic({"x": torch.zeros(1)}, tmp_path / "state.pt")
        write_rows(tmp_path / "phases" / "r-p00.parquet", [{"a": 1}], pa.schema([("a", pa.int64())]))
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what open() gives under this umask
    finally:
        os.umask(saved)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == dict.fromkeys(["summary.json", "state.pt", "r-p00.parquet", "plain"], 0o666 & ~umask)


# ---- damaged files: one warning each, the rest of the table read ----------------------------------

DAMAGE = ("empty", "cut short", "corrupt pages")


def _damage(path: Path, how: str) -> None:
    """Damage a real Parquet file in place: 0 bytes, its first half only (no footer), or its data pages
    overwritten while its footer (its length in the 4 bytes before the closing ``PAR1``) stays whole."""
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "cut short":
        path.write_bytes(data[: len(data) // 2])
    else:
        end = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
        path.write_bytes(data[:4] + b"\xff" * (end - 4) + data[end:])
        assert pq.read_schema(path) == pq.read_schema(path)  # the footer still parses: only reading rows fails


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_file_is_left_out_of_read_table_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                   how: str) -> None:
    for phase in (0, 1, 2):
        write_rows(tmp_path / "phases" / f"r-p{phase:02d}.parquet", [_row(phase=phase, top1=10.0 * phase)], SCHEMA)
    bad = tmp_path / "phases" / "r-p01.parquet"
    _damage(bad, how)
    damaged = bad.read_bytes()
    with caplog.at_level(logging.WARNING, logger="compress"):
        for _ in range(3):  # every read leaves it out; the warning comes once
            rows = read_table(tmp_path, "phases").to_pylist()
            assert sorted((r["phase"], r["top1"]) for r in rows) == [(0, 0.0), (2, 20.0)]
    (line,) = _warnings(caplog)
    assert line.startswith(f"damaged result file {bad} (") and "delete it, or put back a good copy" in line
    assert bad.read_bytes() == damaged  # left where it was, untouched


def test_a_table_whose_every_file_is_damaged_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i, how in enumerate(DAMAGE):
        write_rows(tmp_path / "ptq" / f"r-minmax-{i}.parquet", [_row()], SCHEMA)
        _damage(tmp_path / "ptq" / f"r-minmax-{i}.parquet", how)
    with caplog.at_level(logging.WARNING, logger="compress"), \
            pytest.raises(FileNotFoundError, match="no readable ptq results under .*: every file of .* is damaged"):
        read_table(tmp_path, "ptq")
    assert len(_warnings(caplog)) == 3
    assert all("run its ptq command again (same --run-id)" in w for w in _warnings(caplog))


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_unit_reads_as_not_written_so_its_job_writes_it_again(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture,
                                                                      how: str) -> None:
    """``read_unit`` is what a PTQ task asks before writing: a damaged file is a unit to write again, over it."""
    path = tmp_path / "ptq" / "r-minmax-100.parquet"
    write_rows(path, [_row(top1=1.0)], SCHEMA)
    _damage(path, how)
    with caplog.at_level(logging.WARNING, logger="compress"):
        assert read_unit(path) is None
        assert read_unit(path) is None
        # without a footer it is nowhere; with one (only the pages damaged) its footer still says where
        assert find_unit(path) == (None if how != "corrupt pages" else (path, 0, 1))
    assert len(_warnings(caplog)) == 1 and str(path) in _warnings(caplog)[0]
    write_rows(path, [_row(top1=2.0)], SCHEMA)
    assert read_unit(path).column("top1").to_pylist() == [2.0]
    assert read_table(tmp_path, "ptq").column("top1").to_pylist() == [2.0]


@pytest.mark.parametrize("how", ["empty", "cut short"])
def test_compaction_leaves_a_damaged_file_in_place_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                               how: str) -> None:
    for i in range(4):
        write_rows(tmp_path / "ptq" / f"r-minmax-{i}.parquet", [_row(phase=i)], SCHEMA)
    bad = tmp_path / "ptq" / "r-minmax-2.parquet"
    _damage(bad, how)
    damaged = bad.read_bytes()
    with caplog.at_level(logging.WARNING, logger="compress"):
        (done,) = compact_results(tmp_path, ["ptq"])
    assert (done.files_before, done.merged, done.written, done.rows) == (3, 3, 1, 3)
    assert bad.read_bytes() == damaged  # neither merged nor removed
    assert sorted(p.name for p in (tmp_path / "ptq").iterdir())[1:] == ["r-minmax-2.parquet"]
    assert [p.name.startswith("compact-") for p in table_files(tmp_path / "ptq")] == [True]
    (line,) = _warnings(caplog)
    assert str(bad) in line and "passed over by every read and compaction, the file left in place" in line
    assert sorted(read_table(tmp_path, "ptq").column("phase").to_pylist()) == [0, 1, 3]


def test_compaction_refuses_a_file_whose_pages_do_not_read_naming_it(tmp_path: Path) -> None:
    """A file whose footer is whole but whose rows do not read is found only by reading it: the compaction
    stops at it in one line, naming it and what to do, before it writes or removes anything."""
    for i in range(3):
        write_rows(tmp_path / "ptq" / f"r-minmax-{i}.parquet", [_row(phase=i)], SCHEMA)
    _damage(tmp_path / "ptq" / "r-minmax-1.parquet", "corrupt pages")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ptq").iterdir()}
    with pytest.raises(CompactError, match=r"cannot read .*r-minmax-1\.parquet: .*move it out of the table folder"):
        compact_results(tmp_path, ["ptq"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "ptq").iterdir()} == before
