"""Parquet result tables: one fixed schema per table, atomic writes, spec and provenance on every row.

Layout under the results root (``results/`` by default)::

    phases/<run_id>-p<NN>.parquet     one row per prune/retrain phase (phase 0 = the starting model)
    epochs/<run_id>-p<NN>.parquet     one row per training epoch of that phase
    modules/<run_id>.parquet          the per-module before/after table of a finished run
    ptq/<run_id>-<task>.parquet       one row per PTQ configuration
    runs/<run_id>/                    spec.json, progress.json, lease.json, state.pt (and state.prev.pt)
                                      while running; final.pt, summary.json and export/ at the end

Every file of a table has the same schema (built from the spec dataclasses, unset fields null), so
``pyarrow.dataset.dataset("results/phases")`` or ``pandas.read_parquet("results/phases")`` reads a
folder written by many jobs at once. A file is written to a temporary name in the same folder and
renamed, so a reader never sees half a file, and a unit of work rewritten after a requeue replaces
its file instead of adding rows.

``compress.compact`` merges a table's small files into ``compact-<time>-<k>.parquet`` files whose
footer lists the files they replace (name, size, sha256) and the units of work their rows are. The
one reading rule, applied here by ``read_table`` and ``read_unit``: a file that a compact file of the
same folder replaces, and that is still byte for byte that file (a leftover of a compaction stopped
before it removed its inputs), is not read; the compact file holds its rows.

A damaged file (empty, cut short, corrupt: written by something other than ``write_rows``, or hurt
on disk) is left out of every read and left where it is, with one warning per file (``damaged``,
once per process) that names it and says what to do; the rest of the table is read. One that is
empty or cut short (``table_files``) is passed over by ``compress.compact`` too; one whose footer
reads but whose pages do not is found only by reading it, and stops a compaction in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from compress.provenance import PROVENANCE_FIELDS, spec_fields

log = logging.getLogger(__name__)

ENV_RESULTS = "COMPRESS_RESULTS"

# The layout of a results root (the module docstring draws it). Every path under a root is named here;
# jobs, searches, status and the report ask these instead of spelling folder and file names themselves.
TABLES = ("phases", "epochs", "modules", "ptq")  # a folder of Parquet files each
# a row is identified by these columns; a file rewritten under another name must not count twice
ROW_KEYS = {"phases": ("run_id", "phase"), "epochs": ("run_id", "phase", "epoch"), "modules": ("run_id", "module"),
            "ptq": ("run_id", "task", "method", "observer", "weight_observer", "calib_size", "alpha", "center")}
RUNS = "runs"  # runs/<run_id>/: one folder per run, holding the files below
SPEC = "spec.json"  # the run's spec, written when it starts
PROGRESS = "progress.json"  # where it stands (phase, epoch, last top-1, job), after every epoch
LEASE = "lease.json"  # who runs it now (jobs/lease.py)
STATE = "state.pt"  # the checkpoint after the last finished epoch
PREVIOUS_STATE = "state.prev.pt"  # the one before, kept until the next is written
FINAL = "final.pt"  # the model at the end
SUMMARY = "summary.json"  # written when it finishes
EXPORT = "export"  # files to deploy, with their manifests


def default_root() -> str:
    return os.environ.get(ENV_RESULTS, "results")


def run_folder(root: str | os.PathLike, run_id: str) -> Path:
    """``<root>/runs/<run_id>``."""
    return Path(root) / RUNS / run_id


def run_folders(root: str | os.PathLike, pattern: str = "*", holding: str = "") -> list[Path]:
    """The run folders under ``root`` whose name matches ``pattern`` (and that hold the file ``holding``)."""
    found = (Path(root) / RUNS).glob(pattern)
    return sorted(d for d in found if d.is_dir() and (not holding or (d / holding).exists()))


def table_file(root: str | os.PathLike, table: str, unit: str) -> Path:
    """The Parquet file of one unit of work in ``table``: ``<root>/<table>/<unit>.parquet``.

    Units: ``<run_id>-p<NN>`` (a phase's rows in phases/ and epochs/), ``<run_id>`` (modules/),
    ``<run_id>-<task>`` (ptq/).
    """
    if table not in TABLES:
        raise ValueError(f"no table {table!r}: the tables are {', '.join(TABLES)}")
    return Path(root) / table / f"{unit}.parquet"


def phase_unit(run_id: str, phase: int) -> str:
    return f"{run_id}-p{phase:02d}"


def make_schema(columns: Mapping[str, pa.DataType], *spec_classes: type) -> pa.Schema:
    """Table columns, then the spec columns, then provenance: the one schema of a table."""
    fields = dict(columns)
    fields.update(spec_fields(*spec_classes))
    fields.update(PROVENANCE_FIELDS)
    return pa.schema(list(fields.items()))


def current_umask() -> int:
    """The process umask (read by setting it, then restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """A result or checkpoint could not be written (full disk, read-only or missing folder); says which file."""


class ResultsRootError(ValueError):
    """A results root that cannot take a run (a file, not writable, too little space): one line."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder and rename: readers see all or nothing.

    A failure leaves the previous file as it was and raises ``WriteError`` naming the file.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(e.errno, f"cannot write {path} ({len(data):,} bytes): {e.strerror or e}") from e
        raise


def check_results_root(root: str | os.PathLike, needed_bytes: int = 0) -> None:
    """Before a run: ``root`` (or the folder it would be made in) is a writable folder with room to spare.

    Writes nothing that stays: the probe file in the nearest existing folder is removed at once.
    ``ResultsRootError`` with one line otherwise.
    """
    import shutil

    path = Path(root).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ResultsRootError(f"results root {root} cannot be made: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".probe-"):
            pass
    except OSError as e:
        raise ResultsRootError(f"results root {root} is not writable ({existing}: {e.strerror or e})") from e
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise ResultsRootError(f"results root {root} has {free / 2**20:.1f} MiB free; a run needs about "
                               f"{needed_bytes / 2**20:.1f} MiB (its checkpoint, final model and rows)")


def write_rows(path: Path, rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> Path:
    """Rows to one Parquet file with ``schema`` (missing columns null, unknown ones an error)."""
    rows = list(rows)
    extra = {k for r in rows for k in r} - set(schema.names)
    if extra:
        raise KeyError(f"columns not in the table schema: {sorted(extra)}")
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())
    return Path(path)


COMPACTED = b"compress.compacted"  # footer key of a compact file: {"version", "units", "replaces"}
RETRIES = 5  # scans of a folder that a compaction changed under the reader (a file listed, then removed)


MAGIC = b"PAR1"  # a Parquet file starts and ends with it (the footer follows the data)
COMPACT_PREFIX = "compact-"  # the names of compress.compact's files
_WARNED: set[tuple[str, int, int]] = set()  # (path, bytes, mtime_ns) of the damaged files warned about


def _unreadable(e: BaseException) -> bool:
    """Whether ``e`` says a file's bytes are not Parquet (a damaged file), rather than that it is gone
    (``FileNotFoundError``: a compaction merged it, look again) or not ours to read (``PermissionError``)."""
    return isinstance(e, OSError | pa.ArrowException) and not isinstance(e, FileNotFoundError | PermissionError)


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def damaged(path: str | os.PathLike, why: str | BaseException, left: str = "its rows are left out") -> None:
    """Warn once (per process, per version of the file) that ``path`` cannot be read: ``left`` says what that does.

    The line names the file, why, and what to do: a PTQ task writes its file anew when its command
    runs again; a run writes a phase's rows once (again only for a phase it had not finished when
    resumed), so those come back from a copy or not at all; a compact file holds the rows of many.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return  # gone meanwhile: nothing left to warn about
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _WARNED:
        return
    _WARNED.add(key)
    if path.name.startswith(COMPACT_PREFIX):
        todo = ("it is a compact file: the rows of every file it merged are left out; put back a good copy if "
                "there is one, else delete it and rerun what wrote them (a ptq command writes its task files anew)")
    elif path.parent.name == "ptq":
        todo = "delete it, or run its ptq command again (same --run-id): that task writes the file anew"
    else:
        todo = ("delete it, or put back a good copy: a run writes these rows once (again only for a phase it had "
                "not finished, when resumed), so without a copy they are lost")
    reason = why if isinstance(why, str) else _why(why)
    log.warning("damaged result file %s (%s): %s, the file left in place; %s", path, reason, left, todo)


def _damage(path: Path) -> str:
    """Why ``path`` is not a whole Parquet file: '' when it starts and ends with ``MAGIC``.

    One open and two 4-byte reads: an empty file, one cut short (a copy or write stopped midway: no
    footer) or one zeroed by a crash is known before anything parses it.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return "an empty file, 0 bytes"
        if size < 2 * len(MAGIC) + 4:
            return f"{size} bytes, too short for Parquet"
        head = f.read(len(MAGIC))
        f.seek(-len(MAGIC), os.SEEK_END)
        tail = f.read(len(MAGIC))
    if head != MAGIC:
        return f"{size:,} bytes that do not start as Parquet does"
    if tail != MAGIC:
        return f"{size:,} bytes without a Parquet footer: cut short"
    return ""


def table_files(folder: str | os.PathLike) -> list[Path]:
    """The Parquet files of one table folder, sorted; hidden ones (``.``: a write in progress, ``_``) left out.

    So is a file that is not a whole Parquet file (empty, cut short: ``_damage``), with one warning
    (``damaged``): readers and ``compress.compact`` alike pass it over and leave it where it is.
    """
    folder = Path(folder)
    found = sorted(f for f in (folder.glob("*.parquet") if folder.is_dir() else [])
                   if not f.name.startswith((".", "_")))
    out = []
    for f in found:
        try:
            why = _damage(f)
        except FileNotFoundError:  # merged and removed by a compaction since the listing
            continue
        except OSError:  # not readable here (permissions): the reader says so
            why = ""
        if why:
            damaged(f, why, "passed over by every read and compaction")
        else:
            out.append(f)
    return out


def compaction_manifest(schema: pa.Schema) -> dict[str, Any] | None:
    """What a compact file merged (from its footer), or None for a job's own file.

    ``units``: [name, rows] of every unit of work in the file, in row order (its rows are theirs,
    concatenated); ``replaces``: {name, bytes, sha256} of each file it made redundant.
    """
    raw = (schema.metadata or {}).get(COMPACTED)
    return json.loads(raw) if raw else None


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex): what tells a compaction's leftover from a later write of that name."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def superseded(schemas: Mapping[Path, pa.Schema]) -> set[Path]:
    """The files among ``schemas`` (one folder's, by path) that a compact file there replaces and holds.

    A file counts as replaced only while it is byte for byte the one merged (size, then sha256), so
    a file written again under that name after the compaction is read.
    """
    out: set[Path] = set()
    for path, schema in schemas.items():
        manifest = compaction_manifest(schema)
        for entry in (manifest or {}).get("replaces", []):
            other = path.parent / entry["name"]
            if other != path and other in schemas and other.stat().st_size == entry["bytes"] \
                    and file_digest(other) == entry["sha256"]:
                out.add(other)
    return out


def _read_schemas(files: Iterable[Path]) -> dict[Path, pa.Schema]:
    """Each file's schema; a file whose footer does not parse is warned about (``damaged``) and left out."""
    out: dict[Path, pa.Schema] = {}
    for f in files:
        try:
            out[f] = pq.read_schema(f)
        except (OSError, pa.ArrowException) as e:
            if not _unreadable(e):
                raise
            damaged(f, e)
    return out


def _read_files(files: list[Path], schema: pa.Schema) -> pa.Table | None:
    """``files`` as one table with ``schema``; if one of them does not read, the others (it warned about);
    None when none reads.

    The whole set is read at once (fast); only when that fails is each file read on its own to find
    the damaged ones (a page that does not decompress while the footer is whole).
    """
    import pyarrow.dataset as ds

    try:
        return ds.dataset([str(f) for f in files], format="parquet", schema=schema).to_table()
    except (OSError, pa.ArrowException) as e:
        if not _unreadable(e):
            raise
    parts = []
    for f in files:
        try:
            parts.append(ds.dataset([str(f)], format="parquet", schema=schema).to_table())
        except (OSError, pa.ArrowException) as e:
            if not _unreadable(e):
                raise
            damaged(f, e)
    return pa.concat_tables(parts) if parts else None


def read_table(root: str | os.PathLike, table: str) -> pa.Table:
    """All rows of one table under a results root, each once.

    Files written before a spec field existed lack its column: the schema is the union of the files'
    schemas, and their rows read null there (not dropped, as a schema taken from one file would).
    Leftovers of an interrupted compaction are skipped (``superseded``); a folder that a compaction
    changes while it is read is read again. A damaged file is left out with one warning (``damaged``);
    ``FileNotFoundError`` when the table has no file, or none that reads.
    """
    folder = Path(root) / table
    for attempt in range(RETRIES):
        files = table_files(folder)
        try:
            schemas = _read_schemas(files)
            kept = [f for f in files if f in schemas and f not in superseded(schemas)]
            if not kept:
                break
            schema = pa.unify_schemas([schemas[f].remove_metadata() for f in kept])
            rows = _read_files(kept, schema)
        except FileNotFoundError:  # a compaction removed a listed file: its rows are in a file listed now
            if attempt == RETRIES - 1:
                raise
            continue
        if rows is not None:
            return rows
        break
    if folder.is_dir() and any(not f.name.startswith((".", "_")) for f in folder.glob("*.parquet")):
        raise FileNotFoundError(f"no readable {table} results under {Path(root)}: every file of {folder} is "
                                f"damaged (see the warnings)")
    raise FileNotFoundError(f"no {table} results under {Path(root)}")


def find_unit(path: str | os.PathLike) -> tuple[Path, int, int] | None:
    """Where the rows a job wrote to ``path`` are: (file, first row, rows), or None when nowhere.

    The file itself while it exists and reads, else the compact file that merged it (see
    ``compress.compact``). A damaged file is warned about and passed over (``damaged``): a job that
    asks before writing then writes its unit again, over it.
    """
    path = Path(path)
    for _ in range(RETRIES):
        try:
            if path.is_file():
                try:
                    return path, 0, pq.ParquetFile(path).metadata.num_rows
                except (OSError, pa.ArrowException) as e:
                    if not _unreadable(e):
                        raise
                    damaged(path, e)
            for f in table_files(path.parent):
                if f == path:
                    continue
                schema = _read_schemas([f]).get(f)  # None: damaged, warned about
                manifest = compaction_manifest(schema) if schema is not None else None
                offset = 0
                for name, rows in (manifest or {}).get("units", []):
                    if name == path.name:
                        return f, offset, rows
                    offset += rows
            return None
        except FileNotFoundError:  # merged or removed while looked at: look again
            continue
    return None


def read_unit(path: str | os.PathLike) -> pa.Table | None:
    """The rows a job wrote to ``path`` (its own file, or its slice of a compact file); None if never written.

    What a job that writes once asks before writing ("is my unit of work already written?"): a
    requeued job finds its rows after a compaction merged its file away, and does not write them twice.
    Rows in a damaged file count as not written (warned about once): the job writes them again.
    """
    for _ in range(RETRIES):
        where = find_unit(path)
        if where is None:
            return None
        file, first, rows = where
        try:
            table = pq.read_table(file)
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowException) as e:
            if not _unreadable(e):
                raise
            damaged(file, e)
            return None
        return (table if file == Path(path) else table.slice(first, rows)).replace_schema_metadata(None)
    raise FileNotFoundError(f"cannot read the rows of {path}: the files holding them keep changing")


def torch_save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and rename (checkpoints survive a kill mid-write)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())
