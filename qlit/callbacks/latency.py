"""Generation latency (mean, p95 per sample) and generated tokens/s during validation, test and predict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from qlit.callbacks._common import log_to_loggers
from qlit.distributed import gather_objects
from qlit.metrics import MetricSpec

#: Key of an evaluation step's output dict that holds its generation record (``seconds``, ``samples``, ``new_tokens``).
GENERATION_KEY = "generation"


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an ascending list."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class InferenceLatencyMonitor(Callback):
    """Summarise the ``generate`` calls of validation, test and predict steps at the end of each of their epochs.

    A step that generated text returns a dict holding ``"generation": {"seconds", "samples", "new_tokens"}``: the
    wall time of one batched, synchronised ``generate``, the sequences it produced and the tokens it generated. Every
    sample of a batch waits for the whole batch, so each sample's latency is its batch's time; mean and p95 are over
    samples, gathered from all ranks. Generated tokens/s is the tokens generated over the time spent generating,
    summed over ranks (they generate in parallel).

    Validation and test results go through ``LightningModule.log`` as ``val/...`` and ``test/...``, so they show in
    ``trainer.validate``/``trainer.test`` results and can be monitored. Predict allows no ``self.log``: its numbers
    go straight to the loggers (``predict/...``, at the current global step) and into one info line on the console,
    since a user running predict looks at one or the other. Sanity-check validation is skipped (warm-up).

    Metrics, for ``<stage>`` in ``val``, ``test``, ``predict``: ``<stage>/latency_ms_mean``, ``<stage>/latency_ms_p95``
    and ``<stage>/gen_tokens_per_sec``.
    """

    metric_specs = (
        MetricSpec("val/latency_ms_mean", "ms", higher_is_better=False),
        MetricSpec("val/latency_ms_p95", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("val/gen_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
        MetricSpec("test/latency_ms_mean", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("test/latency_ms_p95", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("test/gen_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
        MetricSpec("predict/latency_ms_mean", "ms", higher_is_better=False),
        MetricSpec("predict/latency_ms_p95", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("predict/gen_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
    )

    def __init__(self) -> None:
        super().__init__()
        # One (seconds, samples, new_tokens) row per generate call of the running epoch.
        self._records: list[tuple[float, int, int]] = []

    # ---------------------------------------------------------------- recording
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._records = []

    on_test_epoch_start = on_predict_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """The batch end of validation, test and predict: record the step's ``generate`` call."""
        if trainer.sanity_checking:
            return
        if trainer.predicting and not (isinstance(outputs, Mapping) and GENERATION_KEY in outputs):
            # A predict step returns its rows (one per input), so QLitModule leaves the timing of its last generate
            # call on the module instead; taken once, so a step that did not generate records nothing.
            outputs = {GENERATION_KEY: getattr(pl_module, "last_generation", None)}
            pl_module.last_generation = None
        self._record(outputs)

    on_test_batch_end = on_predict_batch_end = on_validation_batch_end

    def _record(self, outputs: Any) -> None:
        gen = outputs.get(GENERATION_KEY) if isinstance(outputs, Mapping) else None
        if not isinstance(gen, Mapping):
            return
        seconds, samples = float(gen["seconds"]), int(gen["samples"])
        if samples > 0:
            self._records.append((seconds, samples, int(gen.get("new_tokens", 0))))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_epoch(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = self.summarise(trainer, "predict")
        if metrics and trainer.is_global_zero:
            log_to_loggers(trainer, metrics)
            rank_zero_info(
                f"Generation: {metrics['predict/latency_ms_mean']:.1f} ms mean, "
                f"{metrics['predict/latency_ms_p95']:.1f} ms p95 per sample, "
                f"{metrics['predict/gen_tokens_per_sec']:.1f} generated tokens/s"
            )

    # ---------------------------------------------------------------- summary
    def _log_epoch(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Every rank holds the same gathered summary; sync_dist (a mean of equal values) only keeps Lightning from
        # warning about unsynchronised epoch-level logging.
        for name, value in self.summarise(trainer, stage).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)

    def summarise(self, trainer: Trainer, stage: str) -> dict[str, float]:
        """The running epoch's metrics over all ranks (a collective call: every rank must make it)."""
        gathered = gather_objects(self._records, trainer.world_size)
        latencies = sorted(seconds for rank in gathered for seconds, samples, _ in rank for _ in range(samples))
        if not latencies:
            return {}
        # Ranks generate concurrently: their rates add up.
        rate = sum(
            sum(tokens for *_, tokens in rank) / secs
            for rank in gathered
            if (secs := sum(seconds for seconds, *_ in rank)) > 0
        )
        return {
            f"{stage}/latency_ms_mean": 1000.0 * sum(latencies) / len(latencies),
            f"{stage}/latency_ms_p95": 1000.0 * _percentile(latencies, 95.0),
            f"{stage}/gen_tokens_per_sec": rate,
        }
