"""Local data files as a user wrote them: their content hash, the mistakes ``datasets`` would only answer with a
traceback (an empty file, a broken line, one JSON object instead of rows), and where a row of a split sits in them.

``datasets`` reads the files; this module only looks at them before (cheap checks of their first bytes) and after
a failure or a bad row (a scan of the one file concerned), so that an error names the file, the line and the field.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from qlit.io import content_hash

_JSON_KINDS = ((bool, "boolean"), (str, "string"), ((int, float), "number"), (dict, "object"), (list, "array"))
_CHUNK = 1 << 16


@dataclass
class Location:
    """Where a row of a split sits in its files."""

    path: str
    line: int | None  # 1-based line of a JSON Lines or CSV file
    row: int  # 0-based row of the file
    record: dict[str, Any] | None = None  # the row as written (JSON Lines), to tell a missing field from a null one

    def __str__(self) -> str:
        return f"{self.path} line {self.line}" if self.line is not None else f"{self.path} row {self.row}"


def digest(paths: Sequence[str]) -> str:
    """A hash of the files' contents, in order (their names, sizes and times do not count)."""
    return hashlib.sha256("\n".join(content_hash(p) for p in paths).encode()).hexdigest()


def precheck(path: str, builder: str) -> str | None:
    """The problem of a data file seen in its first bytes (empty, one JSON object instead of rows), or ``None``."""
    if builder not in ("json", "csv", "text"):
        return "is empty" if Path(path).stat().st_size == 0 else None
    try:
        with _open_binary(path) as f:
            head = _skip_space(f)
            if not head:
                return "is empty"
            if builder != "json" or not head.startswith(b"{"):
                return None
            end = head.find(b"\n")
            line, rest = (head[:end], head[end + 1 :]) if end >= 0 else (head + f.readline(), b"")
            try:
                first = json.loads(line)
            except ValueError:  # no object on the first line: one object over several lines, or a broken line
                whole = _json_value((head if end >= 0 else line) + f.read())
                return _one_object(whole) if isinstance(whole, dict) else None
            if path.lower().removesuffix(_compression(path)).endswith(".jsonl") or rest.strip() or _skip_space(f):
                return None  # JSON Lines (one line is one row in a .jsonl file)
            return _one_object(first) if isinstance(first, dict) else None
    except OSError:  # a compression this machine cannot read: `datasets` says so itself
        return None


def diagnose(path: str, builder: str) -> str | None:
    """Why ``datasets`` could not read a data file, as words (``line 6 is not valid JSON: ...``), or ``None``."""
    try:
        if builder == "json":
            return _diagnose_json(path)
        if builder == "csv":
            return _diagnose_csv(path)
        if builder == "parquet":
            import pyarrow.parquet as pq

            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except Exception as err:  # pyarrow's words for a file that is no Parquet
                return f"is not a readable Parquet file ({first_line(err)})"
            return "holds no rows" if rows == 0 else None
    except OSError as err:
        return f"cannot be read ({first_line(err)})"
    return None


def locate(files: Sequence[str], builder: str, row: int) -> Location | None:
    """Which file of a split, and which line or row of it, holds the split's row ``row`` (files in order)."""
    try:
        offset = 0
        for k, path in enumerate(files):
            if k < len(files) - 1:
                count = _count(path, builder)
                if row >= offset + count:
                    offset += count
                    continue
            for location in _rows(path, builder):
                if location.row == row - offset:
                    return location
            return None
    except (OSError, ValueError, csv.Error):  # changed since it was read, or unreadable here: no location
        return None
    return None


# ----- reading ----------------------------------------------------------------------------------------------------
def _open_binary(path: str) -> BinaryIO:
    """The file's bytes, decompressed when its ending names a compression (as ``datasets`` reads it)."""
    import fsspec

    return fsspec.open(path, "rb", compression="infer").open()


def _compression(path: str) -> str:
    return next((s for s in (".gz", ".bz2", ".xz", ".zst", ".lz4") if path.lower().endswith(s)), "")


def _skip_space(f: BinaryIO) -> bytes:
    """The bytes from the first one that is no whitespace (or UTF-8 byte-order mark) to the end of that chunk;
    empty at the end of the file."""
    start = True
    while chunk := f.read(_CHUNK):
        if start:
            chunk, start = chunk.removeprefix(codecs.BOM_UTF8), False
        if chunk := chunk.lstrip():
            return chunk
    return b""


