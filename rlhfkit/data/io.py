"""Reading and writing datasets: JSONL, JSON, Parquet, ``datasets.save_to_disk`` folders, hub names.

Every reader yields ``(Where, row)`` so that a bad record fails with where it came from:
``prefs.jsonl:3: field 'chosen': empty completion`` for text files (lines are 1-based) and
``prefs.parquet: row 2: field 'chosen': ...`` for tables (rows are 0-based, as ``dataset[2]``).

Writers never leave a half-written file behind: a new file is written to a temporary file in the
same folder and moved into place with ``os.replace`` (atomic on POSIX and Windows); appending
writes whole lines, flushes each one and fsyncs at the end, so the lines already in the file and
those appended before a failure survive it.

In Parquet and ``save_to_disk`` folders the free-form ``metadata`` object is stored as JSON text:
Arrow needs one schema for every row, and metadata keys differ from row to row (as a struct column,
each row would come back with every other row's keys set to None). The record converters decode it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlhfkit.data.formats import (
    CONVERSATION_FORMATS,
    PREFERENCE_FORMATS,
    to_conversation,
    to_pair,
    to_preference,
)
from rlhfkit.data.records import ComparisonPair, Conversation, DataError, PreferenceRecord, Where

PathLike = str | os.PathLike

# `org/name` as the hub spells dataset ids (no leading '.', '/' or '~'; no file extension checked here).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow")
_SINGLE_TABLE_SPLITS = (None, "train")  # `datasets` itself calls the one table of a data file "train"


@dataclasses.dataclass
class RowWhere(Where):
    """A row of a table; ``line`` holds the 0-based row index. Errors read ``source: row N: ...``."""

    def error(self, problem: str, field: str | None = None) -> DataError:
        err = DataError(problem, path=self.path, line=self.line, field=field)
        err.args = (f"{self.path}: row {self.line}: " + (f"field '{field}': " if field else "") + problem,)
        return err


# ---------------------------------------------------------------------------------------------------
# JSON Lines


def read_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file (1-based lines).

    Raises DataError naming the file and line for a line that is not UTF-8 (with the byte offset in
    the file), not valid JSON (with the JSON error and column), or not a JSON object.
    """
    name = str(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError("file not found", path=name) from None
    with f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            try:
                # utf-8-sig on line 1 accepts the byte-order mark some Windows editors write.
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start]
                raise DataError(f"not valid UTF-8: byte 0x{bad:02x} at byte offset {start + e.start} "
                                f"(byte {e.start} of the line)", path=name, line=lineno) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=name, line=lineno) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object on each line, got {type(obj).__name__}", path=name, line=lineno)
            yield lineno, obj


