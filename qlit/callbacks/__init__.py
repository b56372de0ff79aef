"""The Lightning callbacks of a qlit run: the measurements (GPU memory, throughput and MFU, parameter counts,
generation latency, wall time), the checkpoint on interruption and the predictions writer, one per file.

The qlit CLI turns on every callback of :data:`ALWAYS_ON` in every run, each configurable under its key, which is
also its file's name (``memory``, ``throughput``, ``params``, ``latency``, ``timing``: e.g.
``--throughput.log_every_n_steps 10``); in plain Lightning code add them to the Trainer's ``callbacks``. Each
declares the metrics it logs (``metric_specs``), which ``qlit compare`` reads for its columns. All log from rank 0;
throughput and generation numbers are global, summed or gathered over ranks.

| Metric | Unit | Meaning |
| --- | --- | --- |
| `gpu/allocated_gib` | GiB | GPU memory held by tensors now (rank 0), every N steps |
| `gpu/reserved_gib` | GiB | GPU memory held by PyTorch's caching allocator now (rank 0) |
| `gpu/peak_allocated_gib` | GiB | peak of `gpu/allocated_gib` since the training epoch began (reset each epoch) |
| `gpu/peak_reserved_gib` | GiB | peak of `gpu/reserved_gib` since the training epoch began (reset each epoch) |
| `cpu/peak_rss_gib` | GiB | without CUDA, instead of the `gpu/*` metrics: the process's peak resident memory |
| `train/tokens_per_sec` | tokens/s | real (non-padding, `attention_mask` = 1) tokens trained per second, all devices |
| `train/padded_tokens_per_sec` | tokens/s | positions processed per second, padding included (batch × padded length) |
| `train/padding_fraction` | ratio | share of processed positions that are padding |
| `train/samples_per_sec` | samples/s | sequences trained per second, all devices |
| `train/step_time_sec` | s | wall time of one optimizer step (all its accumulated micro-batches), validation excluded |
| `train/tokens_seen` | tokens | real tokens trained so far, all devices (warm-up steps included) |
| `train/model_tflops_per_sec` | TFLOP/s | analytic model FLOPs per second (`qlit.callbacks.flops`), all devices |
| `train/mfu` | ratio | model FLOP utilisation: `train/model_tflops_per_sec` over the devices' dense bf16 peak |
| `params/trainable` | parameters | trainable parameters (also in the hyperparameter table) |
| `params/total` | parameters | all parameters, a 4-bit weight counted at its logical size, as peft counts |
| `params/trainable_ratio` | ratio | `params/trainable` / `params/total` |
| `params/weight_gib` | GiB | storage of parameters and buffers (with 4-bit scales): shows the quantization saving |
| `params/bitnet_weight_gib` | GiB | BitNet: storage of the ternary projection weights (2-bit packed when frozen) |
| `params/bitnet_bf16_gib` | GiB | BitNet runs: what the same projection weights would occupy in bf16 |
| `fidelity/weight_rel_error` | ratio | at step 0 when enabled: projections' ‖W − Ŵ‖ / ‖W‖ against the checkpoint |
| `fidelity/weight_rel_error_max` | ratio | the same for the worst layer |
| `fidelity/base_val_loss` | nats/token | the stored base's validation loss before training, its adapter off |
| `fidelity/original_val_loss` | nats/token | the unquantized checkpoint's loss on the same batches |
| `fidelity/perplexity_ratio` | ratio | `exp(base − original)`: what quantizing multiplies perplexity by |
| `val/latency_ms_mean` | ms | latency probe: mean time to generate a fixed number of tokens for one of fixed prompts |
| `val/latency_ms_p95` | ms | 95th percentile of that latency |
| `val/gen_tokens_per_sec` | tokens/s | the probe's generated tokens per second of generation time, all devices |
| `val/prefill_ms` | ms | the probe, one prompt at a time: mean prefill time (the forward pass and first token) |
| `val/decode_ms_per_token` | ms | the probe, one prompt at a time: decoding time per new token after the first |
| `val/batch_prefill_ms` | ms | the probe at the validation batch (the pass's first batch at once): its prefill |
| `val/batch_decode_ms_per_token` | ms | the same: time per decoding step (every row's next token) |
| `test/latency_ms_mean` | ms | the same probe on the test split |
| `test/latency_ms_p95` | ms | the same for test |
| `test/gen_tokens_per_sec` | tokens/s | the same for test |
| `test/prefill_ms`, `test/decode_ms_per_token` | ms | the same for test |
| `test/batch_prefill_ms`, `test/batch_decode_ms_per_token` | ms | the same for test |
| `predict/latency_ms_mean` | ms | predict's own generation calls, a sample waiting for its batch (also printed) |
| `predict/latency_ms_p95` | ms | the same for predict |
| `predict/gen_tokens_per_sec` | tokens/s | the same for predict |
| `predict/prefill_ms`, `predict/decode_ms_per_token` | ms | the same for predict's batches |
| `time/setup_seconds` | s | from fit set-up (before the model loads) to fit start: model load, quantization, adapters |
| `time/first_step_seconds` | s | from fit set-up to the end of the first optimizer step |
| `time/fit_seconds` | s | wall time of the whole fit |
"""

from lightning.pytorch import Callback

from qlit.callbacks.fidelity import QuantizationFidelity
from qlit.callbacks.interrupt import InterruptCheckpoint
from qlit.callbacks.latency import InferenceLatencyMonitor
from qlit.callbacks.memory import GPUMemoryMonitor
from qlit.callbacks.params import TrainableParamsMonitor
from qlit.callbacks.predictions import PredictionWriter
from qlit.callbacks.progress import AutoProgressBar
from qlit.callbacks.throughput import TokenThroughputMonitor
from qlit.callbacks.timing import TrainingTimeMonitor

#: The callbacks of every ``qlit`` run, by CLI key, in the order the Trainer calls them (the ``params`` callback
#: first: ``qlit compare`` shows the declared columns in this order). Adding one: its file, and a line here.
ALWAYS_ON: dict[str, type[Callback]] = {
    "interrupt": InterruptCheckpoint,  # a checkpoint on SIGTERM or Ctrl+C
    "params": TrainableParamsMonitor,
    "memory": GPUMemoryMonitor,
    "throughput": TokenThroughputMonitor,
    "latency": InferenceLatencyMonitor,
    "timing": TrainingTimeMonitor,
    # Off unless enabled: the stored base against its unquantized original. After the costs, which stay the first
    # columns TensorBoard ticks, and after the timing's start-up clock stops (a second model load is not set-up).
    "fidelity": QuantizationFidelity,
    "predictions": PredictionWriter,  # `qlit predict` writes predictions.jsonl in the run directory
}

__all__ = [
    "ALWAYS_ON",
    "AutoProgressBar",
    "GPUMemoryMonitor",
    "InferenceLatencyMonitor",
    "InterruptCheckpoint",
    "PredictionWriter",
    "QuantizationFidelity",
    "TokenThroughputMonitor",
    "TrainableParamsMonitor",
    "TrainingTimeMonitor",
]
