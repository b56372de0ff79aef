"""The progress display of a ``qlit`` run: a live bar on a terminal, plain lines anywhere else (a log file, a pipe, CI).

Both show what the module logs with ``prog_bar=True``: the training loss, the validation loss and the metrics the
task declares (``val/accuracy`` for SST-2, ``val/f1`` for SQuAD, ...). Neither shows Lightning's ``v_num`` (the run's
version, which the run directory already names). :func:`progress_bar` picks one; the CLI uses it for every run whose
config names no progress bar of its own.
"""

from __future__ import annotations

import math
import sys
from time import perf_counter
from typing import Any, TextIO

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


def _shown_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in metrics.items() if name != "v_num"}


class _WithoutVersion:
    """A Lightning bar's metrics without ``v_num`` (a mix-in before the bar class)."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return _shown_metrics(super().get_metrics(trainer, pl_module))  # type: ignore[misc]


class TerminalProgressBar(_WithoutVersion, TQDMProgressBar):
    """Lightning's tqdm bar without the run's version number (``v_num``).

    Args:
        refresh_rate: redraw every N batches. A redraw reads the step's loss from the GPU, a host sync: GPU configs
            redraw every 10 steps.
        leave: keep each epoch's bar on the screen after it finishes.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)


class RichTerminalProgressBar(_WithoutVersion, RichProgressBar):
    """Lightning's rich bar (the Trainer's default where ``rich`` is installed) without ``v_num``.

    Args:
        refresh_rate: redraw every N batches.
        leave: keep each epoch's bar on the screen after it finishes.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)


class LineProgressBar(ProgressBar):
    """Progress as plain lines, for output that is not a terminal: a redrawn bar there is one endless line of
    carriage returns, or (rich's) a single frame at the end.

    One line after every validation pass, and one at most every ``interval_seconds`` of training in between, e.g.
    ``Epoch 2/3, step 40/60: train/loss 0.182, val/loss 0.101, val/accuracy 0.912 (9 s)``.

    Args:
        interval_seconds: the longest stretch of training without a line (``0``: a line after validation only).
        stream: where the lines go (``None``: standard output).
    """

    def __init__(self, interval_seconds: float = 30.0, stream: TextIO | None = None) -> None:
        super().__init__()
        self.interval_seconds = interval_seconds
        self.stream = stream
        self._enabled = True
        self._start = 0.0
        self._last_line = 0.0

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, file=self.stream or sys.stdout, flush=True, **kwargs)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return _shown_metrics(super().get_metrics(trainer, pl_module))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = self._last_line = perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.interval_seconds > 0 and perf_counter() - self._last_line >= self.interval_seconds:
            self._line(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._line(trainer, pl_module)

    def _line(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_line = perf_counter()
        if not self.is_enabled:
            return
        metrics = ", ".join(f"{name} {_number(value)}" for name, value in self.get_metrics(trainer, pl_module).items())
        self.print(f"{_position(trainer)}: {metrics or 'no metrics yet'} ({perf_counter() - self._start:.0f} s)")


def _position(trainer: Trainer) -> str:
    """``Epoch 2/3, step 40/60``: the epoch counted from 1, and the totals where the run has them."""
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    epoch = f"Epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs else "")
    total = trainer.estimated_stepping_batches
    step = f"step {trainer.global_step}" + (f"/{int(total)}" if math.isfinite(total) else "")
    return f"{epoch}, {step}"


def _number(value: Any) -> str:
    value = float(value)
    return f"{value:.3f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3g}"


def progress_bar(stream: TextIO | None = None, refresh_rate: int = 1) -> ProgressBar:
    """The progress display for ``stream`` (standard output by default): a live bar on a terminal (rich's where it is
    installed, as Lightning picks) redrawn every ``refresh_rate`` batches, plain lines elsewhere."""
    stream = stream or sys.stdout
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return LineProgressBar(stream=None if stream is sys.stdout else stream)
    bar = RichTerminalProgressBar if _RICH_AVAILABLE else TerminalProgressBar
    return bar(refresh_rate=refresh_rate)


class AutoProgressBar(ProgressBar):
    """The display :func:`progress_bar` picks, for a config that sets how often the bar redraws: a live bar on a
    terminal, plain lines elsewhere (not a redrawn bar's carriage returns in a log file).

    ``- class_path: qlit.callbacks.AutoProgressBar`` with ``init_args: {refresh_rate: 10}`` in ``trainer.callbacks``.

    Args:
        refresh_rate: a terminal bar redraws every N batches. Each redraw reads the step's loss from the GPU, a host
            sync: GPU configs redraw every 10 steps. The plain lines read it once per line.
    """

    def __new__(cls, refresh_rate: int = 1) -> ProgressBar:  # type: ignore[misc]
        return progress_bar(refresh_rate=max(1, int(refresh_rate)))

    def __init__(self, refresh_rate: int = 1) -> None:  # the signature the config is checked against
        super().__init__()
