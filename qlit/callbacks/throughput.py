"""Training throughput: real and padded tokens/s, samples/s, step time and MFU, summed over all devices."""

from __future__ import annotations

from collections.abc import Mapping
from time import perf_counter

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from qlit.callbacks._common import log_to_loggers, optimizer_step_done, synchronize, wrapped_model
from qlit.callbacks.flops import attention_flops_per_token, transformer_shape, weight_flops_per_token
from qlit.callbacks.params import count_parameters
from qlit.metrics import MetricSpec

# Dense (no sparsity) bf16 tensor-core peaks per GPU from NVIDIA's H100/H200 datasheets. Lightning's table misses the
# plain "NVIDIA H200" name, and its H200 and H100 NVL rows are not per-GPU dense figures (2:4-sparse, or an NVL pair),
# so Hopper names are matched here first.
_HOPPER_BF16_DENSE = {"sxm": 989.5e12, "nvl": 835.5e12, "pcie": 756.0e12}


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one ``device``: H100/H200 from NVIDIA's datasheets, others from Lightning's table.

    Returns ``None`` where unknown (CPUs, unlisted GPUs).
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    if "h100" in name or "h200" in name or "gh200" in name:
        if "nvl" in name:
            return _HOPPER_BF16_DENSE["nvl"]
        if "pcie" in name or ("h100" in name and "hbm2e" in name):
            return _HOPPER_BF16_DENSE["pcie"]
        return _HOPPER_BF16_DENSE["sxm"]
    peak = get_available_flops(device, torch.bfloat16)
    return float(peak) if peak else None


