"""Schema checks: every row of a split against the dataset's columns and its own check, before anything is tokenised."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qlit.data.files import Location, diagnose
from qlit.data.sources import Rows, iter_rows
from qlit.errors import QlitError

#: Column → accepted Python type(s).
Columns = Mapping[str, type | tuple[type, ...]]
#: A dataset's check of one row: ``(column, problem)`` when it breaks the schema, else ``None``.
RowCheck = Callable[[Mapping[str, Any]], tuple[str, str] | None]


def check_rows(dataset_name: str, rows: Rows, required: Columns, check_row: RowCheck) -> None:
    """Every row against ``required`` and ``check_row``; the first problem is a :class:`QlitError`.

    The error names the dataset, the source split, the row (its 0-based number in that split, i.e. in file order)
    and the column; for local files also the file and its line (JSON Lines, CSV) or row.
    """
    present = rows.rows.column_names
    for column in required:
        if column not in present:
            where = f"; data file{'s' if len(rows.files) > 1 else ''} {', '.join(rows.files)}" if rows.files else ""
            raise QlitError(
                f"{dataset_name} split '{rows.source}' has no column '{column}' "
                f"(columns: {', '.join(sorted(present)) or 'none'}{where})."
            )
    try:
        for i, row in zip(rows.index, iter_rows(rows.rows), strict=True):
            for column, kind in required.items():
                value = row[column]
                kinds = kind if isinstance(kind, tuple) else (kind,)
                if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                    location = rows.locate(int(i))
                    expected = " or ".join(k.__name__ for k in kinds)
                    if value is not None:
                        why = f"expected {expected}, got {type(value).__name__} {value!r:.60}"
                    elif location is not None and location.record is not None:
                        # A field absent from a row and a null field both arrive as None; the row as written tells.
                        why = f"{'null' if column in location.record else 'missing'}, expected {expected}"
                    else:
                        why = f"missing or null, expected {expected}"
                    raise QlitError(_sentence(dataset_name, rows, i, column, why, location))
            problem = check_row(row)
            if problem is not None:
                column, why = problem
                raise QlitError(_sentence(dataset_name, rows, i, column, why, rows.locate(int(i))))
    except UnicodeDecodeError:  # pyarrow keeps bytes that are no UTF-8 in a string column, until they are read
        for path in rows.files:
            problem = diagnose(path, rows.builder)
            if problem is not None:
                raise QlitError(f"Data file '{path}' of {dataset_name} {problem}.") from None
        raise QlitError(f"{dataset_name} split '{rows.source}' holds text that is not UTF-8.") from None


def _sentence(dataset_name: str, rows: Rows, i: int, column: str, why: str, location: Location | None) -> str:
    """``SST-2 split 'train' row 7 column 'label': <why> (<file> line 8).``"""
    where = f" ({location})" if location is not None else ""
    return f"{dataset_name} split '{rows.source}' row {i} column '{column}': {why}{where}."
