"""Trainable and total parameter counts, and the bytes the weights occupy, logged once at fit start."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from qlit.callbacks import _board
from qlit.callbacks._common import GIB, log_to_loggers, wrapped_model
from qlit.metrics import MetricSpec
from qlit.models.bitnet import PackedBitLinear, bitnet_weight_bytes
from qlit.models.quant.base import PackedLayer


def logical_numel(param: torch.Tensor) -> int:
    """Number of parameters a tensor stands for, counting a packed bitsandbytes 4-bit weight by its logical shape.

    A ``Params4bit`` stores two 4-bit values per byte, so its ``numel`` is half the weight's (or less with a wider
    ``quant_storage``); the logical shape is kept in its ``quant_state``. 8-bit ``Int8Params`` hold one byte per
    value, so their ``numel`` is already right.
    """
    quant_state = getattr(param, "quant_state", None)
    if type(param).__name__ == "Params4bit" and quant_state is not None and quant_state.shape is not None:
        return math.prod(quant_state.shape)
    return param.numel()


def count_parameters(model: torch.nn.Module, packed: Sequence[PackedLayer] = ()) -> tuple[int, int]:
    """``(trainable, total)`` parameters of ``model``, shared parameters once; agrees with peft's
    ``PeftModel.get_nb_trainable_parameters()``, except that a packed BitNet layer's frozen ternary weight, a buffer
    peft does not see, counts as the ``out × in`` parameters it stands for (so QLoRA + BitNet reports the model's
    size, not its embeddings'), and so does each of ``packed`` (its backend's :meth:`QuantBackend.packed_layers
    <qlit.models.quant.base.QuantBackend.packed_layers>`) instead of its packed tensors.
    """
    skipped = {id(t) for layer in packed for t in layer.packed}
    trainable = total = 0
    for param in model.parameters():
        if id(param) in skipped:
            continue
        n = logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedBitLinear))
    return trainable, total + sum(layer.numel for layer in packed)


def weight_bytes(model: torch.nn.Module, packed: Sequence[PackedLayer] = ()) -> int:
    """Bytes of storage held by ``model``'s parameters and buffers, plus bitsandbytes' 4-bit quantization constants
    and what the layers of ``packed`` keep outside their parameters and buffers (HQQ's scales and zero points).

    Written here rather than using transformers' ``get_memory_footprint`` because that one counts a tied tensor
    once per reference and leaves out the per-block ``absmax`` scales of 4-bit weights (about 1/8 of their bytes).
    """
    seen: set[int] = set()
    nbytes = 0

    def add(t: Any) -> None:
        nonlocal nbytes
        if is_traceable_wrapper_subclass(t):  # a tensor subclass (torchao's) holds its data in plain inner tensors
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            nbytes += t.numel() * t.element_size()

    for tensor in (*model.parameters(), *model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None and hasattr(state, "absmax"):  # 4-bit state; nested quantization chains a state2
            add(state.absmax)
            add(getattr(state, "code", None))
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    for layer in packed:
        for tensor in layer.hidden:
            add(tensor)
    return nbytes


class TrainableParamsMonitor(Callback):
    """Log the trainable and total parameter counts, their ratio and the weights' size once, at fit start.

    Counted over the wrapped model (the module's ``.model``: the Hugging Face or peft model), with 4-bit weights at
    their logical size, so the numbers match ``PeftModel.get_nb_trainable_parameters()``. They go to the loggers as
    scalars (``params/trainable``, ``params/total``, ``params/trainable_ratio``, ``params/weight_gib``) and into the
    hyperparameter table, so runs can be compared by them.

    This callback writes the run's one hyperparameter record (TensorBoard keeps the first record of a run and
    ignores later ones): the datamodule's and the module's hyperparameters, a qlit module's
    ``study_hparams()`` (model, quantization, adapter, ...) and the numbers counted here. In TensorBoard the record
    links the metrics a study compares runs by (``val/loss``, ``val/perplexity``, the task's metrics, then the
    callbacks' costs declared with ``study=True``: peak memory, tokens/s, latency, wall time), whose values the
    HPARAMS table takes from the run's scalars, and the run gets a custom-scalars layout that opens on the same
    numbers (:mod:`qlit.callbacks._board`). The session is closed at the end of the fit with its status.

    Args:
        log_hparams: Also add the numbers to the loggers' hyperparameters (TensorBoard's HPARAMS table).
    """

    metric_specs = (
        MetricSpec("params/trainable_ratio", "ratio", aggregate="last"),
        MetricSpec("params/trainable", "parameters", aggregate="last", integer=True),
        MetricSpec("params/weight_gib", "GiB", higher_is_better=False, aggregate="last"),
        MetricSpec("params/total", "parameters", aggregate="last", integer=True),
        MetricSpec("params/bitnet_weight_gib", "GiB", higher_is_better=False, aggregate=None),
        MetricSpec("params/bitnet_bf16_gib", "GiB", aggregate=None),
    )

    def __init__(self, log_hparams: bool = True) -> None:
        super().__init__()
        self.log_hparams = log_hparams
        self.metrics: dict[str, float] = {}
        # TensorBoard loggers whose HPARAMS session this fit opened (rank 0), closed at its end; the run directories
        # that have their record.
        self._sessions: list[TensorBoardLogger] = []
        self._recorded: set[str] = set()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After configure_model and the strategy's set-up, so the model is loaded, quantized and wrapped by peft.
        model = wrapped_model(pl_module)
        quantization = getattr(pl_module, "quantization", None)  # a QLitModule's spec: its backend knows its layers
        packed = quantization.backend.packed_layers(model) if quantization is not None else []
        trainable, total = count_parameters(model, packed)
        self.metrics = {
            "params/trainable": float(trainable),
            "params/total": float(total),
            "params/trainable_ratio": trainable / total if total else 0.0,
            "params/weight_gib": weight_bytes(model, packed) / GIB,
        }
        bitnet = bitnet_weight_bytes(model)
        if bitnet["layers"]:
            self.metrics["params/bitnet_weight_gib"] = bitnet["resident_bytes"] / GIB
            self.metrics["params/bitnet_bf16_gib"] = bitnet["bf16_bytes"] / GIB
        self._log(trainer, pl_module)

    @rank_zero_only
    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        m = self.metrics
        rank_zero_info(
            f"Trainable parameters: {int(m['params/trainable']):,} of {int(m['params/total']):,} "
            f"({100 * m['params/trainable_ratio']:.4f} %); weights occupy {m['params/weight_gib']:.3f} GiB"
        )
        log_to_loggers(trainer, m)
        hparams: dict[str, Any] = {}
        # This hook runs before Lightning records the module's hyperparameters (after every on_fit_start), and
        # TensorBoard shows only a run's first record: so the one record holds them all.
        if trainer.enable_autolog_hparams and getattr(pl_module, "_log_hyperparams", True):
            if trainer.datamodule is not None and getattr(trainer.datamodule, "_log_hyperparams", True):
                hparams.update(trainer.datamodule.hparams_initial)
            hparams.update(pl_module.hparams_initial)
            hparams.pop("_class_path", None)  # LightningCLI's internal key, which Lightning does not log either
        study = getattr(pl_module, "study_hparams", None)  # QLitModule: model, quantization, adapter, ...
        if callable(study):
            hparams.update(study())
        if self.log_hparams:
            hparams.update(m)
        if not hparams:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(hparams)
            elif logger.log_dir not in self._recorded:  # a second fit into the same run adds no second record
                _board.write_records(
                    logger, hparams, _board.study_tags(trainer, pl_module), _board.layout(trainer, pl_module)
                )
                self._recorded.add(logger.log_dir)
                self._sessions.append(logger)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end("interrupted" if trainer.interrupted else "success")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._end("interrupted" if isinstance(exception, SIGTERMException | KeyboardInterrupt) else "failure")

    def _end(self, status: str) -> None:
        sessions, self._sessions = self._sessions, []
        for logger in sessions:
            _board.write_end(logger, status)