class TokenThroughputMonitor(Callback):
    """Log training throughput every N optimizer steps, summed over all devices, from rank 0.

    Lightning's own ``ThroughputMonitor`` synchronises the device on every batch and counts items on the host, so this
    one is written for the cost budget instead: each micro-batch adds its real-token count (``attention_mask`` sums)
    to a counter on the device, with no synchronisation; at a log boundary the counters of all ranks are summed by
    one ``all_reduce``, read once (the one synchronisation the measurement needs) and the host clock is read right
    after, so each interval is timed between two synchronised points. A step is an optimizer step: under gradient
    accumulation it counts all its micro-batches. Time spent in validation is left out.

    Metrics (global over devices): ``train/tokens_per_sec`` (non-padding tokens), ``train/padded_tokens_per_sec``
    (every position, padding included), ``train/padding_fraction``, ``train/samples_per_sec``,
    ``train/step_time_sec``, ``train/tokens_seen`` (the running total, kept in checkpoints), and where the model
    has a Hugging Face config ``train/model_tflops_per_sec`` and, where the device's bf16 peak is known,
    ``train/mfu``.

    MFU uses :mod:`qlit.callbacks.flops`: per real token, ``4 W`` for a frozen (quantized) base (forward and input
    gradients), ``+ 2 W`` times the trained share of the base for its weight gradients, ``+ 6`` per adapter
    parameter, plus attention ``6 × length × d × layers`` with each sequence's real length, against the device's dense
    bf16 peak.

    Args:
        log_every_n_steps: Log every this many optimizer steps; ``None`` follows the trainer's ``log_every_n_steps``.
        warmup_steps: Optimizer steps left out before the first interval starts (kernel autotuning, allocator growth).
        peak_flops: Peak FLOP/s of one device for MFU; ``None`` looks the device up (H100/H200 dense bf16:
            989.5e12).
        full_finetune: Whether the base weights are trained; ``None`` decides from the model: a peft model trains
            only its adapters, otherwise the trainable share of the parameters is used.
    """

    metric_specs = (
        # The median over the run: the first steps (warm-up, compilation) do not skew it.
        MetricSpec("train/tokens_per_sec", "tokens/s", higher_is_better=True, aggregate="median", study=True),
        MetricSpec("train/padded_tokens_per_sec", "tokens/s", higher_is_better=True, aggregate=None),
        MetricSpec("train/padding_fraction", "ratio", higher_is_better=False, aggregate=None),
        MetricSpec("train/samples_per_sec", "samples/s", higher_is_better=True, aggregate=None),
        MetricSpec("train/step_time_sec", "s", higher_is_better=False, aggregate="median"),
        # Real tokens trained so far (warm-up steps included), for loss curves over tokens rather than steps.
        MetricSpec("train/tokens_seen", "tokens", aggregate="last", integer=True),
        MetricSpec("train/model_tflops_per_sec", "TFLOP/s", higher_is_better=True, aggregate=None),
        MetricSpec("train/mfu", "ratio", higher_is_better=True, aggregate=None),
    )

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        warmup_steps: int = 1,
        peak_flops: float | None = None,
        full_finetune: bool | None = None,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be at least 1, got {log_every_n_steps}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must not be negative, got {warmup_steps}.")
        self.log_every_n_steps = log_every_n_steps
        self.warmup_steps = warmup_steps
        self.peak_flops = peak_flops
        self.full_finetune = full_finetune
        self._every = 1
        self._device = torch.device("cpu")
        self._peak: float | None = None
        # FLOPs of a micro-batch = weight_flops × Σ lengths + attn_flops × Σ lengths² (attention grows with length).
        self._weight_flops: float | None = None
        self._attn_flops: float | None = None
        # Device counters: [real tokens, Σ per-sequence real length²]; host counters: the same for batches without
        # an attention mask, then padded positions and samples (their shapes are known on the host for free).
        self._dev: torch.Tensor | None = None
        self._host = [0, 0, 0, 0]
        self._seen = 0  # real tokens of the logged intervals, all ranks
        self._warmup_tokens = 0  # this rank's real tokens of the warm-up steps, added at the next log
        self._t0: float | None = None
        self._paused = 0.0
        self._val_t0: float | None = None
        self._start_step = 0
        self._interval_step = 0
        self._last_step = 0
        self._warned_batch = False

    # ---------------------------------------------------------------- set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device
        self._every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        self._peak = self.peak_flops if self.peak_flops is not None else device_peak_flops(self._device)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After configure_model: the model (and its config) exist now.
        model = wrapped_model(pl_module)
        config = getattr(model, "config", None)
        try:
            shape = transformer_shape(config) if config is not None else None
        except ValueError as err:
            rank_zero_warn(f"TokenThroughputMonitor: no model FLOPs or MFU: {err}")
            shape = None
        if shape is None:
            self._weight_flops = self._attn_flops = None
            return
        trainable, total = count_parameters(model)
        if self.full_finetune is not None:
            fraction = 1.0 if self.full_finetune else 0.0
        elif _is_peft(model):
            fraction = 0.0  # a peft model's base is frozen
        else:
            fraction = trainable / total if total else 0.0
        # With a frozen base, whatever trains is adapter weights (LoRA A/B; a peft modules_to_save copy of a base
        # layer is counted the same way, slightly overcounting its 4 W).
        adapters = trainable if fraction == 0.0 else 0
        self._weight_flops = float(
            weight_flops_per_token(shape, trainable_matmul_params_fraction=fraction, adapter_params=adapters)
        )
        self._attn_flops = float(attention_flops_per_token(shape, 1))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._dev = torch.zeros(2, dtype=torch.int64, device=self._device)
        self._start_step = self._last_step = trainer.global_step
        self._t0 = None
        if self.warmup_steps == 0:
            self._begin(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = None  # a later trainer.validate() must not count as a pause of this fit

    # ---------------------------------------------------------------- counting
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        self._count(batch)
        if not optimizer_step_done(trainer, self._last_step):
            return  # mid gradient accumulation: the step is not over yet
        self._last_step = step = trainer.global_step
        if self._t0 is None:
            if step - self._start_step >= self.warmup_steps:
                self._begin(trainer)
        elif step % self._every == 0 and step > self._interval_step:
            self._log(trainer)

    def _count(self, batch: object) -> None:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, torch.Tensor):
            if not self._warned_batch:
                self._warned_batch = True
                rank_zero_warn("TokenThroughputMonitor: batches are not dicts with `input_ids`; nothing is counted.")
            return
        samples, positions = ids.shape[0], ids.numel()
        self._host[2] += positions
        self._host[3] += samples
        mask = batch.get("attention_mask")
        if mask is None:
            seq = positions // max(samples, 1)
            self._host[0] += positions
            self._host[1] += samples * seq * seq
            return
        # Queued on the device, read only at the next log boundary: no synchronisation here.
        lengths = mask.reshape(samples, -1).sum(dim=1, dtype=torch.int64)
        if lengths.device != self._dev.device:  # a batch left on the host by a custom transfer hook
            lengths = lengths.to(self._dev.device)
        self._dev += torch.stack((lengths, lengths * lengths)).sum(dim=1)

    # ---------------------------------------------------------------- validation is not training time
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._t0 is not None and not trainer.sanity_checking:
            synchronize(self._device)  # once per validation run, so the training work queued so far is counted
            self._val_t0 = perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._val_t0 is not None:
            synchronize(self._device)
            self._paused += perf_counter() - self._val_t0
            self._val_t0 = None

    # ---------------------------------------------------------------- intervals
    def _begin(self, trainer: Trainer) -> None:
        assert self._dev is not None
        self._warmup_tokens = self._host[0] + int(self._dev[0])  # once per fit: the warm-up's tokens are trained too
        self._dev.zero_()
        synchronize(self._device)
        self._restart(perf_counter(), trainer.global_step)

    def _restart(self, now: float, step: int) -> None:
        self._host = [0, 0, 0, 0]
        self._t0, self._paused, self._interval_step = now, 0.0, step

    def _log(self, trainer: Trainer) -> None:
        assert self._dev is not None and self._t0 is not None
        totals = torch.tensor([*self._host, self._warmup_tokens], dtype=torch.int64, device=self._device)
        totals[:2] += self._dev
        self._warmup_tokens = 0
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Plain all_reduce: the strategy's reduce() would add a barrier on top.
            torch.distributed.all_reduce(totals)
        real, square, padded, samples, warmup = totals.tolist()  # the interval's one synchronisation
        self._seen += real + warmup
        now = perf_counter()
        elapsed = now - self._t0 - self._paused
        steps = trainer.global_step - self._interval_step
        self._dev.zero_()
        self._restart(now, trainer.global_step)
        if elapsed <= 0 or steps <= 0:
            return
        metrics = {
            "train/tokens_per_sec": real / elapsed,
            "train/padded_tokens_per_sec": padded / elapsed,
            "train/padding_fraction": 1.0 - real / padded if padded else 0.0,
            "train/samples_per_sec": samples / elapsed,
            "train/step_time_sec": elapsed / steps,
            "train/tokens_seen": float(self._seen),
        }
        if self._weight_flops is not None and self._attn_flops is not None:
            flops_per_sec = (self._weight_flops * real + self._attn_flops * square) / elapsed
            metrics["train/model_tflops_per_sec"] = flops_per_sec / 1e12
            if self._peak:
                metrics["train/mfu"] = flops_per_sec / (self._peak * trainer.world_size)
        log_to_loggers(trainer, metrics)

    def state_dict(self) -> dict[str, int]:
        return {"tokens_seen": self._seen}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._seen = int(state_dict.get("tokens_seen", 0))


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
