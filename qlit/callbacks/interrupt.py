"""A checkpoint on SIGTERM or Ctrl+C: finish the running optimizer step, write ``last.ckpt``, stop."""

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
    """On SIGTERM (a scheduler's pre-emption) or a first Ctrl+C, finish the running optimizer step (every micro-batch
    it accumulates), write ``last.ckpt`` and stop; ``--ckpt_path <that file>`` resumes exactly where the run stopped.
    A second Ctrl+C aborts.

    Lightning alone stops after the running *batch* and writes nothing: under gradient accumulation that drops the
    gradient accumulated so far, and a stop after an epoch's last batch leaves loop counters that Lightning resumes
    in the wrong place (one batch of the next epoch, then the epoch after). So the request is held until a batch
    ends an optimizer step; the checkpoint is written in that batch's ``on_train_batch_end``, where
    ``ModelCheckpoint`` writes its step checkpoints, and only then is Lightning told to stop. A validation under way
    is finished first. Under several processes the ranks agree at every optimizer step, so all stop after the same
    one.

    Args:
        filename: checkpoint file name, written into the ``ModelCheckpoint`` directory.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self._previous_sigint: Any = None
        self._previous_sigterm: Any = None
        self._trainer: pl.Trainer | None = None
        self._requested = False
        self._step_at_batch_start = 0
        self._written_at: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        self._requested = False
        self._written_at = None
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trainer is None:
            return
        # Lightning installs its SIGTERM handler (stop after the running batch) just before training: take it over,
        # and take over a SIGTERM it received in between.
        connector = trainer._signal_connector
        if connector.received_sigterm:
            connector.received_sigterm = False
            self._requested = True
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._previous_sigterm is not None:
            # Lightning's own teardown may have restored the handler it found already.
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._requested:
            rank_zero_info("\nSIGTERM: finishing this optimizer step and writing a checkpoint ...")
        self._requested = True

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._requested:
            raise KeyboardInterrupt
        rank_zero_info(
            "\nInterrupted: finishing this optimizer step and writing a checkpoint (Ctrl+C again to abort) ..."
        )
        self._requested = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._trainer is None or trainer.global_step == self._step_at_batch_start:
            return  # a micro-batch of an unfinished accumulation: its gradient is in no checkpoint
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        self._requested = True
        self._write(trainer)
        trainer._signal_connector.received_sigterm = True  # Lightning stops at the end of this batch

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            if self._written_at != trainer.global_step:
                self._write(trainer)
        self._restore_handlers()

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / self.filename
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / self.filename

    def _write(self, trainer: pl.Trainer) -> None:
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self._written_at = trainer.global_step
        rank_zero_info(f"Checkpoint at step {trainer.global_step} written to {path}: resume with --ckpt_path {path}")
