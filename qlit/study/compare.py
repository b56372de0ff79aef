"""``qlit compare``: one table, and plots, of a study's runs, read back from their TensorBoard event files.

The point of qlit is comparing techniques side by side (full fine-tuning, LoRA on an fp32, 8-bit or 4-bit base,
BitNet, the peft methods), and every run already logs what such a comparison needs (README, "What is logged").
This module prints it: one row per run (:func:`qlit.study.runs.run_row`) as Markdown or CSV, PNG plots of the loss
curves and of the costs, and a report (:mod:`qlit.study.report`).

    qlit compare logs/ --sort val/loss --csv study.csv --plots study_plots/
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from qlit.errors import QlitError
from qlit.study.report import Entry, plot_report, report_rows, study_entries, write_report
from qlit.study.runs import Row, Run, collect_runs, columns, eval_columns, format_value, run_row


def table(runs: Sequence[Run], sort: str | None = None, descending: bool = False) -> list[Row]:
    """One row per run (:func:`run_row`), without the columns that no run has.

    Args:
        runs: The runs, e.g. from :func:`collect_runs`.
        sort: A column to order the rows by (e.g. ``val/loss``); runs without a value come last. ``None`` keeps the
            order of ``runs``.
        descending: Largest value first (for metrics where higher is better, such as ``val/accuracy``).

    Raises:
        QlitError: ``sort`` names a column that no run has.
    """
    rows = [run_row(run) for run in runs]
    names = [*columns(), *eval_columns(runs)]
    present = [c for c in names if c == "run" or any(row.get(c) is not None for row in rows)]
    if sort is not None:
        if sort not in present:
            raise QlitError(f"Cannot sort by '{sort}', which no run has: use one of {', '.join(present)}.")
        known = sorted((r for r in rows if r.get(sort) is not None), key=lambda r: r[sort], reverse=descending)
        rows = known + [r for r in rows if r.get(sort) is None]
    return [{c: row.get(c) for c in present} for row in rows]


def to_markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (numbers to 4 significant digits, right-aligned; ``—`` where a run has none)."""
    if not rows:
        return ""
    columns = list(rows[0])
    numeric = {c: any(isinstance(r.get(c), (int, float)) for r in rows) for c in columns}
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if numeric[c] else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(rows: Sequence[Row], path: str | Path) -> Path:
    """Write the rows to a CSV file at full precision (an empty cell where a run has no value); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(c for row in rows for c in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: ("" if row.get(c) is None else row[c]) for c in columns} for row in rows)
    return path


def plot(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Write the report's PNG plots (:func:`qlit.study.report.plot_report`) comparing ``runs`` into ``out_dir``.

    Returns:
        The files written.

    Raises:
        QlitError: matplotlib is not installed.
    """
    entries = [Entry(name=run.name, run=run) for run in runs]
    return plot_report(entries, report_rows(entries), Path(out_dir))


# ----- command line ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, prog: str = "qlit compare") -> None:
    """``qlit compare PATH... [--sort COLUMN [--descending]] [--csv FILE] [--plots DIR]``: print the Markdown table.

    A user error is printed in one line on stderr and exits with code 1; a bad argument exits with code 2.

    Args:
        argv: The arguments after ``compare`` (``None``: ``sys.argv[1:]``).
        prog: The command's name in usage and error messages.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare qlit runs side by side: one Markdown row per run, read from its TensorBoard logs.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="run directory (logs/demo/version_0) or a folder above"
    )
    parser.add_argument(
        "--sort", metavar="COLUMN", help="order rows by this column, e.g. val/loss (runs without it last)"
    )
    parser.add_argument("--descending", action="store_true", help="largest first (e.g. for val/accuracy)")
    parser.add_argument("--csv", metavar="FILE", type=Path, help="also write the table to this CSV file")
    parser.add_argument("--plots", metavar="DIR", type=Path, help="also write PNG plots (needs matplotlib) here")
    parser.add_argument(
        "--report",
        metavar="DIR",
        type=Path,
        help="also write report.md, report.csv and plots/ here (a sweep's output folder is read as its study)",
    )
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(args.paths)
        rows = table(runs, sort=args.sort, descending=args.descending)
        written = plot(runs, args.plots) if args.plots is not None else []
        if args.csv is not None:
            written.insert(0, to_csv(rows, args.csv))
        if args.report is not None:
            written += _report(args.paths, runs, args.report)
    except QlitError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(to_markdown(rows))
    for path in written:  # on stderr, so that stdout is the table alone (`> study.md`)
        print(f"{prog}: wrote {path}", file=sys.stderr)


def _report(paths: Sequence[str], runs: Sequence[Run], out: Path) -> list[Path]:
    """The report of ``paths``: a sweep's output folder with its cells (failed ones too), other runs as they are."""
    entries: list[Entry] = []
    studies: list[Path] = []
    for path in paths:
        folder = Path(path)
        if (folder / "sweep.json").is_file():
            entries += study_entries(folder)[1]
            studies.append(folder.resolve())
    taken = {entry.run.path.resolve() for entry in entries if entry.run is not None}
    taken |= {stage.path.resolve() for entry in entries for stage in entry.stages.values()}
    for run in runs:
        inside = any(folder in run.path.resolve().parents for folder in studies)
        if run.path.resolve() not in taken and not inside:
            entries.append(Entry(name=run.name, run=run))
    return write_report(entries, out, "Comparison: " + ", ".join(str(p) for p in paths))