def _json_value(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8-sig"))
    except ValueError:
        return None


def _one_object(value: Any) -> str:
    keys = ", ".join(list(value)[:5]) + (", ..." if len(value) > 5 else "")
    return (
        f"holds one JSON object (keys: {keys or 'none'}), not rows: write a JSON array of row objects "
        "([{...}, {...}]) or JSON Lines (one object per line, .jsonl)"
    )


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """Numbered lines of a text file; a line that is no UTF-8 is a :class:`ValueError` naming it."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _NotText(number, err.start) from None


class _NotText(ValueError):
    def __init__(self, line: int, column: int) -> None:
        super().__init__(f"line {line} is not UTF-8 text (byte {column + 1})")


def _is_array(path: str) -> bool:
    with _open_binary(path) as f:
        return _skip_space(f).startswith(b"[")


def _rows(path: str, builder: str) -> Iterator[Location]:
    """Every row of a file with its line (JSON Lines, CSV) and, for JSON Lines, the row as written."""
    if builder == "json" and not _is_array(path):
        number = 0
        for line, text in _lines(path):
            if text.strip():
                record = json.loads(text)
                yield Location(path, line, number, record if isinstance(record, dict) else None)
                number += 1
    elif builder == "json":
        with _open_binary(path) as f:
            for number in range(len(json.loads(f.read().decode("utf-8-sig")))):
                yield Location(path, None, number)
    elif builder == "csv":
        with _open_binary(path) as f:
            reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
            next(reader, None)
            start = reader.line_num + 1
            for number, _ in enumerate(reader):
                yield Location(path, start, number)
                start = reader.line_num + 1
    else:
        for number in range(_count(path, builder)):
            yield Location(path, None, number)


def _count(path: str, builder: str) -> int:
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if builder == "arrow":
        import pyarrow as pa

        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).read_all().num_rows
    return sum(1 for _ in _rows(path, builder))


# ----- diagnosing -------------------------------------------------------------------------------------------------
def _diagnose_json(path: str) -> str | None:
    if _is_array(path):
        with _open_binary(path) as f:
            try:
                rows = json.loads(f.read().decode("utf-8-sig"))
            except UnicodeDecodeError as err:
                return f"is not UTF-8 text (byte {err.start + 1})"
            except json.JSONDecodeError as err:
                if err.msg != "Extra data":
                    return f"line {err.lineno} is not valid JSON at column {err.colno}: {_json_error(err)}"
                rows = None  # JSON Lines whose first row is an array: the scan below names the line
        if rows == []:
            return "holds no rows (an empty JSON array)"
        if rows is not None:
            return next((p for k, r in enumerate(rows) if (p := _not_a_row(f"item {k}", r))), None)
    count = 0
    try:
        for line, text in _lines(path):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                return f"line {line} is not valid JSON at column {err.colno}: {_json_error(err)}"
            if problem := _not_a_row(f"line {line}", record):
                return problem
            count += 1
    except _NotText as err:
        return str(err)
    return None if count else "holds no rows"


def _json_error(err: json.JSONDecodeError) -> str:
    return err.msg.removesuffix(" at").lower()  # "Invalid control character at": the column follows in our words


def _not_a_row(where: str, record: Any) -> str | None:
    if isinstance(record, dict):
        return None
    kind = next((name for types, name in _JSON_KINDS if isinstance(record, types)), "null")
    return f"{where} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not an object (a row)"


def _diagnose_csv(path: str) -> str | None:
    with _open_binary(path) as f:
        reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
        try:
            header = next(reader, None)
            if header is None:
                return "is empty"
            rows = 0
            for fields in reader:
                if len(fields) > len(header):
                    return f"line {reader.line_num} has {len(fields)} fields where its header has {len(header)}"
                rows += 1
        except UnicodeDecodeError as err:
            return f"is not UTF-8 text (byte {err.start + 1})"
        except csv.Error as err:
            return f"line {reader.line_num} is not valid CSV: {err}"
    return None if rows else "holds no rows, only a header line"


def first_line(err: BaseException) -> str:
    """``Type: the first line of its message``: what an exception says, in one line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
