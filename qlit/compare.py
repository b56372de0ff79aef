"""``qlit compare``: one table, and plots, of a study's runs, read back from their TensorBoard event files.

The point of qlit is comparing techniques side by side (full fine-tuning, LoRA on an fp32, 8-bit or 4-bit base,
BitNet, the peft methods), and every run already logs what such a comparison needs (README, "What is logged").
This module reads it back: one row per run as Markdown or CSV, and PNG plots of the loss curves and of the costs.
The columns come from what the always-on callbacks (:data:`qlit.callbacks.ALWAYS_ON`) and the tasks
(:attr:`qlit.tasks.Task.metric_specs`) declare they log.

    qlit compare logs/ --sort val/loss --csv study.csv --plots study_plots/
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qlit.errors import QlitError
from qlit.metrics import LM_METRICS, Aggregate, MetricSpec
from qlit.naming import adapter_name
from qlit.paths import QLIT_BASE_FILE

EVENTS_PREFIX = "events.out.tfevents."

Row = dict[str, Any]

#: The identity columns of a row, first in the table.
_IDENTITY = ("run", "model", "quantization", "adapter")

#: What the module logs for every task, shown after the costs and before the task's own metrics.
_LM_METRICS = LM_METRICS

_STAGE_PREFIXES = ("val/", "test/", "predict/")

# Scalars in full (0 = keep all): by default EventAccumulator keeps a random sample of 10,000 per tag, which would
# make a long run's peak and median approximate. Other kinds barely at all: the comparison never reads them.
_SIZE_GUIDANCE = {"scalars": 0, "tensors": 1, "images": 1, "audio": 1, "histograms": 1, "compressedHistograms": 1}


@dataclass
class Run:
    """One training run as its TensorBoard event files and config files recorded it.

    Args:
        path: The run directory (``logs/<name>/version_N``).
        name: Its label in tables and plots (``<name>/version_N``, longer where that would be ambiguous).
        hparams: The hyperparameters (``pretrained``, ``quantization``, ``adapter``, ``params/*``, ...).
        scalars: Every scalar series: tag → ``[(step, value)]`` in the order they were written.
    """

    path: Path
    name: str
    hparams: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def last(self, tag: str) -> float | None:
        """The value of ``tag`` written last, or ``None`` where the run never logged it."""
        series = self.scalars.get(tag)
        return series[-1][1] if series else None

    def maximum(self, tag: str) -> float | None:
        """The largest value of ``tag``, or ``None``."""
        series = self.scalars.get(tag)
        return max(v for _, v in series) if series else None

    def median(self, tag: str) -> float | None:
        """The median value of ``tag``, or ``None``."""
        series = self.scalars.get(tag)
        return statistics.median(v for _, v in series) if series else None

    def curve(self, tag: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``tag`` ordered by step, for plotting."""
        points = sorted(self.scalars.get(tag, []), key=lambda p: p[0])
        return [s for s, _ in points], [v for _, v in points]

    def value(self, tag: str, aggregate: Aggregate = "last") -> float | None:
        """One number for ``tag``: the hyperparameter of that name where recorded, else the series' ``last``,
        ``max`` or ``median`` value; ``None`` where the run has neither.

        TensorBoard stores scalars as float32, exact only up to 2**24 (16.7 M parameters), while the hparams table
        keeps float64: so the hyperparameter (``params/*``) wins and the scalar is the fallback.
        """
        recorded = self.hparams.get(tag)
        if isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
            return float(recorded)
        return {"last": self.last, "max": self.maximum, "median": self.median}[aggregate](tag)


# ----- finding and reading runs ---------------------------------------------------------------------------------------
def find_run_dirs(path: str | Path) -> list[Path]:
    """Run directories at or under ``path``: every directory that directly holds an ``events.out.tfevents.*`` file.

    Raises:
        QlitError: ``path`` does not exist.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise QlitError(f"'{path}' does not exist: pass a run directory (logs/<name>/version_N) or a folder above it.")
    if root.is_file():
        files = [root] if root.name.startswith(EVENTS_PREFIX) else []
    else:
        files = list(root.rglob(EVENTS_PREFIX + "*"))
    return sorted({f.parent for f in files if f.is_file()}, key=_natural_key)


def collect_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read every run at or under ``paths`` (run directories, or folders searched recursively for them).

    A run directory given twice (``logs/`` and ``logs/demo``) is read once. Runs that logged no scalar at all (a run
    that stopped before its first metric, e.g. on an unreachable hub id) are left out: they have nothing to compare.

    Args:
        paths: Run directories (``logs/demo/version_0``), experiment folders (``logs/demo``) or log roots (``logs``).

    Returns:
        The runs, in the order of ``paths`` and, within one path, by directory name (``version_2`` before
        ``version_10``).

    Raises:
        QlitError: no path was given, a path does not exist, or holds no run with a logged scalar.
    """
    if not paths:
        raise QlitError("No run directory given: pass one or more, e.g. logs/ or logs/demo/version_0.")
    runs: dict[Path, Run | None] = {}
    for path in paths:
        dirs = find_run_dirs(path)
        if not dirs:
            raise QlitError(
                f"'{path}' holds no TensorBoard run (no {EVENTS_PREFIX}* file under it): pass a run directory "
                "such as logs/demo/version_0 or a folder above it."
            )
        for run_dir in dirs:
            key = run_dir.resolve()
            if key not in runs:
                run = read_run(run_dir)
                runs[key] = run if run.scalars else None
        if all(runs[d.resolve()] is None for d in dirs):
            raise QlitError(
                f"'{path}' holds only runs that logged no metric (they stopped before their first step), so there is "
                "nothing to compare: pass the directories of runs that trained."
            )
    kept = {key: run for key, run in runs.items() if run is not None}
    for run, name in zip(kept.values(), _unique_names(list(kept)), strict=True):
        run.name = name
    return list(kept.values())


def read_run(run_dir: str | Path) -> Run:
    """Read one run directory: its scalars and hyperparameters.

    Hyperparameters come from TensorBoard's HPARAMS record first, then, for keys it lacks, from ``hparams.yaml``,
    the resolved ``config.yaml`` (``model.init_args``) and ``adapter/qlit_base.json``: a run logged before the
    HPARAMS record held the study's columns still gets its model, quantization and adapter.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    # purge_orphaned_data=False: TensorBoard drops every value at or after a step that is logged out of order (it
    # takes that for a restarted job); a comparison wants every value the run wrote, as it wrote it.
    acc = EventAccumulator(str(run_dir), size_guidance=_SIZE_GUIDANCE, purge_orphaned_data=False)
    acc.Reload()
    scalars = {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    hparams: dict[str, Any] = {}
    for source in (_qlit_base_hparams(run_dir), _config_hparams(run_dir), _yaml_hparams(run_dir), _plugin_hparams(acc)):
        hparams.update({k: v for k, v in source.items() if v is not None})
    return Run(path=run_dir, name=f"{run_dir.parent.name}/{run_dir.name}", hparams=hparams, scalars=scalars)


def _plugin_hparams(acc: Any) -> dict[str, Any]:
    """The hyperparameters of TensorBoard's HPARAMS record (the first one of the run, as TensorBoard shows it)."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    try:
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:  # the run recorded no hyperparameters
        return {}
    raw = content.get(metadata.SESSION_START_INFO_TAG)
    if raw is None:
        return {}
    out: dict[str, Any] = {}
    for key, value in plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        if kind in ("number_value", "string_value", "bool_value"):
            out[key] = getattr(value, kind)
    return out


class _TolerantLoader(yaml.SafeLoader):
    """A safe YAML loader that reads unknown tags as ``None``.

    Lightning dumps hyperparameter objects it cannot represent plainly (a peft config, an optimizer class) with
    ``!!python/...`` tags, which a safe loader refuses; the study's columns are plain values either way.
    """


_TolerantLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.load(path.read_text(), Loader=_TolerantLoader)  # a SafeLoader subclass
    except yaml.YAMLError:  # a fallback source only: a damaged file must not hide the event files' data
        return {}
    return data if isinstance(data, dict) else {}


def _yaml_hparams(run_dir: Path) -> dict[str, Any]:
    """``hparams.yaml``, which Lightning's TensorBoardLogger writes with every hyperparameter logged."""
    return _read_yaml(run_dir / "hparams.yaml")


def _config_hparams(run_dir: Path) -> dict[str, Any]:
    """``pretrained``, ``quantization`` and ``adapter`` from the resolved ``config.yaml`` LightningCLI writes."""
    model = _read_yaml(run_dir / "config.yaml").get("model")
    if not isinstance(model, dict):
        return {}
    init = model.get("init_args", model)
    if not isinstance(init, dict):
        return {}
    quantization = init.get("quantization")
    adapter = init.get("adapter")
    if isinstance(adapter, dict):  # named as QLitModule.study_hparams names it
        config_class = str(adapter.get("class_path", "")).rsplit(".", 1)[-1]
        name = adapter_name(config_class, adapter.get("init_args") or {}, None) if config_class else None
    elif "adapter" in init:
        name = adapter_name(None, {}, init.get("adapter_path"))
    else:
        name = None
    return {
        "pretrained": init.get("pretrained"),
        "quantization": quantization.get("mode") if isinstance(quantization, dict) else None,
        "adapter": name,
    }


def _qlit_base_hparams(run_dir: Path) -> dict[str, Any]:
    """``pretrained`` and ``quantization`` from ``adapter/qlit_base.json``, which fit saves beside the adapter."""
    path = run_dir / "adapter" / QLIT_BASE_FILE
    try:
        base = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    quantization = base.get("quantization")
    return {
        "pretrained": base.get("pretrained"),
        "quantization": quantization.get("mode") if isinstance(quantization, dict) else None,
    }


def _natural_key(path: Path) -> list[Any]:
    """Sort key that orders ``version_2`` before ``version_10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path))]


def _unique_names(dirs: list[Path]) -> list[str]:
    """``<name>/version_N`` for each run directory, with more parent folders where two runs would share a name."""
    depth = 2
    while True:
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names) or depth >= max((len(d.parts) for d in dirs), default=0):
            return names
        depth += 1


# ----- the table ------------------------------------------------------------------------------------------------------
def metric_columns() -> list[MetricSpec]:
    """The metric columns in table order, as the plug-ins declare them.

    First the costs the always-on callbacks log (in :data:`qlit.callbacks.ALWAYS_ON` order), then the loss the module
    logs for every task, the tasks' validation metrics (every :class:`~qlit.tasks.Task` subclass, as ``val/<name>``),
    and last the callbacks' evaluation metrics (``val/``, ``test/``, ``predict/``).
    """
    from qlit.callbacks import ALWAYS_ON

    declared = [spec for cls in ALWAYS_ON.values() for spec in getattr(cls, "metric_specs", ()) if spec.aggregate]
    costs = [spec for spec in declared if not spec.name.startswith(_STAGE_PREFIXES)]
    evaluation = [spec for spec in declared if spec.name.startswith(_STAGE_PREFIXES)]
    return [*costs, *_LM_METRICS, *task_metrics(), *evaluation]


def task_metrics() -> list[MetricSpec]:
    """The validation metrics every task declares (``val/<name>``), each once, in the order the classes define them."""
    from qlit.tasks import Task

    specs: dict[str, MetricSpec] = {}
    pending = list(Task.__subclasses__())
    while pending:  # depth first, so a subclass's metrics follow its parent's
        cls = pending.pop(0)
        pending[:0] = cls.__subclasses__()
        for spec in vars(cls).get("metric_specs", ()):
            if spec.aggregate:
                specs.setdefault(spec.name, replace(spec, name="val/" + spec.name))
    return list(specs.values())


def columns() -> list[str]:
    """Every column a row can have, in table order; :func:`table` drops those no run has."""
    names = list(_IDENTITY)
    for spec in metric_columns():
        names += [spec.name, spec.source_column] if spec.sources else [spec.name]
    return names


def run_row(run: Run) -> Row:
    """The table row of one run: every column of :func:`columns`, ``None`` where the run did not log it."""
    row: Row = {
        "run": run.name,
        "model": run.hparams.get("pretrained"),
        "quantization": run.hparams.get("quantization"),
        "adapter": run.hparams.get("adapter"),
    }
    for spec in metric_columns():
        if spec.sources:  # the first of the tags the run logged, and which one it was
            found = ((run.value(tag, spec.aggregate), label) for tag, label in spec.sources)
            row[spec.name], row[spec.source_column] = next(((v, lb) for v, lb in found if v is not None), (None, None))
            continue
        value = run.value(spec.name, spec.aggregate or "last")
        row[spec.name] = round(value) if spec.integer and value is not None else value
    return row


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
    present = [c for c in columns() if c == "run" or any(row[c] is not None for row in rows)]
    if sort is not None:
        if sort not in present:
            raise QlitError(f"Cannot sort by '{sort}', which no run has: use one of {', '.join(present)}.")
        known = sorted((r for r in rows if r[sort] is not None), key=lambda r: r[sort], reverse=descending)
        rows = known + [r for r in rows if r[sort] is None]
    return [{c: row[c] for c in present} for row in rows]


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


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
    lines += ["| " + " | ".join(_format(row.get(c)) for c in columns) + " |" for row in rows]
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


# ----- plots ----------------------------------------------------------------------------------------------------------
def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend
    except ImportError:
        raise QlitError("Plotting needs matplotlib, which is not installed: pip install matplotlib.") from None
    return Figure


def plot(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Write PNG plots comparing ``runs`` into ``out_dir``.

    ``loss.png``: the train and validation loss curves of every run (x = step). Bar charts, one bar per run that
    logged the value: ``peak_memory.png``, ``fit_time.png``, ``trainable_ratio.png`` (log scale where the ratios
    span more than two decades, as full fine-tuning against prompt tuning does), and one ``val_<metric>.png`` per
    main task metric (a :class:`~qlit.metrics.MetricSpec` with ``main``) that some run is judged by.

    Returns:
        The files written.

    Raises:
        QlitError: matplotlib is not installed.
    """
    figure = _figure_class()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_row(run) for run in runs]
    colors = {run.name: f"C{i % 10}" for i, run in enumerate(runs)}  # a run keeps its colour across the plots
    written: list[Path] = []
    if any(run.scalars.get(tag) for run in runs for tag in ("train/loss", "val/loss")):
        written.append(_loss_plot(figure, runs, colors, out / "loss.png"))
    bars = [
        ("peak_memory.png", "peak_memory_gib", "peak memory (GiB)", False, rows),
        ("fit_time.png", "time/fit_seconds", "training time (s): time/fit_seconds", False, rows),
        ("trainable_ratio.png", "params/trainable_ratio", "trainable / total parameters", True, rows),
    ]
    main = [spec for spec in task_metrics() if spec.main]
    for spec in main:
        better = "lower" if spec.higher_is_better is False else "higher"
        # Each run's main metric only: an SST-2 run is judged by accuracy, a SQuAD run by F1, never both.
        judged = [r for r in rows if _main_metric(r, main) == spec.name]
        label = f"{spec.name}, final ({better} is better)"
        bars.append((spec.name.replace("/", "_") + ".png", spec.name, label, False, judged))
    for filename, column, label, log_if_wide, candidates in bars:
        shown = [r for r in candidates if r[column] is not None]
        if shown:
            written.append(_bar_plot(figure, shown, column, label, log_if_wide, colors, out / filename))
    return written


def _main_metric(row: Row, main: Sequence[MetricSpec]) -> str | None:
    return next((spec.name for spec in main if row.get(spec.name) is not None), None)


def _loss_plot(figure: Any, runs: Sequence[Run], colors: dict[str, str], path: Path) -> Path:
    fig = figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for run in runs:
        for ax, tag, marker in ((axes[0], "train/loss", None), (axes[1], "val/loss", "o")):
            steps, values = run.curve(tag)
            if steps:
                ax.plot(steps, values, color=colors[run.name], marker=marker, markersize=3, label=run.name)
    for ax, tag in zip(axes, ("train/loss", "val/loss"), strict=True):
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats/token)")
    handles: dict[str, Any] = {}
    for ax in axes:  # one legend entry per run, whichever panel it appears in
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def _bar_plot(
    figure: Any,
    rows: Sequence[Row],
    column: str,
    label: str,
    log_if_wide: bool,
    colors: dict[str, str],
    path: Path,
) -> Path:
    names = [str(r["run"]) for r in rows]
    values = [float(r[column]) for r in rows]
    texts = [_format(v) for v in values]
    if column == "peak_memory_gib":  # GPU-allocated and CPU-RSS peaks are different quantities: say which each is
        texts = [f"{t} ({r['peak_memory_of']})" for t, r in zip(texts, rows, strict=True)]
    # Horizontal bars: run names are long (demo_peft_prompt_tuning/version_3) and stay readable on the y axis.
    fig = figure(figsize=(8, 1.2 + 0.45 * len(rows)), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(names, values, color=[colors[name] for name in names])
    ax.invert_yaxis()  # first run on top, as in the table
    positive = [v for v in values if v > 0]
    if log_if_wide and positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    ax.bar_label(bars, labels=texts, padding=3, fontsize="small")
    ax.set_xlabel(label)
    ax.margins(x=0.25)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=120)
    return path


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
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(args.paths)
        rows = table(runs, sort=args.sort, descending=args.descending)
        written = plot(runs, args.plots) if args.plots is not None else []
        if args.csv is not None:
            written.insert(0, to_csv(rows, args.csv))
    except QlitError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(to_markdown(rows))
    for path in written:  # on stderr, so that stdout is the table alone (`> study.md`)
        print(f"{prog}: wrote {path}", file=sys.stderr)
