"""Two CPU processes (DDP over gloo): throughput is summed over ranks and generation latency gathered from both."""

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_lm import BATCH, LENGTHS, NEW_TOKENS, SEQ, FakeClock, TinyLM, cpu_trainer, loader

import qlit.callbacks.throughput as throughput
from qlit.callbacks import InferenceLatencyMonitor, TokenThroughputMonitor


def test_two_ranks_sum_tokens_and_gather_latencies(tmp_path, monkeypatch: pytest.MonkeyPatch):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("forked ranks need a parent without CUDA initialised (an earlier GPU test used it)")
    clock = FakeClock()
    monkeypatch.setattr(throughput, "perf_counter", clock)  # forked ranks inherit the patch and their own clock
    logger = TensorBoardLogger(tmp_path, name="ddp", version=0)  # the parent must not pick a new one
    trainer = cpu_trainer(
        devices=2,
        strategy="ddp_fork",
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        logger=logger,
        callbacks=[TokenThroughputMonitor(warmup_steps=0, log_every_n_steps=1), InferenceLatencyMonitor()],
    )
    # Rank 1 reports generation twice as slow as rank 0.
    module = TinyLM(clock=clock, train_seconds=0.5, gen_seconds_per_rank=(0.1, 0.2))
    trainer.fit(module, train_dataloaders=loader(4), val_dataloaders=loader(2))

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    # The distributed sampler gives rank 0 batches 0, 2 and rank 1 batches 1, 3; each step takes 0.5 s on each.
    step_tokens = [sum(LENGTHS[0]) + sum(LENGTHS[1]), sum(LENGTHS[2]) + sum(LENGTHS[3])]
    assert scalars["train/tokens_per_sec"] == [(1, pytest.approx(step_tokens[0] / 0.5)), (2, step_tokens[1] / 0.5)]
    assert [v for _, v in scalars["train/samples_per_sec"]] == pytest.approx([2 * BATCH / 0.5] * 2)
    assert [v for _, v in scalars["train/padded_tokens_per_sec"]] == pytest.approx([2 * BATCH * SEQ / 0.5] * 2)
    assert [v for _, v in scalars["train/step_time_sec"]] == pytest.approx([0.5, 0.5])
    # Validation: one batch of 2 samples per rank, at 0.1 s and 0.2 s: latencies 0.1, 0.1, 0.2, 0.2 s.
    assert scalars["val/latency_ms_mean"][-1][1] == pytest.approx(150.0)
    assert scalars["val/latency_ms_p95"][-1][1] == pytest.approx(200.0)  # position 2.85 lies between two 0.2 s
    # Ranks generate in parallel: 2 × 3 tokens in 0.1 s plus 2 × 3 in 0.2 s.
    rate = BATCH * NEW_TOKENS / 0.1 + BATCH * NEW_TOKENS / 0.2
    assert scalars["val/gen_tokens_per_sec"][-1][1] == pytest.approx(rate)