def _json_line(row: Any, path: str, n: int) -> str:
    try:
        return json.dumps(row, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as e:
        raise DataError(f"row {n} cannot be written as JSON: {e}", path=path) from None


def write_jsonl(path: PathLike, rows: Iterable[Any], append: bool = False) -> int:
    """Write ``rows`` (JSON-serialisable objects) one per line; returns the number written.

    ``append=False``: written to a temporary file and moved over ``path`` only when every row was
    written, so a failure leaves any existing file untouched. ``append=True``: each row is
    serialised before anything is written and written as one whole line; the file is flushed and
    fsynced even when a later row fails, so earlier lines are kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    if append:
        with open(path, "ab") as f:
            try:
                if f.tell() > 0 and not _ends_with_newline(path):
                    # A crash mid-line left a partial line; keep it on its own line so the reader
                    # reports it there instead of merging it with the first new row.
                    f.write(b"\n")
                for n, row in enumerate(rows, 1):
                    f.write(_json_line(row, str(path), n).encode("utf-8"))
                    f.flush()
            finally:
                f.flush()
                os.fsync(f.fileno())
        return n
    with _atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            for n, row in enumerate(rows, 1):
                f.write(_json_line(row, str(path), n).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    return n


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class _atomic_file:
    """Context manager giving a new empty file next to ``path``; on success it replaces ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.tmp = _sibling(self.path, ".tmp")
        # O_EXCL with mode 0o666: the umask applies as for a plain open() (mkstemp would force 0600).
        os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        _keep_mode(self.path, self.tmp)
        os.replace(self.tmp, self.path)


def _sibling(path: Path, suffix: str) -> Path:
    """A fresh hidden name in ``path``'s folder (same filesystem, so os.replace is a rename)."""
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _keep_mode(old: Path, new: Path) -> None:
    """Replacing a file keeps its permissions, as overwriting it in place would."""
    if old.exists():
        os.chmod(new, stat.S_IMODE(os.stat(old).st_mode))


# ---------------------------------------------------------------------------------------------------
# any source → rows


def read_rows(source: PathLike, split: str | None = None) -> Iterator[tuple[Where, dict]]:
    """Yield ``(where, row)`` from a ``.jsonl``/``.json``/``.parquet`` file, a folder written by
    ``datasets.save_to_disk`` (a DatasetDict takes ``split``, default ``'train'``), a folder of data
    files, or a Hugging Face hub dataset id ``org/name`` (through ``datasets.load_dataset``).
    """
    name = str(source)
    path = Path(source)
    if path.is_dir():
        yield from _read_dir(path, split)
        return
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".json", ".parquet"):
            raise DataError(f"unsupported file type '{suffix}'; use .jsonl, .json or .parquet, or a folder "
                            "written by datasets' save_to_disk", path=name)
        if split not in _SINGLE_TABLE_SPLITS:
            raise DataError(f"a {suffix} file has one table and no splits; got split={split!r} (pass split=None)",
                            path=name)
        if suffix == ".parquet":
            yield from _read_parquet(path)
        elif suffix == ".json" and _first_byte(path) == b"[":
            yield from _read_json_array(path)
        else:  # .jsonl, and .json holding JSON Lines (what `datasets` itself writes as .json)
            for line, row in read_jsonl(path):
                yield Where(name, line), row
        return
    if _HUB_ID.match(name) and not name.lower().endswith(_FILE_SUFFIXES):
        yield from _read_loaded(name, split, hub=True)
        return
    raise DataError("file not found", path=name)


def _first_byte(path: Path) -> bytes:
    """The first byte after a UTF-8 byte-order mark and whitespace."""
    with open(path, "rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        while (b := f.read(1)) and b.isspace():
            pass
        return b


def _read_json_array(path: Path) -> Iterator[tuple[Where, dict]]:
    name = str(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start}",
                        path=name, line=line) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=name, line=e.lineno) from None
    for i, row in enumerate(rows):
        where = RowWhere(name, i)
        if not isinstance(row, dict):
            raise where.error(f"expected a JSON object, got {type(row).__name__}")
        yield where, row


