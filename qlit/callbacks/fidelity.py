"""How faithful the stored base is, before any training: its weights and its validation loss against the unquantized
original."""

from __future__ import annotations

import dataclasses
import gc
import math
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from qlit.batch import IGNORE_INDEX
from qlit.callbacks._common import log_to_loggers, wrapped_model
from qlit.errors import QlitError
from qlit.metrics import MetricSpec


class QuantizationFidelity(Callback):
    """What quantizing the base cost before training starts, measured against the same checkpoint loaded as it is.

    At fit start (rank 0, once per run) the callback loads the unquantized original next to the quantized base and
    logs, at step 0:

    * ``fidelity/weight_rel_error``: the projections' relative reconstruction error ``‖W − Ŵ‖ / ‖W‖`` over all the
      layers the backend quantized (Frobenius norms summed over layers), ``Ŵ`` being the weight the stored base
      computes with (its backend's ``dequantized_weight``); ``fidelity/weight_rel_error_max``: the worst layer's.
    * ``fidelity/base_val_loss`` and ``fidelity/original_val_loss``: the token-weighted validation loss of the stored
      base (its adapter switched off) and of the original over the same first ``batches`` validation batches;
      ``fidelity/perplexity_ratio``: ``exp`` of their difference, the factor quantization multiplies perplexity by.

    Off by default (``--fidelity.enabled true``, or a study's ``set``): it loads a second copy of the base, in the
    compute dtype, which costs the time of a model load and, for that moment, its memory (freed before training, so
    the peak memory of training is not affected). Nothing is logged for an unquantized base, nor, beyond a note, for
    a checkpoint stored quantized unless ``original`` names the model it was made from.

    Args:
        enabled: measure at fit start.
        batches: validation batches the two losses are taken over (0: the weights only).
        original: the unquantized model to measure against, where it is not the checkpoint itself: the model a
            pre-quantized (GPTQ, AWQ) checkpoint was made from, as a hub id, a directory or a ``qlit-tiny/`` name.
    """

    metric_specs = (
        MetricSpec("fidelity/weight_rel_error", "ratio", higher_is_better=False, aggregate="last"),
        MetricSpec("fidelity/weight_rel_error_max", "ratio", higher_is_better=False, aggregate=None),
        MetricSpec("fidelity/base_val_loss", "nats/token", higher_is_better=False, aggregate="last"),
        MetricSpec("fidelity/original_val_loss", "nats/token", higher_is_better=False, aggregate=None),
        MetricSpec("fidelity/perplexity_ratio", "ratio", higher_is_better=False, aggregate="last"),
    )

    def __init__(self, enabled: bool = False, batches: int = 8, original: str | None = None) -> None:
        super().__init__()
        if batches < 0:
            raise QlitError(f"fidelity.batches must be 0 or more (0: the weights only), got {batches}.")
        self.enabled = enabled
        if enabled:  # a measured run links its fidelity in TensorBoard's HPARAMS table, beside the costs
            self.metric_specs = tuple(
                dataclasses.replace(s, study=True) if s.aggregate else s for s in self.metric_specs
            )
        self.batches = batches
        self.original = original
        self.metrics: dict[str, float] = {}
        self._measured = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        quantization = getattr(pl_module, "quantization", None)
        if not self.enabled or self._measured or quantization is None or not trainer.is_global_zero:
            return
        backend = quantization.backend
        if not backend.quantized:
            return
        self._measured = True
        original = pl_module.load_original(self.original)
        if original is None:
            rank_zero_info(
                f"Fidelity: the {quantization.mode} checkpoint is stored quantized, with no original to measure it "
                "against: no fidelity metrics (name the model it was made from in fidelity.original)."
            )
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                self.metrics = _weight_errors(backend, wrapped_model(pl_module), original)
                self.metrics.update(self._losses(trainer, pl_module, original))
        finally:
            pl_module.train(was_training)
            del original
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        log_to_loggers(trainer, self.metrics, step=0)
        rank_zero_info(_line(quantization.mode, self.metrics))

    def _losses(self, trainer: Trainer, pl_module: LightningModule, original: torch.nn.Module) -> dict[str, float]:
        datamodule = trainer.datamodule
        if not self.batches or datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return {}
        base = quantized = tokens = 0.0
        adapter_off = getattr(wrapped_model(pl_module), "disable_adapter", None)
        for i, batch in enumerate(datamodule.val_dataloader()):
            if i == self.batches:
                break
            batch = move_data_to_device(batch, pl_module.device)
            n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if adapter_off is not None:
                with adapter_off():
                    quantized += float(pl_module(batch).loss) * n
            else:
                quantized += float(pl_module(batch).loss) * n
            base += float(pl_module(batch, model=original).loss) * n
            tokens += n
        if not tokens:
            return {}
        q, o = quantized / tokens, base / tokens
        return {
            "fidelity/base_val_loss": q,
            "fidelity/original_val_loss": o,
            "fidelity/perplexity_ratio": math.exp(q - o),
        }


def _weight_errors(backend: Any, model: torch.nn.Module, original: torch.nn.Module) -> dict[str, float]:
    """Relative reconstruction error of every layer ``backend`` quantized in ``model`` against ``original``'s."""
    originals = dict(original.named_modules())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    error = norm = worst = 0.0
    layers = 0
    for name, module in base.named_modules():
        stored = backend.dequantized_weight(module)
        if stored is None:
            continue
        reference = originals.get(name.replace(".base_layer", ""))
        weight = getattr(reference, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(stored.shape):
            continue
        w = weight.detach().float()
        diff = float((w - stored.detach().float().to(w.device)).pow(2).sum())
        size = float(w.pow(2).sum())
        error, norm, layers = error + diff, norm + size, layers + 1
        worst = max(worst, math.sqrt(diff / size) if size else 0.0)
    if not layers:
        return {}
    return {"fidelity/weight_rel_error": math.sqrt(error / norm), "fidelity/weight_rel_error_max": worst}


def _line(mode: str, metrics: dict[str, float]) -> str:
    parts = []
    if "fidelity/weight_rel_error" in metrics:
        parts.append(
            f"weights' relative error {metrics['fidelity/weight_rel_error']:.4f} "
            f"(worst layer {metrics['fidelity/weight_rel_error_max']:.4f})"
        )
    if "fidelity/base_val_loss" in metrics:
        parts.append(
            f"validation loss {metrics['fidelity/base_val_loss']:.4f} against "
            f"{metrics['fidelity/original_val_loss']:.4f} unquantized "
            f"(perplexity x{metrics['fidelity/perplexity_ratio']:.4f})"
        )
    return f"Fidelity of the {mode} base before training: {'; '.join(parts) or 'nothing to measure'}."
