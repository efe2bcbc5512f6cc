"""``results compact``: a table's small Parquet files merged into a few, rows the same and each read once."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import compress.compact as compact_module
import compress.quant.observe as observe_module
import jobs.training
from cli.main import cli
from compress.compact import LOCK, CompactBusy, compact_results, compact_table
from compress.results import COMPACTED, TABLES, WriteError, find_unit, read_table, read_unit, table_files, write_rows
from jobs import lease, tables
from jobs.ptq import plan_tasks, run_ptq
from jobs.runs import settled
from jobs.specs import PruneSpec, PTQSpec
from jobs.training import run_prune


def _ptq_rows(run_id: str, task: str, n: int) -> list[dict]:
    return [{"run_id": run_id, "kind": "ptq", "task": task, "method": "manual", "alpha": 1.0 - i / 100,
             "int8_top1": 90.0 + i, "predictions": bytes([i % 10]) * 100} for i in range(n)]


def _sweep(root: Path, files: int = 12, rows: int = 3) -> None:
    """``files`` PTQ task files; one of them written before the ``predictions`` columns existed."""
    old = pa.schema([f for f in tables.PTQ if f.name not in ("predictions", "float_predictions")])
    for i in range(files):
        schema = old if i == 0 else tables.PTQ
        data = _ptq_rows(f"r{i // 4}", f"minmax-{i}", rows)
        if i == 0:
            data = [{k: v for k, v in r.items() if k != "predictions"} for r in data]
        write_rows(root / "ptq" / f"r{i // 4}-minmax-{i}.parquet", data, schema)


def _rows(root: Path, table: str = "ptq") -> list[str]:
    """Every row as JSON (NaN equal to NaN), sorted: read_table's order follows the files, which compaction changes."""
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in read_table(root, table).to_pylist())


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_compact_merges_the_files_and_keeps_every_row_once(tmp_path: Path) -> None:
    _sweep(tmp_path)
    before = _rows(tmp_path)
    assert len(before) == 36

    (done,) = compact_results(tmp_path, ["ptq", "phases"])  # a table with no folder is left out
    assert (done.table, done.files_before, done.files_after, done.rows, done.merged, done.written) == \
        ("ptq", 12, 1, 36, 12, 1)
    (compact,) = table_files(tmp_path / "ptq")
    assert compact.name.startswith("compact-") and compact.name.endswith("-0000.parquet")
    assert _rows(tmp_path) == before
    # a reader that knows nothing of the rule reads the same rows, the old file's missing column null
    plain = ds.dataset(tmp_path / "ptq", format="parquet").to_table()
    assert plain.num_rows == 36 and plain.column("predictions").null_count == 3
    assert [p.name for p in (tmp_path / "ptq").iterdir()] == [compact.name]  # no temporary left
    assert not (tmp_path / LOCK).exists()

    again = compact_results(tmp_path, ["ptq"])[0]  # nothing new: nothing written
    assert (again.files_before, again.files_after, again.merged, again.written) == (1, 1, 0, 0)
    assert table_files(tmp_path / "ptq") == [compact]


def test_every_unit_is_found_in_the_compact_file(tmp_path: Path) -> None:
    _sweep(tmp_path)
    originals = {p.name: pq.read_table(p).to_pylist() for p in table_files(tmp_path / "ptq")}
    compact_results(tmp_path, ["ptq"])
    for name, rows in originals.items():
        unit = read_unit(tmp_path / "ptq" / name)
        assert unit is not None
        got = unit.to_pylist()
        assert [{k: r[k] for k in rows[0]} for r in got] == rows, name
        assert find_unit(tmp_path / "ptq" / name)[2] == len(rows)
    assert read_unit(tmp_path / "ptq" / "never-written.parquet") is None
    assert find_unit(tmp_path / "ptq" / "never-written.parquet") is None


