"""Runs read back from their TensorBoard event files: one :class:`Run` per run directory, one row per run.

Every run already logs what a study compares (README, "What is logged"); the row's columns come from what the
always-on callbacks (:data:`qlit.callbacks.ALWAYS_ON`) and the tasks (:attr:`qlit.tasks.Task.metric_specs`) declare
they log. ``qlit compare`` prints these rows as a table, :mod:`qlit.study.report` writes them as a report.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qlit.errors import QlitError
from qlit.evaluate import EVAL_PREFIX, STDERR_SUFFIX
from qlit.metrics import LM_METRICS, Aggregate, MetricSpec
from qlit.paths import QLIT_BASE_FILE
from qlit.study.techniques import describe_config, technique

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
            hp.get("quantization"),
            hp.get("adapter"),
            hp.get("double_quant"),
            hp.get("compute_dtype"),
            hp.get("bits"),
            hp.get("scheme"),
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


def format_value(value: Any) -> str:
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
