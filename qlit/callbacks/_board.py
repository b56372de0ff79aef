"""What TensorBoard shows of a study: the run's one HPARAMS record with its metrics linked, and a custom-scalars layout
that opens on the numbers runs are compared by. Written once per run by the ``params`` callback; no callback here.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard.summary import custom_scalars, hparams

from qlit.metrics import LM_METRICS, MetricSpec

#: The custom-scalars category the layout opens on.
STUDY_CATEGORY = "study: loss, task metric, memory, tokens/s, latency"

#: The HPARAMS table's columns: TensorBoard ticks a record's first five columns by name and its first five metrics,
#: so the record lists the five that say what was trained (its other values, such as gradient checkpointing and the
#: parameter counts, stay in the run's record for ``qlit compare`` and in ``hparams.yaml``), and its metrics open on
#: loss, the task's main metric, peak memory, tokens/s and latency.
TABLE_COLUMNS = ("adapter", "compute_dtype", "double_quant", "pretrained", "quantization")


def task_specs(pl_module: LightningModule) -> list[MetricSpec]:
    """The module's task metrics that a comparison shows, the main one first, named as logged (``val/<name>``)."""
    task = getattr(pl_module, "task", None)
    specs = [s for s in getattr(task, "metric_specs", ()) if s.aggregate]
    return [dataclasses.replace(s, name=f"val/{s.name}") for s in sorted(specs, key=_minor)]


def cost_specs(trainer: Trainer) -> list[MetricSpec]:
    """The callbacks' study costs (``MetricSpec.study``) this run logs: ``gpu/`` or ``cpu/`` memory by its device."""
    other = "cpu/" if trainer.strategy.root_device.type == "cuda" else "gpu/"
    declared = (s for cb in trainer.callbacks for s in getattr(cb, "metric_specs", ()) if s.study)
    return [s for s in declared if not s.name.startswith(other)]


def study_tags(trainer: Trainer, pl_module: LightningModule) -> list[str]:
    """The tags a study compares runs by, each once: validation loss, the task's main metric, the costs (peak memory,
    tokens/s, latency, wall time), then perplexity and the task's other metrics."""
    loss, *others = [s.name for s in LM_METRICS if s.name.startswith("val/")]
    main, rest = [], []
    for spec in task_specs(pl_module):
        (main if spec.main else rest).append(spec.name)
    return list(dict.fromkeys([loss, *main, *(s.name for s in cost_specs(trainer)), *others, *rest]))


def layout(trainer: Trainer, pl_module: LightningModule) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: one open category with train and validation loss in one chart, the task's metrics,
    perplexity and one chart per cost unit (memory, tokens/s, latency, wall time), in that order."""
    loss = [s.name for s in LM_METRICS if s.name.endswith("/loss")]
    charts: dict[str, list[Any]] = {f"loss: {', '.join(loss)}": ["Multiline", [_exact(n) for n in loss]]}
    others = [s.name for s in LM_METRICS if s.name.startswith("val/") and s.name not in loss]
    for name in [*(s.name for s in task_specs(pl_module)), *others]:
        charts[name] = ["Multiline", [_exact(name)]]
    by_unit: dict[str, list[str]] = {}
    for spec in cost_specs(trainer):
        by_unit.setdefault(spec.unit, []).append(spec.name)
    for unit, names in by_unit.items():
        charts[f"{', '.join(names)} ({unit})"] = ["Multiline", [_exact(n) for n in names]]
    return {STUDY_CATEGORY: charts}


def write_records(
    logger: TensorBoardLogger, params: Mapping[str, Any], metric_tags: Sequence[str], charts: dict[str, Any]
) -> None:
    """Write the run's HPARAMS record (``params``, with ``metric_tags`` as its metrics) and its layout.

    TensorBoard's HPARAMS table reads each linked metric's value from the run's scalar of that tag (its last value),
    so the record is written once, before training, and its metric columns fill in as the run logs them. Lightning's
    ``log_hyperparams`` would also log a placeholder value for each metric (``hp_metric`` = -1 without any): only
    its ``hparams.yaml`` is used here.
    """
    logger.log_hyperparams(dict(params), metrics={})  # hparams.yaml only: an empty dict writes no TensorBoard record
    # Lightning's own record after on_fit_start (the module's hyperparameters) would add hp_metric = -1: TensorBoard
    # shows a run's first record anyway, and the -1 would sit among the metrics.
    logger._default_hp_metric = False
    # Flattened and made plain as Lightning's log_hyperparams does (a value TensorBoard cannot hold becomes text);
    # a flag reads true/false rather than 1.0000/0.0000.
    flat = logger._sanitize_params(_flatten_dict(_convert_params(dict(params))))
    flat = {k: str(v).lower() if isinstance(v, bool) else v for k, v in flat.items()}
    metrics = {tag: 0.0 for tag in metric_tags}  # values unused: a record names its metrics
    columns = {k: v for k, v in flat.items() if k in TABLE_COLUMNS} or flat
    experiment, _, _ = hparams(columns, metrics)
    _, start, _ = hparams(flat, metrics)  # every value, for qlit compare (float64 parameter counts)
    writer = logger.experiment._get_file_writer()  # where Lightning writes its own hparams summaries
    writer.add_summary(experiment)
    writer.add_summary(start)
    writer.add_summary(custom_scalars(charts))
    writer.flush()


def write_end(logger: TensorBoardLogger, status: str) -> None:
    """Close the run's HPARAMS session with ``status``: ``success``, ``failure``, else (an interruption) unknown."""
    value = {"success": api_pb2.STATUS_SUCCESS, "failure": api_pb2.STATUS_FAILURE}.get(status, api_pb2.STATUS_UNKNOWN)
    end = plugin_data_pb2.SessionEndInfo(status=value, end_time_secs=time.time())
    content = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=end))
    writer = logger.experiment._get_file_writer()
    writer.add_summary(Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=content)]))
    writer.flush()


def _exact(tag: str) -> str:
    """A custom-scalars chart selects tags by regular expression: exactly ``tag``."""
    return "^" + re.escape(tag) + "$"


def _minor(spec: MetricSpec) -> bool:
    return not spec.main
