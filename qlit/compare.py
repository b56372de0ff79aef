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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qlit.errors import QlitError
from qlit.evaluate import EVAL_PREFIX, STDERR_SUFFIX
from qlit.metrics import LM_METRICS, Aggregate, MetricSpec
from qlit.naming import adapter_name
from qlit.paths import QLIT_BASE_FILE

EVENTS_PREFIX = "events.out.tfevents."

Row = dict[str, Any]

#: The identity columns of a row, first in the table: which run, what it trained on, the technique, and how long.
_IDENTITY = ("run", "task", "technique", "model", "quantization", "adapter", "rank", "steps", "epochs")

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
        texts: The last text of each text tag (``val/samples``: prompts, generations and references).
    """

    path: Path
    name: str
    hparams: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

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
    name = f"{run_dir.parent.name}/{run_dir.name}"
    return Run(path=run_dir, name=name, hparams=hparams, scalars=scalars, texts=_texts(acc))


def _texts(acc: Any) -> dict[str, str]:
    """The last value of each text summary (TensorBoard keeps the last one of a tag's reservoir)."""
    from tensorboard.util import tensor_util

    out: dict[str, str] = {}
    try:
        tags = acc.PluginTagToContent("text")
    except KeyError:  # the run logged no text
        return out
    for tag in tags:
        events = acc.Tensors(tag)
        if not events:
            continue
        value = tensor_util.make_ndarray(events[-1].tensor_proto)
        item = value.item() if value.size == 1 else value.flatten()[0]
        out[tag.removesuffix("/text_summary")] = item.decode() if isinstance(item, bytes) else str(item)
    return out


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
    """What the resolved ``config.yaml`` LightningCLI writes says about the run (:func:`describe_config`)."""
    return describe_config(_read_yaml(run_dir / "config.yaml"))


def describe_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The study's columns of a run's config (a resolved ``config.yaml``, or a sweep cell's merged config).

    ``pretrained``, ``quantization`` (its mode), ``double_quant``, ``adapter`` (named as
    ``QLitModule.study_hparams`` names it), ``rank`` (LoRA, LoHa and LoKr's ``r``, AdaLoRA's ``target_r``) and
    ``task`` (the DataModule without its suffix, and its dataset: ``SST2 (qlit-samples/sst2)``). A key the config
    does not settle is ``None``.
    """
    model = config.get("model")
    init = model.get("init_args", model) if isinstance(model, Mapping) else None
    out: dict[str, Any] = {"task": _task_name(config.get("data"))}
    if not isinstance(init, Mapping):
        return out
    quantization = init.get("quantization")
    adapter = init.get("adapter")
    rank = None
    if isinstance(adapter, Mapping):
        config_class = str(adapter.get("class_path", "")).rsplit(".", 1)[-1]
        options = adapter.get("init_args") or {}
        name = adapter_name(config_class, options, None) if config_class else None
        rank = options.get("target_r" if config_class == "AdaLoraConfig" else "r")
    elif "adapter" in init:
        name = adapter_name(None, {}, init.get("adapter_path"))
    else:
        name = None
    mode = quantization.get("mode", "none") if isinstance(quantization, Mapping) else None
    double_quant = quantization.get("double_quant") if isinstance(quantization, Mapping) else None
    if mode is not None and double_quant is None:  # QLoRA's default: on for the 4-bit modes
        double_quant = mode in ("nf4", "fp4")
    dtype = init.get("dtype")
    if mode not in (None, "none") and isinstance(quantization, Mapping):
        dtype = quantization.get("compute_dtype", dtype)
    return {
        **out,
        "pretrained": init.get("pretrained"),
        "quantization": mode,
        "double_quant": double_quant,
        "compute_dtype": dtype,
        "adapter": name,
        "rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
    }


def _task_name(data: Any) -> str | None:
    if not isinstance(data, Mapping) or not data.get("class_path"):
        return None
    name = str(data["class_path"]).rsplit(".", 1)[-1].removesuffix("DataModule")
    init = data.get("init_args") or {}
    source = init.get("path") if isinstance(init, Mapping) else None
    if isinstance(source, str) and source in ("json", "csv", "parquet", "text"):  # local files: name the first one
        files = init.get("data_files")
        first = next(iter(files.values()), None) if isinstance(files, Mapping) else files
        source = first[0] if isinstance(first, list) and first else first
    return f"{name} ({source})" if source else name


_METHODS = {
    "LoraConfig": "LoRA",
    "LoraConfig+dora": "DoRA",
    "LoraConfig+rslora": "rsLoRA",
    "LoraConfig+dora+rslora": "DoRA (rsLoRA scaling)",
    "AdaLoraConfig": "AdaLoRA",
    "IA3Config": "IA3",
    "LoHaConfig": "LoHa",
    "LoKrConfig": "LoKr",
    "PromptTuningConfig": "prompt tuning",
    "PrefixTuningConfig": "prefix tuning",
    "PromptEncoderConfig": "P-tuning",
    "loaded": "trained adapter",
}
_BASES = {"none": "", "int8": "8-bit", "nf4": "NF4", "fp4": "FP4", "bitnet": "BitNet"}
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def technique(
    quantization: str | None, adapter: str | None, double_quant: bool | None = None, dtype: str | None = None
) -> str | None:
    """The technique a run stands for, as a study names it: ``QLoRA (NF4 + DQ)``, ``8-bit + LoRA``, ``IA3 on NF4``,
    ``full fine-tuning (fp32)``, ``BitNet b1.58``; ``None`` where neither the quantization nor the adapter is known.
    """
    if quantization is None and adapter is None:
        return None
    mode = quantization or "none"
    base = _BASES.get(mode, mode)
    if mode in ("nf4", "fp4") and double_quant:
        base += " + DQ"
    if adapter == "full":
        if mode == "bitnet":
            return "BitNet b1.58"
        return "full fine-tuning" + (f" ({_DTYPES[dtype]})" if dtype in _DTYPES else "")
    if adapter == "LoraConfig" and mode in ("int8", "nf4", "fp4", "bitnet"):
        return {"int8": "8-bit + LoRA", "bitnet": "QLoRA + BitNet"}.get(mode, f"QLoRA ({base})")
    method = _METHODS.get(adapter or "", (adapter or "?").removesuffix("Config"))
    return f"{method} on {base}" if base else method


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
        "adapter": _adapter_class(run_dir / "adapter"),
    }


def _adapter_class(adapter_dir: Path) -> str | None:
    """The peft config class of a saved adapter (``LoraConfig``), from its ``adapter_config.json``'s ``peft_type``."""
    try:
        peft_type = json.loads((adapter_dir / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(peft_type, str):
        return None
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    return config.__name__ if config is not None else None


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
    tested = [replace(spec, name="test/" + spec.name.removeprefix("val/")) for spec in _LM_METRICS[1:]]
    return [*costs, *_LM_METRICS, *task_metrics(), *tested, *task_metrics("test"), *evaluation]


def task_metrics(stage: str = "val") -> list[MetricSpec]:
    """The metrics every task declares, as logged in ``stage`` (``val/<name>``), each once, in the order the classes
    define them."""
    from qlit.tasks import Task

    specs: dict[str, MetricSpec] = {}
    pending = list(Task.__subclasses__())
    while pending:  # depth first, so a subclass's metrics follow its parent's
        cls = pending.pop(0)
        pending[:0] = cls.__subclasses__()
        for spec in vars(cls).get("metric_specs", ()):
            if spec.aggregate:
                specs.setdefault(spec.name, replace(spec, name=f"{stage}/{spec.name}"))
    return list(specs.values())


def columns() -> list[str]:
    """Every column a row can have, in table order; :func:`table` drops those no run has."""
    names = list(_IDENTITY)
    for spec in metric_columns():
        names += [spec.name, spec.source_column] if spec.sources else [spec.name]
    return names


def run_row(run: Run) -> Row:
    """The table row of one run: every column of :func:`columns`, ``None`` where the run did not log it, then its
    ``eval/*`` benchmark results.

    ``steps`` is the last step the run logged at (the optimizer steps it trained: the end-of-fit metrics are logged
    there); ``epochs`` the epochs it trained in (a partial last epoch counts as one).
    """
    hp = run.hparams
    epochs = run.maximum("epoch")
    row: Row = {
        "run": run.name,
        "task": hp.get("task"),
        "technique": technique(
            hp.get("quantization"), hp.get("adapter"), hp.get("double_quant"), hp.get("compute_dtype")
        ),
        "model": hp.get("pretrained"),
        "quantization": hp.get("quantization"),
        "adapter": hp.get("adapter"),
        "rank": hp.get("rank") if isinstance(hp.get("rank"), int) else None,
        "steps": max((step for series in run.scalars.values() for step, _ in series), default=None),
        "epochs": int(epochs) + 1 if epochs is not None else None,
    }
    for spec in metric_columns():
        if spec.sources:  # the first of the tags the run logged, and which one it was
            found = ((run.value(tag, spec.aggregate), label) for tag, label in spec.sources)
            row[spec.name], row[spec.source_column] = next(((v, lb) for v, lb in found if v is not None), (None, None))
            continue
        value = run.value(spec.name, spec.aggregate or "last")
        row[spec.name] = round(value) if spec.integer and value is not None else value
    row.update({tag: run.last(tag) for tag in eval_columns([run])})
    return row


def eval_columns(runs: Sequence[Run]) -> list[str]:
    """The benchmark scores ``qlit eval`` logged (``eval/<task>/<metric>``; lm-eval's tasks, declared by no plug-in),
    without their standard errors, which stay in TensorBoard and the results JSON."""
    tags = {tag for run in runs for tag in run.scalars if tag.startswith(EVAL_PREFIX)}
    return sorted(tag for tag in tags if not tag.endswith(STDERR_SUFFIX))


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
    """Write the report's PNG plots (:func:`qlit.report.plot_report`) comparing ``runs`` into ``out_dir``.

    Returns:
        The files written.

    Raises:
        QlitError: matplotlib is not installed.
    """
    from qlit.report import Entry, plot_report, report_rows

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
    from qlit.report import Entry, study_entries, write_report

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
