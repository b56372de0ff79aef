"""Schema checks: every row of a split against the dataset's columns and its own check, before anything is tokenised."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qlit.data.sources import Rows, iter_rows
from qlit.errors import QlitError

#: Column → accepted Python type(s).
Columns = Mapping[str, type | tuple[type, ...]]
#: A dataset's check of one row: ``(column, problem)`` when it breaks the schema, else ``None``.
RowCheck = Callable[[Mapping[str, Any]], tuple[str, str] | None]


def check_rows(dataset_name: str, rows: Rows, required: Columns, check_row: RowCheck) -> None:
    """Every row against ``required`` and ``check_row``; the first problem is a :class:`QlitError`.

    The error names the dataset, the source split, the row (its 0-based number in that split, i.e. in file order)
    and the column.
    """
    present = rows.rows.column_names
    for column in required:
        if column not in present:
            raise QlitError(
                f"{dataset_name} split '{rows.source}' has no column '{column}' "
                f"(columns: {', '.join(sorted(present))})."
            )
    for i, row in zip(rows.index, iter_rows(rows.rows), strict=True):
        for column, kind in required.items():
            value = row[column]
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise QlitError(
                    f"{dataset_name} split '{rows.source}' row {i} column '{column}': expected "
                    f"{' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__} {value!r:.60}."
                )
        problem = check_row(row)
        if problem is not None:
            column, why = problem
            raise QlitError(f"{dataset_name} split '{rows.source}' row {i} column '{column}': {why}.")
