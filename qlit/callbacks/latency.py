"""Generation latency (mean, p95 per sample) and generated tokens/s: a fixed probe in validation and test, and the
generate calls of predict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from time import perf_counter
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from qlit.callbacks._common import log_to_loggers, synchronize, wrapped_model
from qlit.distributed import gather_objects
from qlit.errors import QlitError
from qlit.metrics import MetricSpec

#: Key of a predict step's output dict that holds its generation record (``seconds``, ``samples``, ``new_tokens``).
GENERATION_KEY = "generation"


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an ascending list."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class InferenceLatencyMonitor(Callback):
    """Per-sample generation latency and generated tokens/s, measured the same way for every run.

    **Validation and test: a fixed probe.** At the end of a validation or test pass the model generates for the
    first ``probe_samples`` prompts of the split (by ``row_index``: the same rows on every pass, for every technique
    and any number of devices), one prompt at a time, greedily, with the KV cache and exactly ``probe_new_tokens``
    new tokens (end-of-sequence is suppressed until then), after one untimed warm-up call. A sample's latency is
    its ``generate`` call's wall time (prefill and every decoding step, synchronised); generated tokens/s is the
    probe's tokens over its time, summed over ranks. Every run so gets latency numbers, also where the task scores
    rather than generates (SST-2's label word, perplexity), and they compare across quantization and adapter
    techniques: same prompts, same lengths, one at a time. Latency does not change as the weights train, so a fit
    probes once, at its first validation pass (the sanity check excluded); ``validate`` and ``test`` probe every
    pass. The probe needs the prompts qlit's batches carry (``prompt_input_ids``, ``prompt_attention_mask``).

    **Predict: the real calls.** A predict step's ``generate`` (batched, stopping at end-of-sequence) is timed by
    the module; every sample of a batch waits for the whole batch, so each sample's latency is its batch's time.
    Predict allows no ``self.log``: its numbers go straight to the loggers (``predict/...``, at the current global
    step) and into one info line on the console.

    Metrics, for ``<stage>`` in ``val``, ``test``, ``predict``: ``<stage>/latency_ms_mean``, ``<stage>/latency_ms_p95``
    and ``<stage>/gen_tokens_per_sec``; validation and test ones go through ``LightningModule.log``, so they show in
    ``trainer.validate``/``trainer.test`` results.

    Args:
        probe_samples: prompts the probe generates for (0: no probe, and no validation or test latency).
        probe_new_tokens: tokens each probe prompt generates.
    """

    metric_specs = (
        MetricSpec("val/latency_ms_mean", "ms", higher_is_better=False, study=True),
        MetricSpec("val/latency_ms_p95", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("val/gen_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
        MetricSpec("test/latency_ms_mean", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("test/latency_ms_p95", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("test/gen_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
        MetricSpec("predict/latency_ms_mean", "ms", higher_is_better=False),
        MetricSpec("predict/latency_ms_p95", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("predict/gen_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
    )

    def __init__(self, probe_samples: int = 8, probe_new_tokens: int = 32) -> None:
        super().__init__()
        if probe_samples < 0:
            raise QlitError(f"latency.probe_samples must be 0 or more (0 turns the probe off), got {probe_samples}.")
        if probe_new_tokens < 1:
            raise QlitError(f"latency.probe_new_tokens must be 1 or more, got {probe_new_tokens}.")
        self.probe_samples = probe_samples
        self.probe_new_tokens = probe_new_tokens
        # One (seconds, samples, new_tokens) row per timed generate call of the running epoch.
        self._records: list[tuple[float, int, int]] = []
        # The probe's prompts met in the running pass on this rank: (row_index, prompt ids without padding).
        self._prompts: list[tuple[int, torch.Tensor]] = []
        self._rows_seen = 0
        self._probed_this_fit = False

    # ---------------------------------------------------------------- recording
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._probed_this_fit = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._records, self._prompts, self._rows_seen = [], [], 0

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
        """The batch end of validation and test: keep the probe's prompts."""
        if not trainer.sanity_checking and self._probes(trainer):
            self._collect(batch)

    on_test_batch_end = on_validation_batch_end

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not (isinstance(outputs, Mapping) and GENERATION_KEY in outputs):
            # A predict step returns its rows (one per input), so QLitModule leaves the timing of its last generate
            # call on the module instead; taken once, so a step that did not generate records nothing.
            outputs = {GENERATION_KEY: getattr(pl_module, "last_generation", None)}
            pl_module.last_generation = None
        self._record(outputs)

    def _record(self, outputs: Any) -> None:
        gen = outputs.get(GENERATION_KEY) if isinstance(outputs, Mapping) else None
        if not isinstance(gen, Mapping):
            return
        seconds, samples = float(gen["seconds"]), int(gen["samples"])
        if samples > 0:
            self._records.append((seconds, samples, int(gen.get("new_tokens", 0))))

    def _probes(self, trainer: Trainer) -> bool:
        return self.probe_samples > 0 and not (trainer.state.fn == "fit" and self._probed_this_fit)

    def _collect(self, batch: Any) -> None:
        if not isinstance(batch, Mapping) or "prompt_input_ids" not in batch or "prompt_attention_mask" not in batch:
            return
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"].bool()
        rows = batch.get("row_index")
        index = rows.tolist() if isinstance(rows, torch.Tensor) else range(self._rows_seen, self._rows_seen + len(ids))
        self._rows_seen += len(ids)
        for i, row in enumerate(index):
            if row < self.probe_samples and mask[i].any():
                self._prompts.append((int(row), ids[i][mask[i]].clone()))

    # ---------------------------------------------------------------- the probe
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and self._probes(trainer):
            self._probe_and_log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._probes(trainer):
            self._probe_and_log(trainer, pl_module, "test")

    def _probe_and_log(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._records = self.probe(pl_module, [ids for _, ids in sorted(self._prompts, key=lambda p: p[0])])
        self._prompts = []
        if trainer.state.fn == "fit":
            self._probed_this_fit = True
        # Every rank holds the same gathered summary; sync_dist (a mean of equal values) only keeps Lightning from
        # warning about unsynchronised epoch-level logging.
        for name, value in self.summarise(trainer, stage).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)

    @torch.no_grad()
    def probe(self, pl_module: LightningModule, prompts: list[torch.Tensor]) -> list[tuple[float, int, int]]:
        """Generate ``probe_new_tokens`` tokens for each prompt alone; ``(seconds, 1, new_tokens)`` per prompt."""
        if not prompts:
            return []
        model = wrapped_model(pl_module)
        tokenizer = getattr(pl_module, "tokenizer", None)
        options: dict[str, Any] = {"do_sample": False, "use_cache": True}
        if tokenizer is not None:  # as QLitModule.generate: the tokenizer's ids, whatever the model's config says
            options.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        elif getattr(model.generation_config, "pad_token_id", None) is None:
            options["pad_token_id"] = model.generation_config.eos_token_id or 0
        device = pl_module.device
        records = []
        for n, prompt in enumerate([prompts[0], *prompts]):  # the first call warms up (kernels, allocator, caches)
            ids = prompt.to(device).unsqueeze(0)
            new = min(2, self.probe_new_tokens) if n == 0 else self.probe_new_tokens
            synchronize(device)
            start = perf_counter()
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, **options
            )
            synchronize(device)
            if n:
                records.append((perf_counter() - start, 1, int(out.shape[1] - ids.shape[1])))
        return records

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
