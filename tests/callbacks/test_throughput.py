"""Token throughput with a fake clock: real vs padded tokens, samples/s, step time, gradient accumulation, MFU."""

from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from tiny_lm import BATCH, LENGTHS, SEQ, TINY_QWEN2, FakeClock, RecordingLogger, TinyLM, cpu_trainer, loader

import qlit.callbacks.throughput as throughput
from qlit.callbacks import TokenThroughputMonitor
from qlit.callbacks.flops import matmul_params


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(throughput, "perf_counter", fake)
    return fake


def fit(clock: FakeClock, steps: int, accumulate: int = 1, val_every: int | None = None, **callback_kwargs):
    logger = RecordingLogger()
    monitor = TokenThroughputMonitor(**{"warmup_steps": 0, "log_every_n_steps": 1, **callback_kwargs})
    val = {} if val_every is None else dict(val_check_interval=val_every * accumulate, limit_val_batches=1)
    trainer = cpu_trainer(
        max_steps=steps, accumulate_grad_batches=accumulate, logger=logger, callbacks=[monitor], **val
    )
    module = TinyLM(clock=clock, train_seconds=0.5, val_seconds=10.0)
    trainer.fit(module, train_dataloaders=loader(steps * accumulate), val_dataloaders=loader(1) if val else None)
    return logger


def test_real_and_padded_tokens_samples_and_step_time(clock):
    logger = fit(clock, steps=4)
    # One micro-batch per step, 0.5 s each; batch k holds LENGTHS[k] real tokens out of 2 × 8 positions.
    expected_real = [sum(LENGTHS[k]) / 0.5 for k in range(4)]  # 13, 9, 15, 6 tokens → 26, 18, 30, 12 tokens/s
    assert [v for _, v in logger.series("train/tokens_per_sec")] == pytest.approx(expected_real)
    assert [s for s, _ in logger.series("train/tokens_per_sec")] == [1, 2, 3, 4]
    assert [v for _, v in logger.series("train/padded_tokens_per_sec")] == pytest.approx([BATCH * SEQ / 0.5] * 4)
    assert [v for _, v in logger.series("train/samples_per_sec")] == pytest.approx([BATCH / 0.5] * 4)
    assert [v for _, v in logger.series("train/step_time_sec")] == pytest.approx([0.5] * 4)
    assert [v for _, v in logger.series("train/padding_fraction")] == pytest.approx(
        [1 - sum(LENGTHS[k]) / (BATCH * SEQ) for k in range(4)]
    )


def test_gradient_accumulation_counts_every_micro_batch_of_a_step(clock):
    logger = fit(clock, steps=2, accumulate=2)
    # A step = two micro-batches (1.0 s): step 1 holds batches 0 and 1, step 2 batches 2 and 3.
    assert [s for s, _ in logger.series("train/tokens_per_sec")] == [1, 2]
    tokens = [sum(LENGTHS[0]) + sum(LENGTHS[1]), sum(LENGTHS[2]) + sum(LENGTHS[3])]  # 22, 21
    assert [v for _, v in logger.series("train/tokens_per_sec")] == pytest.approx([t / 1.0 for t in tokens])
    assert [v for _, v in logger.series("train/padded_tokens_per_sec")] == pytest.approx([2 * BATCH * SEQ] * 2)
    assert [v for _, v in logger.series("train/samples_per_sec")] == pytest.approx([2 * BATCH] * 2)
    assert [v for _, v in logger.series("train/step_time_sec")] == pytest.approx([1.0, 1.0])


def test_interval_spans_several_steps_and_skips_validation_and_warmup(clock):
    logger = fit(clock, steps=5, log_every_n_steps=2, warmup_steps=1, val_every=2)
    # Step 1 is warm-up; intervals are steps 2 (→ logged at 2) and 3–4 (→ logged at 4), with the 10 s validation
    # after step 2 left out; step 5 is not a log boundary.
    assert [s for s, _ in logger.series("train/step_time_sec")] == [2, 4]
    assert [v for _, v in logger.series("train/step_time_sec")] == pytest.approx([0.5, 0.5])
    tokens_3_4 = sum(LENGTHS[2]) + sum(LENGTHS[3])
    assert logger.series("train/tokens_per_sec")[1][1] == pytest.approx(tokens_3_4 / 1.0)


def test_mfu_of_full_finetuning_uses_each_sequence_length(clock):
    logger = fit(clock, steps=2, peak_flops=1e9)
    config = transformers.Qwen2Config(**TINY_QWEN2)
    weights = matmul_params(config)  # all trainable: forward + input and weight gradients = 6 per weight
    for (_, tflops), (_, mfu), lengths in zip(
        logger.series("train/model_tflops_per_sec"), logger.series("train/mfu"), LENGTHS, strict=False
    ):
        flops = sum(6 * weights * n + 6 * n * n * 64 * 2 for n in lengths)  # attention 6 × len × hidden × layers
        assert tflops == pytest.approx(flops / 0.5 / 1e12)
        assert mfu == pytest.approx(flops / 0.5 / 1e9)


def test_lora_model_counts_frozen_base_and_adapters():
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**TINY_QWEN2))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters, _ = lora.get_nb_trainable_parameters()
    monitor = TokenThroughputMonitor()
    monitor.on_fit_start(None, SimpleNamespace(model=lora))
    assert monitor._weight_flops == 4 * matmul_params(model.config) + 6 * adapters
    assert monitor._attn_flops == 6 * 64 * 2


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.5e12),
        ("NVIDIA H100 80GB HBM3", 989.5e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200 NVL", 835.5e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),  # from Lightning's table
        ("Some Future GPU", None),
    ],
)
def test_device_peak_flops(monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert throughput.device_peak_flops(torch.device("cuda", 0)) == peak
    assert throughput.device_peak_flops(torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counting_a_batch_does_not_synchronise():
    from tiny_lm import make_batch

    monitor = TokenThroughputMonitor()
    monitor._device = torch.device("cuda", torch.cuda.current_device())
    monitor._dev = torch.zeros(2, dtype=torch.int64, device=monitor._device)
    batch = {k: v.to(monitor._device) for k, v in make_batch((8, 5), seed=0).items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        for _ in range(3):
            monitor._count(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert monitor._dev.tolist() == [3 * 13, 3 * (8 * 8 + 5 * 5)]
    assert monitor._host == [0, 0, 3 * BATCH * SEQ, 3 * BATCH]