def _read_parquet(path: Path) -> Iterator[tuple[Where, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"not a readable Parquet file: {e}", path=name) from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield RowWhere(name, i), row
            i += 1


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_dir(path: Path, split: str | None) -> Iterator[tuple[Where, dict]]:
    name = str(path)
    if not _is_saved_dataset(path):
        # A folder of data files, e.g. a hub snapshot downloaded with `hf download --local-dir`.
        yield from _read_loaded(name, split)
        return
    import datasets

    ds = datasets.load_from_disk(name)
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(f"split '{split}' not found; available splits: {', '.join(ds)}", path=name)
        ds, name = ds[split], f"{name}[{split}]"
    elif split not in _SINGLE_TABLE_SPLITS:
        raise DataError(f"this folder holds a single Dataset with no splits; got split={split!r} (pass split=None)",
                        path=name)
    for i, row in enumerate(ds):
        yield RowWhere(name, i), row


def _read_loaded(name: str, split: str | None, hub: bool = False) -> Iterator[tuple[Where, dict]]:
    """Rows of ``datasets.load_dataset(name, split=...)``: a hub id or a local folder of data files."""
    import datasets

    split = split or "train"
    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise DataError(f"split '{split}' not found: {e}", path=name) from None
        raise
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        if not hub:
            raise DataError(f"no readable data files in this folder ({e})", path=name) from e
        if datasets.config.HF_HUB_OFFLINE:
            problem = (f"not a local path, and the hub dataset '{name}' is not available offline "
                       "(it is not in the local datasets cache)")
        else:
            problem = f"not a local path, and the hub dataset '{name}' could not be loaded ({type(e).__name__}: {e})"
        raise DataError(f"{problem}; pass a local path instead: a .jsonl, .json or .parquet file, or a folder "
                        "written by datasets' save_to_disk", path=name) from e
    where_name = f"{name}[{split}]"
    for i, row in enumerate(ds):
        yield RowWhere(where_name, i), row


# ---------------------------------------------------------------------------------------------------
# rows → any container


def write_rows(path: PathLike, rows: Iterable[dict]) -> int:
    """Write rows by the path's form: ``.jsonl``; ``.parquet``; a path without an extension (or an
    existing ``save_to_disk`` folder) → ``datasets.Dataset.save_to_disk``. Returns the row count.

    Every form is written atomically: an existing file or dataset folder is replaced only once the
    new one is complete. A non-empty folder that is not a saved dataset is never replaced.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return write_jsonl(path, rows)
    is_dir = path.is_dir() or (suffix == "" and not path.exists())
    if suffix != ".parquet" and not is_dir:
        raise DataError(f"cannot tell what to write from the extension '{suffix}'; use .jsonl, .parquet, or a path "
                        "without an extension for a save_to_disk folder", path=str(path))
    rows = [_for_arrow(r) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet" and not path.is_dir():
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows)
        with _atomic_file(path) as tmp:
            pq.write_table(table, tmp)
        return len(rows)
    return _save_to_disk(path, rows)


def _for_arrow(row: dict) -> dict:
    if isinstance(row.get("metadata"), dict):
        return {**row, "metadata": json.dumps(row["metadata"], ensure_ascii=False)}
    return row


def _save_to_disk(path: Path, rows: list[dict]) -> int:
    import datasets

    if not rows:
        # `datasets.load_from_disk` cannot read back a folder saved from zero rows (datasets 5.2).
        raise DataError("no rows to save; save_to_disk cannot store an empty dataset (write .jsonl instead)",
                        path=str(path))
    if path.exists() and any(path.iterdir()) and not _is_saved_dataset(path):
        raise DataError("is a folder that is not a saved dataset; refusing to replace it. "
                        "Pass a new path, or a .jsonl or .parquet file name", path=str(path))
    tmp = _sibling(path, ".tmp")
    try:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
        if path.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first. Between
            # the two renames `path` is briefly absent, never half-written.
            _keep_mode(path, tmp)
            old = _sibling(path, ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return len(rows)


# ---------------------------------------------------------------------------------------------------
# records


def load_preferences(source: PathLike, split: str | None = None, format: str = "auto") -> list[PreferenceRecord]:
    """Preference records from any source ``read_rows`` takes, in any format of
    ``rlhfkit.data.formats.PREFERENCE_FORMATS`` (detected row by row unless ``format`` names one)."""
    _check_format(format, PREFERENCE_FORMATS, "preference")
    return [to_preference(row, where, format) for where, row in read_rows(source, split)]


def load_conversations(source: PathLike, split: str | None = None, format: str = "auto") -> list[Conversation]:
    """SFT conversations: ``{"messages": ...}``, ShareGPT ``conversations``, or prompt/completion rows."""
    _check_format(format, CONVERSATION_FORMATS, "conversation")
    return [to_conversation(row, where, format) for where, row in read_rows(source, split)]


def _check_format(format: str, formats: dict, what: str) -> None:
    # Before reading, so a typo fails at once and not only when the source has a first row.
    if format != "auto" and format not in formats:
        raise ValueError(f"unknown {what} format {format!r}; choose 'auto' or one of {', '.join(formats)}")


def load_pairs(source: PathLike, split: str | None = None) -> list[ComparisonPair]:
    """Unlabelled comparison pairs as ``rlhfkit sample`` writes them (unknown keys go to metadata)."""
    return [to_pair(row, where) for where, row in read_rows(source, split)]


def save_preferences(path: PathLike, records: Iterable[PreferenceRecord]) -> int:
    return write_rows(path, (r.to_dict() for r in records))


def save_conversations(path: PathLike, convs: Iterable[Conversation]) -> int:
    return write_rows(path, (c.to_dict() for c in convs))


def save_pairs(path: PathLike, pairs: Iterable[ComparisonPair]) -> int:
    return write_rows(path, (p.to_dict() for p in pairs))
