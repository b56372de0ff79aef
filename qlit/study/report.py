"""The report of a study: ``report.md``, ``report.csv`` and PNG plots, one row per run, grouped by task.

``qlit sweep`` writes it when its cells are done; ``qlit compare --report DIR PATH...`` writes the same for any runs
(a sweep's output folder, read with its cells' names, labels and failures, or plain run directories). The numbers
are :func:`qlit.study.runs.run_row`'s, so the CSV holds exactly what the event files hold; the Markdown table shows
them rounded, with units and which way is better.

Plots, per task: validation loss by optimizer step and by tokens trained (one line per run, markers as well as
colours, so a grey print still tells them apart), training loss likewise, the task's main metric against the LoRA
rank and against peak memory (each point labelled with its technique), and training tokens/s and generation latency
per run. A plot whose axis would be degenerate (a single rank, a single run) is not drawn.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlit.errors import QlitError
from qlit.metrics import STDERR_SUFFIX, MetricSpec
from qlit.study.runs import Row, Run, columns, format_value, read_run, run_row, task_metrics
from qlit.study.techniques import describe_config, technique

PLOTS_DIR = "plots"

#: Markers and line styles cycled per run, so that curves differ without colour.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
_LINES = ("-", "--", "-.", ":")

#: Metric columns the report shows besides the tasks' own, with a short header.
_SHOWN = {
    "params/trainable_ratio": "trainable",
    "params/trainable": "trainable params",
    "params/total": "total params",
    "params/weight_gib": "weights GiB",
    "fidelity/weight_rel_error": "weight error",
    "fidelity/perplexity_ratio": "base ppl ×",
    "peak_memory_gib": "peak memory GiB",
    "time/fit_seconds": "train time s",
    "train/tokens_per_sec": "tokens/s",
    "train/step_time_sec": "s/step",
    "train/tokens_seen": "tokens trained",
    "val/loss": "val loss",
    "val/perplexity": "perplexity",
    "val/latency_ms_mean": "latency ms",
    "val/decode_ms_per_token": "decode ms/token",
    "val/batch_decode_ms_per_token": "batch decode ms/token",
    "test/loss": "test loss",
    "test/perplexity": "test perplexity",
}
_BETTER = {
    "params/weight_gib": False,
    "fidelity/weight_rel_error": False,
    "fidelity/perplexity_ratio": False,
    "peak_memory_gib": False,
    "time/fit_seconds": False,
    "train/tokens_per_sec": True,
    "train/step_time_sec": False,
    "val/loss": False,
    "val/perplexity": False,
    "val/latency_ms_mean": False,
    "val/decode_ms_per_token": False,
    "val/batch_decode_ms_per_token": False,
    "test/loss": False,
    "test/perplexity": False,
}
#: What the untrained model scored (``before`` stages), as columns ``before/<metric>``.
BEFORE = "before/"


@dataclass
class Entry:
    """One row of a report: a run, or a study cell that may have failed before it logged anything.

    Args:
        name: the cell's name, or the run's.
        label: what the table and the plots call it (``QLoRA (NF4 + DQ), r=8``); ``None``: the run's technique.
        status: ``done``, ``failed``, ``interrupted`` or ``not run``.
        reason: why it failed.
        run: the training run (``fit``), if it logged anything.
        stages: the runs of its other stages: ``validate`` and ``test`` after training, ``before-validate`` and
            ``before-test`` on the untrained model.
        config: the cell's config, for what a run that never started would have been.
        series: the strategy label without axis values: one line of the metric-vs-rank plot.
        strategy: the study's strategy the cell belongs to.
    """

    name: str
    label: str | None = None
    status: str = "done"
    reason: str | None = None
    run: Run | None = None
    stages: dict[str, Run] = field(default_factory=dict)
    config: Mapping[str, Any] | None = None
    series: str | None = None
    strategy: str | None = None


# ----- rows ---------------------------------------------------------------------------------------------------------
def report_rows(entries: Sequence[Entry]) -> list[Row]:
    """One row per entry: its run's :func:`~qlit.study.runs.run_row`, the metrics of its stages, ``label``, ``status``
    and ``reason``. Every row has the same keys; those no row has a value for are dropped.
    """
    rows: list[Row] = []
    for entry in entries:
        row = run_row(entry.run) if entry.run is not None else dict.fromkeys(columns())
        row["run"] = entry.name
        if entry.config is not None:  # a cell that never logged: what it was meant to be
            described = describe_config(entry.config)
            described["model"] = described.pop("pretrained", None)
            row.update({k: row.get(k) if row.get(k) is not None else v for k, v in described.items() if k in row})
            if row.get("technique") is None:
                row["technique"] = technique(
                    described.get("quantization"),
                    described.get("adapter"),
                    described.get("double_quant"),
                    described.get("compute_dtype"),
                    described.get("bits"),
                    described.get("scheme"),
                )
        for stage, run in entry.stages.items():
            staged = run_row(run)
            for key, value in staged.items():
                if value is None or not key.startswith(("val/", "test/", "eval/")):
                    continue
                if stage.startswith("before-"):
                    row[BEFORE + key] = value
                else:  # validate or test of the trained model: its last checkpoint's numbers
                    row[key] = value
        row["label"] = entry.label or row.get("technique") or entry.name
        row["series"] = entry.series or row.get("technique") or row["label"]
        row["strategy"] = entry.strategy
        row["status"] = entry.status
        row["reason"] = entry.reason
        rows.append(row)
    _distinct_labels(rows)
    keys = ["label", "status", "reason", *[k for row in rows for k in row]]
    keys = [k for k in dict.fromkeys(keys) if k == "run" or any(row.get(k) is not None for row in rows)]
    return [{k: row.get(k) for k in keys} for row in rows]


def _distinct_labels(rows: list[Row]) -> None:
    """Labels told apart within a task (the tables and plots are per task): by the rank, else by the run's name."""
    for attempt in ("rank", "run"):
        seen: dict[tuple[Any, str], list[Row]] = {}
        for row in rows:
            seen.setdefault((row.get("task"), row["label"]), []).append(row)
        for (_, label), same in seen.items():
            if len(same) < 2:
                continue
            for row in same:
                if attempt == "rank" and row.get("rank") is not None and "r=" not in label:
                    row["label"] = f"{label}, r={row['rank']}"
                elif attempt == "run":
                    row["label"] = f"{label} [{row['run']}]"