def test_groups_are_cut_by_size_and_new_files_join_the_last_one(tmp_path: Path) -> None:
    _sweep(tmp_path, files=12)
    size = max(p.stat().st_size for p in table_files(tmp_path / "ptq"))
    before = _rows(tmp_path)
    done = compact_table(tmp_path / "ptq", max_bytes=4 * size)
    assert done.written == 3 and done.files_after == 3 and _rows(tmp_path) == before
    names = [p.name for p in table_files(tmp_path / "ptq")]
    assert names == sorted(names) and all(n.startswith("compact-") for n in names)

    # new task files after the compaction: merged with the compact file that is not full yet
    write_rows(tmp_path / "ptq" / "s-minmax-1.parquet", _ptq_rows("s", "minmax-1", 2), tables.PTQ)
    write_rows(tmp_path / "ptq" / "s-minmax-2.parquet", _ptq_rows("s", "minmax-2", 2), tables.PTQ)
    more = _rows(tmp_path)
    assert len(more) == len(before) + 4
    done = compact_table(tmp_path / "ptq", max_bytes=10 * size)
    assert done.files_before == 5 and done.files_after < 5 and _rows(tmp_path) == more
    # the units merged twice are still found, with their rows
    assert read_unit(tmp_path / "ptq" / "r0-minmax-1.parquet").num_rows == 3
    assert read_unit(tmp_path / "ptq" / "s-minmax-2.parquet").column("task").to_pylist() == ["minmax-2"] * 2
    assert compact_table(tmp_path / "ptq", max_bytes=10 * size).written == 0


def test_a_crash_between_the_write_and_the_removals_loses_and_repeats_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sweep(tmp_path)
    before = _rows(tmp_path)
    removed: list[Path] = []
    real = compact_module._remove

    def crash_after_three(path: Path) -> None:
        if len(removed) == 3:
            raise OSError("killed")
        removed.append(path)
        real(path)

    monkeypatch.setattr(compact_module, "_remove", crash_after_three)
    with pytest.raises(OSError, match="killed"):
        compact_results(tmp_path, ["ptq"])
    files = table_files(tmp_path / "ptq")
    assert len(files) == 1 + 12 - 3  # the compact file beside the inputs not yet removed
    assert _rows(tmp_path) == before  # read_table: each row once
    assert ds.dataset(tmp_path / "ptq", format="parquet").to_table().num_rows == 36 + 27  # a plain reader: twice
    assert read_unit(tmp_path / "ptq" / "r0-minmax-1.parquet").num_rows == 3

    monkeypatch.setattr(compact_module, "_remove", real)
    assert not (tmp_path / LOCK).exists()  # released on the way out (a killed one is stale by its pid)
    done = compact_results(tmp_path, ["ptq"])[0]
    assert (done.leftovers, done.files_after, done.written) == (9, 1, 0)
    assert _rows(tmp_path) == before
    assert ds.dataset(tmp_path / "ptq", format="parquet").to_table().num_rows == 36


def test_a_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sweep(tmp_path)
    before, listing = _rows(tmp_path), _listing(tmp_path)

    def full_disk(path: Path, data: bytes) -> None:
        raise WriteError(28, f"cannot write {path}: No space left on device")

    monkeypatch.setattr(compact_module, "atomic_write_bytes", full_disk)
    with pytest.raises(WriteError):
        compact_results(tmp_path, ["ptq"])
    assert _listing(tmp_path) == listing and _rows(tmp_path) == before
    # a compact file whose write was killed: hidden, and removed by the next run
    (tmp_path / "ptq" / ".compact-20250101T000000000000Z-0000.parquet.x1.tmp").write_bytes(b"partial")
    monkeypatch.undo()
    compact_results(tmp_path, ["ptq"])
    assert sorted(p.name[0] for p in (tmp_path / "ptq").iterdir()) == ["c"] and _rows(tmp_path) == before


