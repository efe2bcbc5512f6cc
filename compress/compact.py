"""Merge a results table's many small Parquet files into a few large ones, losing and repeating no row.

    python -m jobs.launch results compact --results results     # per table: files before -> after, rows, MB, s
    python -m jobs.launch results compact --dry-run              # what it would merge; changes nothing

A sweep writes one small file per unit of work (``ptq/<run_id>-<task>.parquet``, one per phase in
``phases/`` and ``epochs/``), so after a large one every read of a table opens thousands of files.
``compact_results`` merges each table folder's small files, in name order, into files of up to
``max_bytes`` (64 MiB of input) named ``compact-<UTC time>-<k>.parquet``: they sort together, and a
compact file is only ever created, never replaced, so it cannot clobber a job's file (a job's names
start with its run id).

Each compact file carries in its Parquet footer (key ``compress.compacted``, JSON) the units of work
its rows are, in order (name, rows), and the files it replaces (name, bytes, sha256). The reading
rule (``compress.results.superseded``, applied by ``read_table``): a file that a compact file of its
folder replaces, and that is still byte for byte the file merged, is not read. The steps, per group:

1. read the inputs and concatenate them under their union schema (the one ``read_table`` uses);
   write the compact file to a hidden temporary name, fsync, rename it in, fsync the folder;
2. only then remove the inputs.

A crash or error before the rename changes nothing a reader sees (the hidden temporary goes on the
next run). After it, the inputs not yet removed are leftovers: ``read_table`` skips them, so it
counts every row once at every moment, and the next compaction removes them before anything else.
A plain ``pyarrow.dataset.dataset(folder)``, which knows nothing of the rule, sees those rows twice
for the milliseconds between the rename and the removals (or until the next run, after a crash).

A job that writes a unit once and checks before writing (a requeued PTQ task) asks
``compress.results.read_unit``, which finds the unit's rows in the compact file that merged it.
Which files may be merged at all is the caller's rule (``mergeable``: the rows no job will write
again, ``jobs.runs.settled``). Running it again with nothing new does nothing; two compactions of
one root never run at once (``<root>/.compact.lock``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from compress.results import COMPACTED, atomic_write_bytes, compaction_manifest, superseded, table_files

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 2**20  # input bytes per compact file: ~3,000 PTQ rows with their predictions
PREFIX = "compact-"
LOCK = ".compact.lock"

Mergeable = Callable[[str, pa.Table], bool]  # (table name, one file's rows) -> may they be merged


class CompactBusy(ValueError):
    """Another compaction of the root is running: the one line a user sees."""


class CompactError(ValueError):
    """A file that cannot be merged (unreadable, or of a schema its table's other files cannot share)."""


@dataclass(frozen=True)
class TableCompaction:
    """What compacting one table folder did (in a dry run: would do; sizes then estimated from the inputs)."""

    table: str
    files_before: int
    files_after: int
    rows: int          # rows a reader sees, the same before and after
    bytes_before: int
    bytes_after: int
    merged: int        # files merged into new compact files
    written: int       # compact files written
    leftovers: int     # inputs of a stopped compaction, removed first
    seconds: float


@dataclass(frozen=True)
class _Input:
    path: Path
    stat: tuple[int, int, int]  # (inode, size, mtime_ns) when read: a file changed since is not removed
    digest: str
    table: pa.Table
    manifest: dict[str, Any] | None

    @property
    def size(self) -> int:
        return self.stat[1]


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _load(path: Path) -> _Input:
    before = _identity(path)
    try:
        data = path.read_bytes()
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as e:
        raise CompactError(f"cannot read {path}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}; "
                           f"move it out of the table folder and compact again") from e
    return _Input(path, before, hashlib.sha256(data).hexdigest(), table, compaction_manifest(table.schema))


def _fsync_dir(folder: Path) -> None:
    """The folder's entries (a rename, removals) on disk, so a power loss cannot undo the rename but keep a removal."""
    with contextlib.suppress(OSError):  # a filesystem without directory fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    """Remove one merged input (its own function: tests stop a compaction here)."""
    path.unlink(missing_ok=True)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order: a column the file lacks reads null (as in ``read_table``)."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names
            else pa.chunked_array([pa.nulls(table.num_rows, f.type)]) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _manifest(group: list[_Input]) -> dict[str, Any]:
    units: list[list[Any]] = []
    replaces: list[dict[str, Any]] = []
    for inp in group:
        if inp.manifest is None:
            units.append([inp.path.name, inp.table.num_rows])
        else:  # a compact file merged again: its units keep their names; its own leftovers stay covered
            units.extend(inp.manifest["units"])
            replaces.extend(e for e in inp.manifest["replaces"] if (inp.path.parent / e["name"]).exists())
        replaces.append({"name": inp.path.name, "bytes": inp.size, "sha256": inp.digest})
    return {"version": 1, "units": units, "replaces": replaces}


def _merged_bytes(group: list[_Input]) -> bytes:
    try:
        schema = pa.unify_schemas([inp.table.schema.remove_metadata() for inp in group])
    except pa.ArrowException as e:
        names = ", ".join(inp.path.name for inp in group[:3])
        raise CompactError(f"{group[0].path.parent}: files whose schemas cannot be read together ({names}, ...): "
                           f"{str(e).strip().splitlines()[0]}") from e
    table = pa.concat_tables([_conform(inp.table, schema) for inp in group])
    table = table.replace_schema_metadata({COMPACTED: json.dumps(_manifest(group), separators=(",", ":")).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_group(folder: Path, group: list[_Input], name: str) -> int:
    """Step 1 then step 2 of the module docstring for one group; returns the compact file's bytes."""
    path = folder / name
    if path.exists():  # a fresh time stamp under the lock: never; a file is not replaced all the same
        raise CompactError(f"{path} exists already; compact again")
    data = _merged_bytes(group)
    atomic_write_bytes(path, data)
    _fsync_dir(folder)
    for inp in group:
        if _identity(inp.path) != inp.stat:  # written again since it was read: a new file, kept
            log.warning("%s changed while it was merged: kept (its new rows are read beside the compact file)",
                        inp.path)
            continue
        _remove(inp.path)
    _fsync_dir(folder)
    log.info("%s: %d files, %d rows -> %s (%.1f MB)", folder.name, len(group),
             sum(i.table.num_rows for i in group), name, len(data) / 1e6)
    return len(data)


def compact_table(folder: str | os.PathLike, mergeable: Mergeable | None = None, max_bytes: int = MAX_BYTES,
                  dry_run: bool = False, stamp: str = "") -> TableCompaction:
    """Compact one table folder (see the module docstring); ``mergeable`` None: every file may be merged.

    Leftovers of a stopped compaction are removed first. Then the compact files under half of
    ``max_bytes`` and the job files that ``mergeable`` allows are read in that order and cut into
    groups of up to ``max_bytes`` input bytes; a group of one file stays as it is, so a second run
    with nothing new writes nothing.
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    stamp = stamp or _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    files = table_files(folder)
    schemas: dict[Path, pa.Schema] = {}
    rows: dict[Path, int] = {}
    for f in files:
        with pq.ParquetFile(f) as pf:
            schemas[f], rows[f] = pf.schema_arrow, pf.metadata.num_rows
    sizes = {f: f.stat().st_size for f in files}
    left = superseded(schemas)
    if not dry_run:
        for f in sorted(left):
            _remove(f)
        for tmp in folder.glob(f".{PREFIX}*.tmp"):  # a compact file whose write was killed (never renamed in)
            tmp.unlink(missing_ok=True)
        _fsync_dir(folder)
    live = [f for f in files if f not in left]
    compacts = {f for f in live if compaction_manifest(schemas[f]) is not None}
    candidates = sorted(f for f in compacts if sizes[f] < max_bytes // 2) + [f for f in live if f not in compacts]

    merged = written = group_bytes = 0
    group: list[_Input] = []

    def flush() -> None:
        nonlocal merged, written, group_bytes
        if len(group) >= 2:
            if not dry_run:
                _write_group(folder, group, f"{PREFIX}{stamp}-{written:04d}.parquet")
            merged += len(group)
            written += 1
        group.clear()
        group_bytes = 0

    for f in candidates:
        inp = _load(f)
        if inp.manifest is None and mergeable is not None and not mergeable(folder.name, inp.table):
            continue
        if group and group_bytes + inp.size > max_bytes:
            flush()
        group.append(inp)
        group_bytes += inp.size
    flush()

    if dry_run:  # estimated: the inputs' bytes stand in for the compact files'
        files_after, bytes_after = len(live) - merged + written, sum(sizes[f] for f in live)
    else:
        after = table_files(folder)
        files_after = len(after)
        bytes_after = sum(f.stat().st_size for f in after)
    return TableCompaction(folder.name, len(files), files_after, sum(rows[f] for f in live), sum(sizes.values()),
                           bytes_after, merged, written, len(left), time.perf_counter() - t0)


def _alive(held: dict[str, Any]) -> bool:
    if held.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    try:
        os.kill(int(held.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        pass
    return True


@contextlib.contextmanager
def compaction_lock(root: str | os.PathLike) -> Iterator[None]:
    """Hold ``<root>/.compact.lock`` while compacting (created exclusively; a dead holder's is taken over)."""
    path = Path(root) / LOCK
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
            except (OSError, ValueError):  # being written this instant, or gone: look again
                time.sleep(0.1)
                continue
            if _alive(held):
                raise CompactBusy(f"another compaction of {root} is running (pid {held.get('pid')} on "
                                  f"{held.get('host')} since {held.get('since')}); wait for it, or remove {path} "
                                  f"if that process is gone") from None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        break
    else:
        raise CompactBusy(f"cannot take {path}: remove it if no compaction of {root} is running")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def compact_results(root: str | os.PathLike, tables: Iterable[str], mergeable: Mergeable | None = None,
                    max_bytes: int = MAX_BYTES, dry_run: bool = False) -> list[TableCompaction]:
    """Compact every folder of ``tables`` under a results root that exists; one ``TableCompaction`` each.

    The caller makes sure no job writes under ``root`` meanwhile (the CLI checks the run leases).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results root {root} does not exist")
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    with contextlib.nullcontext() if dry_run else compaction_lock(root):
        return [compact_table(root / t, mergeable, max_bytes, dry_run, stamp) for t in tables if (root / t).is_dir()]