def main_metric(rows: Sequence[Row]) -> MetricSpec:
    """The metric a task group is judged by: its task's main metric, else the validation perplexity."""
    for spec in task_metrics():
        if spec.main and any(row.get(spec.name) is not None for row in rows):
            return spec
    return _PERPLEXITY


_PERPLEXITY = MetricSpec("val/perplexity", "", higher_is_better=False)


def plotted_metric(rows: Sequence[Row]) -> MetricSpec:
    """The metric a group's plots show: its main metric, unless every finished run has the same value (BLEU 0 for
    every run of a tiny model) and the perplexity does differ; a flat axis would show nothing."""
    spec = main_metric(rows)
    done = [row for row in rows if row["status"] == "done"]

    def varies(name: str) -> bool:
        return len({row.get(name) for row in done if row.get(name) is not None}) > 1

    return _PERPLEXITY if not varies(spec.name) and varies(_PERPLEXITY.name) else spec


def groups(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """The rows by task, in the order tasks first appear."""
    out: dict[str, list[Row]] = {}
    for row in rows:
        out.setdefault(row.get("task") or "runs", []).append(row)
    return out


# ----- writing ------------------------------------------------------------------------------------------------------
def write_report(
    entries: Sequence[Entry],
    out_dir: str | Path,
    title: str,
    description: str = "",
    notes: Sequence[str] = (),
) -> list[Path]:
    """Write ``report.md``, ``report.csv`` and the plots (``plots/*.png``, where matplotlib is installed).

    Returns:
        The files written, ``report.md`` first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report_rows(entries)
    csv_path = write_csv(rows, out / "report.csv")
    try:
        plots = plot_report(entries, rows, out / PLOTS_DIR)
        plot_note = None
    except QlitError as err:  # no matplotlib: the tables still stand
        plots, plot_note = [], str(err)
    md = out / "report.md"
    md.write_text(to_report_markdown(entries, rows, title, description, plots, out, [*notes, plot_note]))
    return [md, csv_path, *plots]


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """Every column at full precision; an empty cell where a run has no value."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in names} for row in rows)
    return path


def to_report_markdown(
    entries: Sequence[Entry],
    rows: Sequence[Row],
    title: str,
    description: str,
    plots: Sequence[Path],
    out: Path,
    notes: Sequence[str | None] = (),
) -> str:
    lines = [f"# {title}", ""]
    if description:
        lines += [description.strip(), ""]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    summary = f"{len(rows)} runs: " + ", ".join(f"{n} {status}" for status, n in counts.items())
    sources = {row.get("peak_memory_of") for row in rows} - {None}
    lines += [summary + ".", ""]
    lines += [f"- {note}" for note in notes if note]
    if sources:
        what = {"gpu allocated": "the GPU memory allocated by tensors", "cpu rss": "the process's resident memory"}
        lines.append(
            "- Peak memory is " + " and ".join(what.get(s, s) for s in sorted(sources)) + " during training "
            "(a CPU run's includes the Python runtime and libraries, so it shows differences, not the model alone)."
        )
    lines += [
        "- ↑ higher is better, ↓ lower is better. `steps`: optimizer steps trained; runs of different length are "
        "not equals: compare their curves, which share an axis.",
        "",
    ]
    by_name = {entry.name: entry for entry in entries}
    for task, group in groups(rows).items():
        spec = main_metric(group)
        models = {row.get("model") for row in group} - {None}
        model = f", model `{models.pop()}`" if len(models) == 1 else ""
        lines += [f"## {task}{model}", "", _table(group, spec), ""]
        lines += _indistinguishable(group, spec)
        plotted = plotted_metric(group)
        if plotted.name != spec.name:
            same = {row.get(spec.name) for row in group if row["status"] == "done"}
            lines += [f"{spec.name} is {format_value(same.pop())} for every run: the plots show {plotted.name}.", ""]
        failed = [row for row in group if row["status"] != "done"]
        if failed:
            lines += ["Not done:", ""]
            lines += [
                f"- **{row['label']}** (`{row['run']}`): {row['status']}: {row['reason'] or '—'}" for row in failed
            ]
            lines.append("")
        for path in plots:
            if path.stem.endswith("-" + _slug(task)):
                lines += [f"![{_plot_title(path)}]({path.relative_to(out).as_posix()})", ""]
        lines += _generations(group, by_name)
    lines += _column_notes(rows)
    return "\n".join(lines).rstrip() + "\n"


def _table(rows: Sequence[Row], spec: MetricSpec) -> str:
    # A metric's standard error is shown in its cell (value ± stderr), not in a column of its own.
    task_specs = [s for s in task_metrics() if any(r.get(s.name) is not None for r in rows)]
    task_specs = [s for s in task_specs if not s.name.endswith(STDERR_SUFFIX)]
    task_specs.sort(key=lambda s: s.name != spec.name)
    shown: list[tuple[str, str]] = [("label", "technique"), ("run", "run")]
    if any(r["status"] != "done" for r in rows):
        shown.append(("status", "status"))
    shown += [("quantization", "quantization"), ("rank", "rank"), ("model", "model")]
    shown += [("steps", "steps"), ("epochs", "epochs")]
    shown += [(k, _header(k)) for k in ("train/tokens_seen", "params/trainable_ratio", "params/trainable")]
    shown += [(k, _header(k)) for k in ("params/total", "params/weight_gib")]
    shown += [(k, _header(k)) for k in ("fidelity/weight_rel_error", "fidelity/perplexity_ratio")]
    shown += [(k, _header(k)) for k in ("peak_memory_gib", "time/fit_seconds")]
    shown += [(k, _header(k)) for k in ("train/tokens_per_sec", "train/step_time_sec")]
    shown += [(s.name, _header(s.name, s)) for s in task_specs]
    shown += [(k, _header(k)) for k in ("val/loss", "val/perplexity", "val/latency_ms_mean")]
    shown += [(k, _header(k)) for k in ("val/decode_ms_per_token", "val/batch_decode_ms_per_token")]
    test = [s for s in task_metrics("test") if any(r.get(s.name) is not None for r in rows)]
    test = [s for s in test if not s.name.endswith(STDERR_SUFFIX)]
    shown += [(k, _header(k)) for k in ("test/loss", "test/perplexity")] + [(s.name, _header(s.name, s)) for s in test]
    before = sorted({k for r in rows for k in r if k.startswith(BEFORE) and r[k] is not None})
    shown += [(k, _header(k)) for k in before]
    shown += [(k, k) for k in sorted({k for r in rows for k in r if k.startswith("eval/")})]
    shown = [(k, h) for k, h in shown if any(r.get(k) is not None for r in rows)]
    if len({r.get("model") for r in rows}) == 1:
        shown = [(k, h) for k, h in shown if k != "model"]
    # Sizes under half a GiB read better in MiB (a small model's weights: 0.0007 GiB is 0.75 MiB).
    mib = {k for k, _ in shown if k.endswith("_gib") and all((r.get(k) or 0) < 0.5 for r in rows)}
    shown = [(k, h.replace("GiB", "MiB") if k in mib else h) for k, h in shown]
    lines = ["| " + " | ".join(h for _, h in shown) + " |"]
    lines.append("|" + "|".join("---:" if any(_numeric(r.get(k)) for r in rows) else "---" for k, _ in shown) + "|")
    for row in rows:
        cells = [_cell(k, row[k] * 1024 if k in mib and row.get(k) is not None else row.get(k)) for k, _ in shown]
        cells = [cell + _plus_minus(row, k) for cell, (k, _) in zip(cells, shown, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plus_minus(row: Row, key: str) -> str:
    """`` ± <stderr>`` for a metric logged with its standard error, else nothing."""
    stderr = row.get(key + STDERR_SUFFIX)
    if row.get(key) is None or not isinstance(stderr, (int, float)) or not math.isfinite(stderr):
        return ""
    return f" ± {format_value(float(stderr))}"


def _indistinguishable(rows: Sequence[Row], spec: MetricSpec) -> list[str]:
    """The line saying which runs the group's best cannot be told apart from, on a main metric with a standard
    error: those within twice the standard error of the difference, √(se₁² + se₂²) (about 95 %)."""
    scored = [
        (row, row[spec.name], row.get(spec.name + STDERR_SUFFIX))
        for row in rows
        if row["status"] == "done" and isinstance(row.get(spec.name), (int, float))
    ]
    scored = [(row, v, se) for row, v, se in scored if isinstance(se, (int, float)) and math.isfinite(se)]
    if len(scored) < 2 or spec.higher_is_better is None:
        return []
    best, value, se = (max if spec.higher_is_better else min)(scored, key=lambda t: t[1])
    close = [row["label"] for row, v, s in scored if row is not best and abs(v - value) <= 2 * math.hypot(se, s)]
    name = spec.name.split("/", 1)[-1]
    if not close:
        return [
            f"{name}: the best run, {best['label']}, is ahead of every other by more than twice the standard "
            "error of the difference.",
            "",
        ]
    return [
        f"{name}: {', '.join(close)} cannot be told apart from the best run, {best['label']} (their difference is "
        "within twice its standard error, √(se₁² + se₂²), over the rows generated for).",
        "",
    ]


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _header(key: str, spec: MetricSpec | None = None) -> str:
    if key.startswith(BEFORE):
        return "before: " + _header(key[len(BEFORE) :])
    base = key.split("/", 1)[-1]
    name = _SHOWN.get(key) or (f"{key.split('/')[0]} {base}" if key.startswith("test/") else base)
    if spec is None:
        spec = next((s for s in (*task_metrics(), *task_metrics("test")) if s.name == key), None)
    unit = spec.unit if spec is not None and spec.unit not in ("", "ratio", "count") else ""
    if unit and unit not in name:
        name += f" ({unit})"
    better = _BETTER.get(key, spec.higher_is_better if spec is not None else None)
    return name + {True: " ↑", False: " ↓", None: ""}[better]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key == "params/trainable_ratio":
        return f"{100 * value:.3g} %"
    if key in ("params/trainable", "params/total", "train/tokens_seen"):
        return _count(value)
    if key == "time/fit_seconds":
        return f"{value:.1f}"
    if key == "run":
        return f"`{value}`"
    if key == "reason":
        return str(value).replace("|", "\\|")
    return format_value(value)


def _count(value: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:,.0f}"


def _column_notes(rows: Sequence[Row]) -> list[str]:
    return [
        "## Columns",
        "",
        '`report.csv` holds every column at full precision, named as the metrics are logged (README, "What is '
        'logged"). trainable: trainable / total parameters. weights: storage of the parameters (4-bit scales '
        "included). train time: the whole fit, model loading included. tokens/s and s/step: medians over the run "
        "(validation excluded). The task's metrics, loss and perplexity: the last validation of the trained model. "
        "latency: mean per-sample time of a greedy generation in validation; decode ms/token: its time per new token "
        "after the first, one prompt at a time, and batch decode at the validation batch (one step for every row). "
        "± : the standard error over the rows generated for. `before:` the untrained model (the base, "
        "with LoRA or IA3 at their identity initialisation).",
        *_fidelity_note(rows),
        "",
    ]


def _fidelity_note(rows: Sequence[Row]) -> list[str]:
    if not any(r.get("fidelity/weight_rel_error") is not None for r in rows):
        return []
    return [
        "",
        "weight error: the quantized projections' relative reconstruction error ‖W − Ŵ‖ / ‖W‖ against the unquantized "
        "checkpoint, before training; base ppl ×: the factor the stored base (no adapter) multiplies the original's "
        "validation perplexity by, before training (the fidelity callback).",
    ]


def _generations(rows: Sequence[Row], entries: Mapping[str, Entry], limit: int = 3) -> list[str]:
    """Example generations side by side: for each of the first prompts, what every run generated."""
    texts: list[tuple[str, list[tuple[str, str, str]]]] = []
    for row in rows:
        entry = entries.get(row["run"])
        if entry is None:
            continue
        before = entry.stages.get("before-validate")
        if before is not None and "val/samples" in before.texts:
            texts.append((f"{row['label']}, before training", parse_samples(before.texts["val/samples"])))
        after = entry.stages.get("validate") or entry.run
        if after is not None and "val/samples" in after.texts:
            texts.append((row["label"], parse_samples(after.texts["val/samples"])))
    if not texts:
        return []
    lines = ["### Example generations", ""]
    for i in range(min(limit, max(len(samples) for _, samples in texts))):
        first = next((samples[i] for _, samples in texts if len(samples) > i), None)
        if first is None:
            break
        lines += [f"Prompt {i + 1}: {_inline(first[0], 300)}", "", f"Reference: {_inline(first[2], 200)}", ""]
        lines += ["| run | generation |", "|---|---|"]
        for label, samples in texts:
            if len(samples) > i and samples[i][0] == first[0]:
                lines.append(f"| {label} | {_inline(samples[i][1], 200)} |")
        lines.append("")
    return lines


def parse_samples(text: str) -> list[tuple[str, str, str]]:
    """``(prompt, generation, reference)`` triples from the ``val/samples`` text (:func:`qlit.tasks.format_samples`)."""
    out = []
    for block in text.split("\n\n---\n\n"):
        parts = re.split(r"\*\*(?:Sample \d+: prompt|Generation|Reference)\*\*\n\n", block)
        if len(parts) != 4:
            continue
        prompt, generation, reference = (_uncode(p) for p in parts[1:])
        out.append((prompt, generation, reference))
    return out


def _uncode(block: str) -> str:
    return "\n".join(line[4:] if line.startswith("    ") else line for line in block.strip("\n").splitlines()).strip()


def _inline(text: str, limit: int) -> str:
    """One line of Markdown code; a long text keeps its start and its end (a prompt's question comes last)."""
    text = " ⏎ ".join(line.strip() for line in text.strip().splitlines() if line.strip()) or "(empty)"
    if len(text) > limit:
        head = limit // 3
        text = text[:head] + " … " + text[len(text) - (limit - head - 3) :]
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


# ----- plots --------------------------------------------------------------------------------------------------------
def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend
    except ImportError:
        raise QlitError("Plotting needs matplotlib, which is not installed: pip install matplotlib.") from None
    return Figure


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "runs"


def _plot_title(path: Path) -> str:
    return path.stem.rsplit("-", 1)[0].replace("_", " ")


def plot_report(entries: Sequence[Entry], rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """The report's PNG plots, per task group (file names end in ``-<task>``); returns the files written.

    Raises:
        QlitError: matplotlib is not installed.
    """
    figure = _figure_class()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):  # a plot the new runs no longer make must not linger beside the report
        stale.unlink()
    by_name = {entry.name: entry for entry in entries}
    styles = {row["run"]: _style(i) for i, row in enumerate(rows)}
    written: list[Path] = []
    for task, group in groups(rows).items():
        slug = _slug(task)
        done = [row for row in group if row["status"] == "done"]
        spec = plotted_metric(group)
        for tag in ("val/loss", "train/loss"):
            target = out_dir / f"{tag.split('/')[0]}_loss-{slug}.png"
            path = _loss_curves(figure, done, by_name, styles, tag, task, target)
            if path is not None:
                written.append(path)
        for make in (_metric_vs_rank, _metric_vs_memory, _speed):
            path = make(figure, done, styles, spec, task, out_dir, slug)
            if path is not None:
                written.append(path)
    return written


def _style(i: int) -> dict[str, Any]:
    return {
        "color": f"C{i % 10}",
        "marker": _MARKERS[i % len(_MARKERS)],
        "linestyle": _LINES[(i // len(_MARKERS)) % len(_LINES)],
    }


def _direction(spec: MetricSpec) -> str:
    return {True: "higher is better", False: "lower is better", None: ""}[spec.higher_is_better]


def _metric_label(spec: MetricSpec) -> str:
    unit = f" ({spec.unit})" if spec.unit not in ("", "ratio", "count") else ""
    better = _direction(spec)
    return f"{spec.name}{unit}" + (f"\n{better}" if better else "")


def _loss_curves(
    figure: Any,
    rows: Sequence[Row],
    entries: Mapping[str, Entry],
    styles: Mapping[str, dict[str, Any]],
    tag: str,
    task: str,
    path: Path,
) -> Path | None:
    """Loss by optimizer step and, where the runs logged ``train/tokens_seen``, by tokens trained."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    curves = []
    for row in rows:
        entry = entries.get(row["run"])
        run = entry.run if entry is not None else None
        if run is None:
            continue
        steps, values = run.curve(tag)
        before = entry.stages.get("before-validate") if tag == "val/loss" else None
        if before is not None and before.last("val/loss") is not None and (not steps or steps[0] > 0):
            steps, values = [0, *steps], [before.last("val/loss"), *values]
        if steps:
            curves.append((row, steps, values, _tokens_at(run, steps)))
    if not curves or max(len(steps) for _, steps, _, _ in curves) < 2:  # one point each: no curve to see
        return None
    by_tokens = all(tokens is not None for *_, tokens in curves)
    fig = figure(figsize=(13 if by_tokens else 8, 4.8), layout="constrained")
    axes = fig.subplots(1, 2 if by_tokens else 1, sharey=True, squeeze=False)[0]
    for row, steps, values, tokens in curves:
        kwargs = {**styles[row["run"]], "label": row["label"], "markersize": 5, "linewidth": 1.4}
        if len(steps) > 12:
            kwargs["markevery"] = max(1, len(steps) // 8)
        axes[0].plot(steps, values, **kwargs)
        if by_tokens:
            axes[1].plot(tokens, values, **kwargs)
    what = "validation" if tag == "val/loss" else "training"
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel(f"{what} loss (nats/token), lower is better")
    if by_tokens:
        axes[1].set_xlabel("tokens trained")
        axes[1].xaxis.set_major_formatter(EngFormatter(sep=""))  # 150k, 1.2M: not 150000 or an offset
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    fig.suptitle(f"{task}: {what} loss")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def _tokens_at(run: Run, steps: Sequence[int]) -> list[float] | None:
    """Tokens trained at each of ``steps``: linear between the logged ``train/tokens_seen`` points."""
    known_steps, known = run.curve("train/tokens_seen")
    if not known_steps:
        return None
    xs, ys = [0, *known_steps], [0.0, *known]
    rate = ys[-1] / xs[-1] if xs[-1] else 0.0
    out = []
    for step in steps:
        if step >= xs[-1]:
            out.append(ys[-1] + (step - xs[-1]) * rate)
            continue
        i = next(i for i, x in enumerate(xs) if x >= step)
        lo = max(i - 1, 0)
        span = xs[i] - xs[lo]
        out.append(ys[lo] + (ys[i] - ys[lo]) * ((step - xs[lo]) / span if span else 0.0))
    return out


def _metric_vs_rank(
    figure: Any, rows: Sequence[Row], styles: Any, spec: MetricSpec, task: str, out_dir: Path, slug: str
) -> Path | None:
    scored = [row for row in rows if row.get(spec.name) is not None]
    ranked = [row for row in scored if row.get("rank") is not None]
    ranks = sorted({row["rank"] for row in ranked})
    if len(ranks) < 2:
        return None
    fig = figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.subplots()
    series: dict[str, list[Row]] = {}
    for row in ranked:
        series.setdefault(row["series"], []).append(row)
    for name, points in series.items():
        points.sort(key=lambda r: r["rank"])
        style = styles[points[0]["run"]]
        ax.plot([r["rank"] for r in points], [r[spec.name] for r in points], label=name, markersize=7, **style)
    for row in scored:
        if row.get("rank") is None:  # full fine-tuning, prompt tuning, ...: no rank, one reference level
            style = styles[row["run"]]
            ax.axhline(row[spec.name], color=style["color"], linestyle=":", linewidth=1.2, label=f"{row['label']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank r (log scale)")
    ax.set_ylabel(_metric_label(spec))
    _not_flat(ax, [row[spec.name] for row in scored])
    ax.grid(alpha=0.3)
    ax.set_title(f"{task}: {spec.name} against LoRA rank")
    fig.legend(loc="outside right upper", fontsize="small")
    path = out_dir / f"{_slug(spec.name)}_vs_rank-{slug}.png"
    fig.savefig(path, dpi=110)
    return path


def _metric_vs_memory(
    figure: Any, rows: Sequence[Row], styles: Any, spec: MetricSpec, task: str, out_dir: Path, slug: str
) -> Path | None:
    points = [row for row in rows if row.get(spec.name) is not None and row.get("peak_memory_gib") is not None]
    if len({(row["peak_memory_gib"], row[spec.name]) for row in points}) < 2:  # one point, however many runs
        return None
    fig = figure(figsize=(9, 5.2), layout="constrained")
    ax = fig.subplots()
    sources = {row.get("peak_memory_of") for row in points} - {None}
    xs, ys = [row["peak_memory_gib"] for row in points], [row[spec.name] for row in points]
    # Peaks of different kinds (GPU allocated, CPU resident) are not one quantity: each label says its own.
    texts = [row["label"] + (f" ({row.get('peak_memory_of')})" if len(sources) > 1 else "") for row in points]
    for row, x, y, text, offset in zip(points, xs, ys, texts, _label_offsets(xs, ys, texts), strict=True):
        style = styles[row["run"]]
        ax.plot([x], [y], marker=style["marker"], color=style["color"], markersize=9, linestyle="none")
        leader = {"arrowstyle": "-", "color": "0.55", "linewidth": 0.6} if offset[1] != 5 else None
        ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize="small", arrowprops=leader)
    source = ", ".join(sorted(sources)) if sources else "peak"
    ax.set_xlabel(f"peak memory (GiB, {source}), lower is better")
    ax.set_ylabel(_metric_label(spec))
    _not_flat(ax, [row[spec.name] for row in points])
    _not_flat(ax, [row["peak_memory_gib"] for row in points], axis="x")
    ax.margins(x=0.25, y=0.15)
    ax.grid(alpha=0.3)
    ax.set_title(f"{task}: {spec.name} against peak memory")
    path = out_dir / f"{_slug(spec.name)}_vs_memory-{slug}.png"
    fig.savefig(path, dpi=110)
    return path


def _speed(
    figure: Any, rows: Sequence[Row], styles: Any, spec: MetricSpec, task: str, out_dir: Path, slug: str
) -> Path | None:
    panels = [
        (key, title)
        for key, title in (
            ("train/tokens_per_sec", "training tokens/s (median), higher is better"),
            ("val/latency_ms_mean", "generation latency (ms per sample), lower is better"),
        )
        if any(row.get(key) is not None for row in rows)
    ]
    if not panels:
        return None
    fig = figure(figsize=(6.5 * len(panels), 1.6 + 0.42 * len(rows)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels, strict=True):
        shown = [row for row in rows if row.get(key) is not None]
        bars = ax.barh(
            [row["label"] for row in shown],
            [row[key] for row in shown],
            color=[styles[row["run"]]["color"] for row in shown],
            hatch=None,
        )
        ax.bar_label(bars, labels=[format_value(row[key]) for row in shown], padding=3, fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel(title)
        ax.margins(x=0.2)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{task}: speed")
    path = out_dir / f"speed-{slug}.png"
    fig.savefig(path, dpi=110)
    return path


def _label_offsets(xs: Sequence[float], ys: Sequence[float], texts: Sequence[str]) -> list[tuple[int, int]]:
    """Where each point's label goes (in points from the point): to its right at the first height where it covers
    neither a label already placed nor another point. Positions are estimated on the plot's data area (about
    560 × 320 points between the margins), with 6 points per character and labels 9 points high."""
    slots = [5, -13, 17, -25, 29, -37, 41, -49, 53, -61]

    def scaled(values: Sequence[float], size: float) -> list[float]:
        lo, hi = min(values), max(values)
        return [size * (v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]

    px, py = scaled(xs, 560), scaled(ys, 320)
    boxes: list[tuple[float, float, float]] = []  # left, right, bottom of each placed label

    def free(i: int, dy: int) -> bool:
        left, right, bottom = px[i] + 7, px[i] + 7 + 6 * len(texts[i]), py[i] + dy
        labels = all(r <= left or right <= lo or abs(bottom - b) >= 11 for lo, r, b in boxes)
        points = all(
            j == i or not (left - 6 <= px[j] <= right and bottom - 5 < py[j] < bottom + 14) for j in range(len(xs))
        )
        return labels and points

    out: dict[int, tuple[int, int]] = {}
    for i in sorted(range(len(xs)), key=lambda i: (px[i], py[i])):
        dy = next((d for d in slots if free(i, d)), next((d for d in slots if all(
            abs(py[i] + d - b) >= 11 for *_, b in boxes)), slots[0]))  # fmt: skip
        boxes.append((px[i] + 7, px[i] + 7 + 6 * len(texts[i]), py[i] + dy))
        out[i] = (7, dy)
    return [out[i] for i in range(len(xs))]


def _not_flat(ax: Any, values: Sequence[float], axis: str = "y") -> None:
    """An axis whose values are all equal gets a visible range around them instead of a degenerate one."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite or max(finite) != min(finite):
        return
    v = finite[0]
    pad = abs(v) * 0.1 or 0.1
    low = v - pad if v - pad >= 0 or v < 0 else 0.0  # a non-negative metric keeps a non-negative axis
    (ax.set_ylim if axis == "y" else ax.set_xlim)(low, v + pad)


# ----- a study's entries --------------------------------------------------------------------------------------------
def study_entries(out_dir: str | Path) -> tuple[dict[str, Any], list[Entry]]:
    """The entries of a sweep's output folder, from its ``sweep.json`` and run directories, in the study's order.

    Raises:
        QlitError: the folder holds no ``sweep.json``, or it is damaged.
    """
    out = Path(out_dir)
    path = out / "sweep.json"
    try:
        state = json.loads(path.read_text())
        cells = state["cells"]
        order = [name for name in state.get("order", cells) if name in cells]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise QlitError(f"'{path}' cannot be read ({err}): is '{out}' the output folder of a sweep?") from None
    entries = []
    for name in order:
        cell = cells[name]
        folder = out / "runs" / name
        runs = {d.name: read_run(d) for d in sorted(folder.iterdir()) if d.is_dir()} if folder.is_dir() else {}
        runs = {stage: run for stage, run in runs.items() if run.scalars}
        config = _cell_config(out / "cells" / f"{name}.yaml")
        label = cell.get("label")
        entries.append(
            Entry(
                name=name,
                label=label,
                status=cell.get("status", "not run"),
                reason=cell.get("reason"),
                run=runs.pop("fit", None),
                stages=runs,
                config=config,
                series=cell.get("series"),
                strategy=cell.get("strategy"),
            )
        )
    return state, entries


def _cell_config(path: Path) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def study_notes(state: Mapping[str, Any]) -> list[str]:
    """The notes under a study's report: where its cells' configs and runs are, and how long they ran."""
    seconds = [c.get("seconds") or 0.0 for c in state.get("cells", {}).values()]
    notes = [f"Study file: `{state.get('file')}`; each cell's config: `cells/<cell>.yaml`, its run: `runs/<cell>/`."]
    if any(seconds):
        notes.append(f"Cells ran for {sum(seconds) / 60:.1f} minutes in all (start-up included).")
    return notes
