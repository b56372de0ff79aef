"""What ``qlit predict`` answered, written as JSON Lines (and, optionally, as alpaca_eval's model-outputs file)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from qlit.distributed import gather_objects


class PredictionWriter(BasePredictionWriter):
    """Writes one JSON line per predicted row: ``row_index``, ``instruction``, ``prompt``, ``generation``,
    ``prediction`` (the task's parse of the generation, e.g. a price or a label word) and ``reference``.

    Rows are collected on every device and gathered to rank 0 at the end of ``predict``, which writes a single file
    in the order of the split (by ``row_index``), each row once: the output does not depend on the number of devices.

    With ``alpaca_eval: true`` it also writes the JSON list that the ``alpaca_eval`` package reads as model outputs:
    ``[{"instruction": <the user's prompt, without any chat template>, "output": <generation>, "generator": ...}]``.

    Args:
        path: the JSON Lines file; ``None`` writes ``predictions.jsonl`` in the run's log directory
            (``trainer.log_dir``, else ``trainer.default_root_dir``).
        alpaca_eval: also write the alpaca_eval model-outputs file.
        alpaca_eval_path: where; ``None`` writes ``alpaca_eval_outputs.json`` beside the JSON Lines file.
        generator: the ``generator`` name in the alpaca_eval file; ``None`` uses the name of the run that trained
            the model (``<name>/version_N`` of its checkpoint or adapter), so two adapters of one base are told apart.
    """

    def __init__(
        self,
        path: str | None = None,
        alpaca_eval: bool = False,
        alpaca_eval_path: str | None = None,
        generator: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.alpaca_eval = alpaca_eval
        self.alpaca_eval_path = alpaca_eval_path
        self.generator = generator
        self._rows: list[dict[str, Any]] = []
        #: Files written by the last ``predict`` (rank 0), for tests and for the caller's log line.
        self.written: list[Path] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self._rows.extend(rows_of_batch(prediction, batch, batch_indices))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank takes part in the path broadcast (trainer.log_dir) and the gather; only rank 0 writes.
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        rows = merge_rows(gather_objects(self._rows, trainer.world_size))
        self._rows = []
        if not trainer.is_global_zero:
            return
        self.written = [path]
        write_jsonl(path, rows)
        if self.alpaca_eval:
            target = (
                Path(self.alpaca_eval_path) if self.alpaca_eval_path else path.with_name("alpaca_eval_outputs.json")
            )
            name = self.generator or trained_run_name(trainer, pl_module)
            write_alpaca_eval(target, rows, name)
            self.written.append(target)
        rank_zero_info(f"Predictions of {len(rows)} rows written to {', '.join(map(str, self.written))}")


def trained_run_name(trainer: Any, pl_module: Any) -> str:
    """``<name>/version_N`` of the run whose weights predict: its checkpoint's or adapter's run, else this run.

    alpaca_eval skips a ``generator`` it has evaluated already, so two adapters of one base must not share one.
    """
    if getattr(trainer, "ckpt_path", None):
        run = Path(trainer.ckpt_path).resolve().parent.parent  # <run>/checkpoints/<file>.ckpt
    elif getattr(pl_module, "adapter_path", None):
        run = Path(pl_module.adapter_path).resolve().parent  # <run>/adapter
    else:
        run = Path(trainer.log_dir or trainer.default_root_dir).resolve()
    return f"{run.parent.name}/{run.name}"


def rows_of_batch(
    prediction: Sequence[Mapping[str, Any]], batch: Mapping[str, Any], batch_indices: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """The module's per-row predictions with the batch's ``row_index`` and ``instruction`` added."""
    n = len(prediction)
    index = batch.get("row_index")
    index = index.tolist() if isinstance(index, torch.Tensor) else list(index) if index is not None else None
    if index is None:  # a batch without row ids: the sampler's dataset indices, else the arrival order
        index = list(batch_indices) if batch_indices is not None else [None] * n
    instruction = batch.get("instruction") or [None] * n
    return [
        {"row_index": i, "instruction": ins, **dict(p)}
        for i, ins, p in zip(index, instruction, prediction, strict=True)
    ]


def merge_rows(per_rank: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One list from every rank's rows: sorted by ``row_index``, each row once (samplers may repeat rows to even
    out the ranks)."""
    seen: set[int] = set()
    merged, unindexed = [], []
    for rows in per_rank:
        for row in rows:
            i = row.get("row_index")
            if i is None:
                unindexed.append(row)
            elif i not in seen:
                seen.add(i)
                merged.append(row)
    return sorted(merged, key=lambda r: r["row_index"]) + unindexed


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_plain(row), ensure_ascii=False) + "\n")


def write_alpaca_eval(path: Path, rows: Iterable[Mapping[str, Any]], generator: str) -> None:
    """alpaca_eval's model outputs: a JSON list of ``{instruction, output, generator}``."""
    outputs = [
        {"instruction": r.get("instruction") or "", "output": r["generation"], "generator": generator} for r in rows
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(outputs, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    """JSON-ready: tensors become numbers or lists, NaN and infinities become null."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
