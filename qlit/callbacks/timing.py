"""Wall time of a fit, and the time it takes to reach the first optimizer step (model load and quantization)."""

from __future__ import annotations

from time import perf_counter

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from qlit.callbacks._common import log_to_loggers, optimizer_step_done, synchronize
from qlit.metrics import MetricSpec


class TrainingTimeMonitor(Callback):
    """Log how long a fit takes, and how much of it passes before training proper starts.

    The clock starts in ``setup``, the earliest callback hook of a fit and the one before ``configure_model`` loads
    and quantizes the model. ``time/setup_seconds`` runs to ``on_fit_start`` (model load, quantization, adapters,
    moving to the device); ``time/first_step_seconds`` to the end of the first optimizer step (the set-up plus data
    loading, sanity-check validation and the first step itself, synchronised once so its device work is counted);
    ``time/fit_seconds`` to ``on_fit_end``. Under gradient accumulation the first step ends with its last
    micro-batch. Logged from rank 0; the fit time is also printed in one info line.

    Args:
        log_setup_time: Also log ``time/setup_seconds``.
    """

    metric_specs = (
        MetricSpec("time/setup_seconds", "s", higher_is_better=False, aggregate=None),
        MetricSpec("time/first_step_seconds", "s", higher_is_better=False, aggregate=None),
        MetricSpec("time/fit_seconds", "s", higher_is_better=False, study=True),
    )

    def __init__(self, log_setup_time: bool = True) -> None:
        super().__init__()
        self.log_setup_time = log_setup_time
        self._t0: float | None = None
        self._setup_seconds: float | None = None
        self._first_done = False
        self._start_step = 0
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._t0 = perf_counter()
            self._setup_seconds = None
            self._first_done = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._t0 is not None:
            self._setup_seconds = perf_counter() - self._t0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if self._first_done or self._t0 is None or not optimizer_step_done(trainer, self._start_step):
            return
        self._first_done = True
        synchronize(trainer.strategy.root_device)  # once per fit
        metrics = {"time/first_step_seconds": perf_counter() - self._t0}
        if self.log_setup_time and self._setup_seconds is not None:
            metrics["time/setup_seconds"] = self._setup_seconds
        self.last_metrics.update(metrics)
        log_to_loggers(trainer, metrics)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs before the loggers are finalized (that happens after the teardown hooks).
        if self._t0 is None:
            return
        seconds = perf_counter() - self._t0
        self._t0 = None
        self.last_metrics["time/fit_seconds"] = seconds
        log_to_loggers(trainer, {"time/fit_seconds": seconds})
        self._say(seconds)

    @rank_zero_only
    def _say(self, seconds: float) -> None:
        first = self.last_metrics.get("time/first_step_seconds")
        first_text = f", first optimizer step after {first:.1f} s" if first is not None else ""
        rank_zero_info(f"Fit took {seconds:.1f} s{first_text}.")