def test_a_file_written_again_under_a_merged_name_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leftover is skipped only while it is byte for byte the merged file: a later write of the name counts."""
    _sweep(tmp_path, files=3)
    monkeypatch.setattr(compact_module, "_remove", lambda path: None)  # every input stays, as after a crash
    compact_results(tmp_path, ["ptq"])
    monkeypatch.undo()
    assert read_table(tmp_path, "ptq").num_rows == 9
    write_rows(tmp_path / "ptq" / "r0-minmax-1.parquet", _ptq_rows("r0", "minmax-1", 1), tables.PTQ)
    assert read_table(tmp_path, "ptq").num_rows == 10


def test_a_second_compaction_at_once_is_refused(tmp_path: Path) -> None:
    _sweep(tmp_path, files=2)
    import socket

    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
    with pytest.raises(CompactBusy, match=f"another compaction of {tmp_path} is running .*remove {tmp_path / LOCK}"):
        compact_results(tmp_path, ["ptq"])
    assert len(table_files(tmp_path / "ptq")) == 2
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout), "since": "x"}))
    assert compact_results(tmp_path, ["ptq"])[0].written == 1  # a dead holder's lock is taken over
    assert not (tmp_path / LOCK).exists()


def _progress(root: Path, run_id: str, **fields) -> None:
    folder = root / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "progress.json").write_text(json.dumps(fields))


def test_only_rows_no_job_writes_again_are_merged(tmp_path: Path) -> None:
    for run_id in ("done", "busy", "gone"):
        for phase in range(3):
            write_rows(tmp_path / "phases" / f"{run_id}-p{phase:02d}.parquet",
                       [{"run_id": run_id, "kind": "prune", "phase": phase, "top1": 90.0 - phase}], tables.PHASES)
        write_rows(tmp_path / "modules" / f"{run_id}.parquet", [{"run_id": run_id, "module": "conv1"}],
                   tables.MODULES)
    _progress(tmp_path, "done", phase=2, finished=True)
    (tmp_path / "runs" / "done" / "summary.json").write_text("{}")
    _progress(tmp_path, "busy", phase=2)  # phases 0 and 1 written and moved past; phase 2 may be rewritten
    rule = settled(tmp_path)
    assert rule("ptq", pa.table({"run_id": ["x"]}))
    assert not rule("report", pa.table({"run_id": ["done"]}))
    before = {t: _rows(tmp_path, t) for t in ("phases", "modules")}

    phases, modules = compact_results(tmp_path, ["phases", "modules"], rule)
    kept = sorted(p.name for p in table_files(tmp_path / "phases") if not p.name.startswith("compact-"))
    assert kept == ["busy-p02.parquet", "gone-p00.parquet", "gone-p01.parquet", "gone-p02.parquet"]
    assert phases.merged == 5 and modules.merged == 0 and modules.files_after == 3  # one finished run: no group
    assert {t: _rows(tmp_path, t) for t in ("phases", "modules")} == before


def test_cli_refuses_while_a_job_holds_a_run_and_changes_nothing(tmp_path: Path) -> None:
    _sweep(tmp_path)
    folder = tmp_path / "runs" / "busy-run"
    lease.acquire(folder)  # this process: a live local job
    listing = _listing(tmp_path)
    out = CliRunner().invoke(cli, ["results", "compact", "--results", str(tmp_path)])
    assert out.exit_code == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: results root {tmp_path} is in use: run "
                                                                 f"busy-run is held by local-{os.getpid()}")
    assert _listing(tmp_path) == listing

    dry = CliRunner().invoke(cli, ["results", "compact", "--results", str(tmp_path), "--dry-run"])
    assert dry.exit_code == 0 and "note: results root" in dry.output
    assert "ptq: 12 -> 1 files, 36 rows" in dry.output and "[dry run]" in dry.output
    assert _listing(tmp_path) == listing

    lease.release(folder)
    out = CliRunner().invoke(cli, ["results", "compact", "--results", str(tmp_path)])
    assert out.exit_code == 0, out.output
    (line,) = out.output.splitlines()
    assert line.startswith("ptq: 12 -> 1 files, 36 rows, ") and line.endswith(" s")
    missing = CliRunner().invoke(cli, ["results", "compact", "--results", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


# --- real jobs on the tiny synthetic data: a job resumed after a compaction writes its rows once ---------


def _ptq_spec(data: Path, weights: Path, results: Path) -> PTQSpec:
    return PTQSpec(weights=str(weights), data_root=str(data), results=str(results), run_id="t", device="cpu",
                   methods=("manual",), calib_sizes=(50, 60), calib_batch_size=25, test_size=40, eval_batch_size=40)


@pytest.fixture
def _engine():
    import torch

    saved = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = saved


@pytest.mark.slow  # two PTQ tasks on the tiny model (~4 s)
def test_a_requeued_ptq_task_finds_its_merged_rows(synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, _engine) -> None:
    tasks = plan_tasks(_ptq_spec(synthetic_cifar, synthetic_weights, tmp_path))
    first = [run_ptq(t) for t in tasks]
    before = _rows(tmp_path)
    assert compact_results(tmp_path, ["ptq"], settled(tmp_path))[0].merged == 2
    assert not tasks[0].task_file().exists()

    calls: list[int] = []
    real = observe_module.calibrate
    monkeypatch.setattr(observe_module, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = [run_ptq(t) for t in tasks]  # the requeued tasks: nothing calibrated, nothing written
    assert calls == [] and [a["rows"] for a in again] == [f["rows"] for f in first]
    assert len(table_files(tmp_path / "ptq")) == 1 and _rows(tmp_path) == before
    from jobs.runs import SpecMismatch

    with pytest.raises(SpecMismatch, match="holds PTQ results of another spec"):
        run_ptq(dataclasses.replace(tasks[0], alphas=(0.9,)))


class Interrupted(Exception):
    """Stands in for a kill of the job."""


@pytest.mark.slow  # one short prune run, killed, compacted, resumed (~8 s)
def test_a_resumed_prune_run_after_a_compaction_writes_each_row_once(
        synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after its last phase row (before finishing): every phase row is final and merged, the
    resume reads the last one back from the compact file and writes only the module table."""
    spec = PruneSpec(model="resnet20a", weights=str(synthetic_weights), data_root=str(synthetic_cifar),
                     results=str(tmp_path), run_id="r", seed=1, phases=2, epochs=1, final_sparsity=0.5,
                     batch_size=50, eval_batch_size=100).with_defaults()
    real = jobs.training._Schedule.finish

    def killed(self, summary):
        raise Interrupted

    monkeypatch.setattr(jobs.training._Schedule, "finish", killed)
    with pytest.raises(Interrupted):
        run_prune(spec)
    monkeypatch.setattr(jobs.training._Schedule, "finish", real)
    phases_before, epochs_before = _rows(tmp_path, "phases"), _rows(tmp_path, "epochs")

    done = {t.table: t for t in compact_results(tmp_path, TABLES, settled(tmp_path))}
    assert (done["phases"].files_before, done["phases"].files_after) == (3, 1)
    assert (done["epochs"].files_before, done["epochs"].files_after) == (2, 1)
    assert "modules" not in done  # not written yet

    summary = run_prune(spec)
    phases = read_table(tmp_path, "phases").to_pylist()
    assert sorted(r["phase"] for r in phases) == [0, 1, 2]
    assert sorted(r["phase"] for r in read_table(tmp_path, "epochs").to_pylist()) == [1, 2]
    assert _rows(tmp_path, "phases") == phases_before and _rows(tmp_path, "epochs") == epochs_before
    assert summary["top1"] == next(r["top1"] for r in phases if r["phase"] == 2)
    assert read_table(tmp_path, "modules").num_rows > 0

    # finished now: a second compaction has nothing to merge but the module table's one file (left as is)
    again = {t.table: t for t in compact_results(tmp_path, TABLES, settled(tmp_path))}
    assert all(t.written == 0 for t in again.values())
    assert run_prune(spec)["top1"] == summary["top1"]  # finished: nothing written
    assert len(read_table(tmp_path, "phases")) == 3


def test_compact_files_say_what_they_hold(tmp_path: Path) -> None:
    _sweep(tmp_path, files=2, rows=2)
    names = [p.name for p in table_files(tmp_path / "ptq")]
    compact_results(tmp_path, ["ptq"])
    (compact,) = table_files(tmp_path / "ptq")
    manifest = json.loads(pq.read_schema(compact).metadata[COMPACTED])
    assert manifest["units"] == [[n, 2] for n in names]
    assert [e["name"] for e in manifest["replaces"]] == names and all(len(e["sha256"]) == 64
                                                                       for e in manifest["replaces"])
    assert read_table(tmp_path, "ptq").schema.metadata is None
