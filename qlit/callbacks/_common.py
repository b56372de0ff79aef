"""Small helpers the qlit callbacks share; no callback lives here."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only

GIB = float(2**30)


@rank_zero_only
def log_to_loggers(trainer: Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Write ``metrics`` to every logger of ``trainer`` from rank 0, at ``step`` (default: the global step).

    The callbacks log through the loggers rather than ``LightningModule.log`` so that their own ``every N steps``
    options decide the cadence (``self.log`` would follow the trainer's ``log_every_n_steps``) and so that they can
    log from hooks where ``self.log`` is not allowed (fit start/end, predict).
    """
    if not metrics:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def wrapped_model(pl_module: LightningModule) -> torch.nn.Module:
    """The Hugging Face / peft model a qlit module wraps (its ``.model``), or the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, torch.nn.Module) else pl_module


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so that a host timestamp taken next covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_step_done(trainer: Trainer, last_step: int) -> bool:
    """Whether the batch that just ended completed an optimizer step (the global step moved past ``last_step``).

    Under gradient accumulation only the last micro-batch of a step does; reading the global step avoids Lightning's
    private ``_should_accumulate`` and also holds under manual optimization.
    """
    return trainer.global_step != last_step
