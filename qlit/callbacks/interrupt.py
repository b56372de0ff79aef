"""A checkpoint on SIGTERM or Ctrl+C: finish the running batch, write ``last.ckpt``, stop."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class InterruptCheckpoint(Callback):
    """On SIGTERM (a scheduler's pre-emption) or a first Ctrl+C, finish the current batch, write ``last.ckpt``
    and stop; ``--ckpt_path <that file>`` resumes with at most the interrupted batch lost. A second Ctrl+C aborts.

    Lightning already turns SIGTERM into a stop after the running batch; this callback makes Ctrl+C do the same
    and writes the checkpoint that Lightning alone would not.

    Args:
        filename: checkpoint file name, written into the ``ModelCheckpoint`` directory.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self._previous_sigint: Any = None
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        connector = self._trainer._signal_connector if self._trainer is not None else None
        if connector is None or connector.received_sigterm:
            raise KeyboardInterrupt
        rank_zero_info("\nInterrupted: finishing this batch and writing a checkpoint (Ctrl+C again to abort) ...")
        connector.received_sigterm = True

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / self.filename
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / self.filename

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"Checkpoint at step {trainer.global_step} written to {path}: resume with --ckpt_path {path}")
