"""Generation latency (mean, p95 per sample), prefill and per-token decoding time, and generated tokens/s: a fixed
probe in validation and test, and the generate calls of predict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from qlit.callbacks._common import log_to_loggers, wrapped_model
from qlit.distributed import gather_objects
from qlit.errors import QlitError
from qlit.generation import WARMUP_STEPS, Generated, eager_generate
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
    new tokens (end-of-sequence is suppressed until then), after one untimed warm-up call. It generates the way the
    module does (``QLitModule.generate_ids``: the recorded decode step where :mod:`qlit.generation` applies it,
    else transformers' ``generate``), so it measures the technique. A sample's latency is its call's wall time
    (prefill and every decoding step, synchronised); the prefill (the prompt's forward pass and the first token) and
    the decoding steps after it are also timed apart, since a study compares them separately: ``prefill_ms`` per
    prompt and ``decode_ms_per_token`` per step. The same is measured once at the validation batch: the pass's
    first batch (its rows, left-padded as validation batches them), ``probe_new_tokens`` new tokens, after a warm-up
    call: ``batch_prefill_ms`` and ``batch_decode_ms_per_token`` (a step gives every row its next token).
    Generated tokens/s is the batch-1 probe's tokens over its time, summed over ranks. Every run so gets latency
    numbers, also where the task scores
    rather than generates (SST-2's label word, perplexity), and they compare across quantization and adapter
    techniques: same prompts, same lengths, one at a time. Latency does not change as the weights train, so a fit
    probes once, at its first validation pass (the sanity check excluded); ``validate`` and ``test`` probe every
    pass. The probe needs the prompts qlit's batches carry (``prompt_input_ids``, ``prompt_attention_mask``).

    **Predict: the real calls.** A predict step's ``generate`` (batched, stopping at end-of-sequence) is timed by
    the module; every sample of a batch waits for the whole batch, so each sample's latency is its batch's time.
    Predict allows no ``self.log``: its numbers go straight to the loggers (``predict/...``, at the current global
    step) and into one info line on the console.

    Metrics, for ``<stage>`` in ``val``, ``test``, ``predict``: ``<stage>/latency_ms_mean``, ``<stage>/latency_ms_p95``,
    ``<stage>/gen_tokens_per_sec``, ``<stage>/prefill_ms`` and ``<stage>/decode_ms_per_token`` (means over ranks: a
    predict batch's are its whole batch's), and for ``val`` and ``test`` ``<stage>/batch_prefill_ms`` and
    ``<stage>/batch_decode_ms_per_token``; validation and test ones go through ``LightningModule.log``, so they show in
    ``trainer.validate``/``trainer.test`` results.

    Args:
        probe_samples: prompts the probe generates for (0: no probe, and no validation or test latency).
        probe_new_tokens: tokens each probe prompt generates.
    """

    metric_specs = (
        MetricSpec("val/latency_ms_mean", "ms", higher_is_better=False, study=True),
        MetricSpec("val/latency_ms_p95", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("val/gen_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
        MetricSpec("val/prefill_ms", "ms", higher_is_better=False),
        MetricSpec("val/decode_ms_per_token", "ms", higher_is_better=False, study=True),
        MetricSpec("val/batch_prefill_ms", "ms", higher_is_better=False),
        MetricSpec("val/batch_decode_ms_per_token", "ms", higher_is_better=False),
        MetricSpec("test/latency_ms_mean", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("test/latency_ms_p95", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("test/gen_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
        MetricSpec("test/prefill_ms", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("test/decode_ms_per_token", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("test/batch_prefill_ms", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("test/batch_decode_ms_per_token", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("predict/latency_ms_mean", "ms", higher_is_better=False),
        MetricSpec("predict/latency_ms_p95", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("predict/gen_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
        MetricSpec("predict/prefill_ms", "ms", higher_is_better=False, aggregate=None),
        MetricSpec("predict/decode_ms_per_token", "ms", higher_is_better=False, aggregate=None),
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
        # Beside each record that timed them apart: (prefill seconds, decoding seconds, decoding steps).
        self._phases: list[tuple[float, float, int]] = []
        # The batched probe's one call, the same way (None: none this epoch).
        self._batch_phase: tuple[float, float, int] | None = None
        # The probe's prompts met in the running pass on this rank: (row_index, prompt ids without padding).
        self._prompts: list[tuple[int, torch.Tensor]] = []
        # The pass's first batch of prompts on this rank (ids, mask), for the probe at the validation batch.
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows_seen = 0
        self._probed_this_fit = False

    # ---------------------------------------------------------------- recording
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._probed_this_fit = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._records, self._phases, self._prompts, self._rows_seen = [], [], [], 0
        self._batch = self._batch_phase = None

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
            if "decode_steps" in gen:
                self._phases.append(
                    (float(gen["prefill_seconds"]), float(gen["decode_seconds"]), int(gen["decode_steps"]))
                )

    def _probes(self, trainer: Trainer) -> bool:
        return self.probe_samples > 0 and not (trainer.state.fn == "fit" and self._probed_this_fit)

    def _collect(self, batch: Any) -> None:
        if not isinstance(batch, Mapping) or "prompt_input_ids" not in batch or "prompt_attention_mask" not in batch:
            return
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"].bool()
        if self._batch is None:
            self._batch = (ids.clone(), batch["prompt_attention_mask"].clone())
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
        if self._batch is not None:
            self._batch_phase = self.probe_batch(pl_module, *self._batch)
        self._prompts, self._batch = [], None
        if trainer.state.fn == "fit":
            self._probed_this_fit = True
        # Every rank holds the same gathered summary; sync_dist (a mean of equal values) only keeps Lightning from
        # warning about unsynchronised epoch-level logging.
        for name, value in self.summarise(trainer, stage).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)

    @torch.no_grad()
    def probe(self, pl_module: LightningModule, prompts: list[torch.Tensor]) -> list[tuple[float, int, int]]:
        """Generate ``probe_new_tokens`` tokens for each prompt alone; ``(seconds, 1, new_tokens)`` per prompt (and
        each call's prefill and decoding apart, in ``_phases``)."""
        self._phases = []
        if not prompts:
            return []
        device = pl_module.device
        # One cache length for every prompt: a recorded decode step of batch 1 serves them all.
        length = max(len(p) for p in prompts) + self.probe_new_tokens
        records = []
        for n, prompt in enumerate([prompts[0], *prompts]):  # the first call warms up (kernels, allocator, graphs)
            ids = prompt.to(device).unsqueeze(0)
            new = min(WARMUP_STEPS + 2, self.probe_new_tokens) if n == 0 else self.probe_new_tokens
            out = self._generate(pl_module, ids, torch.ones_like(ids), new, length)
            if n:
                records.append((out.seconds, 1, int(out.tokens.shape[1])))
                self._phases.append((out.prefill_seconds, out.decode_seconds, out.decode_steps))
        return records

    @torch.no_grad()
    def probe_batch(
        self, pl_module: LightningModule, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[float, float, int] | None:
        """Generate ``probe_new_tokens`` tokens for a validation batch's prompts at once, after a warm-up call:
        ``(prefill seconds, decoding seconds, decoding steps)``."""
        ids, mask = ids.to(pl_module.device), mask.to(pl_module.device)
        self._generate(pl_module, ids, mask, min(WARMUP_STEPS + 2, self.probe_new_tokens))
        out = self._generate(pl_module, ids, mask, self.probe_new_tokens)
        return out.prefill_seconds, out.decode_seconds, out.decode_steps

    @staticmethod
    def _generate(
        pl_module: LightningModule, ids: torch.Tensor, mask: torch.Tensor, new: int, length: int | None = None
    ) -> Generated:
        """Exactly ``new`` greedy tokens per row (end-of-sequence suppressed), the way the module generates."""
        generate_ids = getattr(pl_module, "generate_ids", None)
        tokenizer = getattr(pl_module, "tokenizer", None)
        if callable(generate_ids) and tokenizer is not None:
            return generate_ids(ids, mask, new, min_new_tokens=new, cache_length=length)
        # Another LightningModule: transformers' generate on its model, with its tokenizer's ids where it has one.
        return eager_generate(
            wrapped_model(pl_module),
            ids,
            mask,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=getattr(tokenizer, "eos_token_id", None),
            pad_token_id=getattr(tokenizer, "pad_token_id", None),
        )

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
        gathered = gather_objects((self._records, self._phases, self._batch_phase), trainer.world_size)
        latencies = sorted(seconds for rank, *_ in gathered for seconds, samples, _ in rank for _ in range(samples))
        if not latencies:
            return {}
        # Ranks generate concurrently: their rates add up.
        rate = sum(
            sum(tokens for *_, tokens in rank) / secs
            for rank, *_ in gathered
            if (secs := sum(seconds for seconds, *_ in rank)) > 0
        )
        metrics = {
            f"{stage}/latency_ms_mean": 1000.0 * sum(latencies) / len(latencies),
            f"{stage}/latency_ms_p95": 1000.0 * _percentile(latencies, 95.0),
            f"{stage}/gen_tokens_per_sec": rate,
        }
        metrics.update(_phase_metrics(f"{stage}/", [phase for _, phases, _ in gathered for phase in phases]))
        if stage != "predict":
            metrics.update(_phase_metrics(f"{stage}/batch_", [b for *_, b in gathered if b is not None]))
        return metrics


def _phase_metrics(prefix: str, phases: list[tuple[float, float, int]]) -> dict[str, float]:
    """Mean prefill time per call and decoding time per step, in ms (no decoding step: no per-token figure)."""
    if not phases:
        return {}
    metrics = {f"{prefix}prefill_ms": 1000.0 * sum(p for p, _, _ in phases) / len(phases)}
    steps = sum(n for *_, n in phases)
    if steps:
        metrics[f"{prefix}decode_ms_per_token"] = 1000.0 * sum(d for _, d, _ in phases) / steps
    return metrics
