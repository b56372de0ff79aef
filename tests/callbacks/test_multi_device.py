"""Two CPU processes (DDP over gloo): throughput is summed over ranks, generation latency gathered from both, and
memory is each rank's own, the largest logged."""

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_lm import BATCH, LENGTHS, SEQ, FakeClock, TinyLM, cpu_trainer, loader

import qlit.callbacks.memory as memory
import qlit.callbacks.throughput as throughput
import qlit.generation as generation
from qlit.callbacks import GPUMemoryMonitor, InferenceLatencyMonitor, TokenThroughputMonitor

PROBE_TOKENS = 2


class RankClock:
    """A clock each read of which moves on by its rank's step: a call timed between two reads takes one step."""

    def __init__(self, steps: tuple[float, ...]) -> None:
        self.steps = steps
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.steps[torch.distributed.get_rank() if torch.distributed.is_initialized() else 0]
        return self.now


def _rank_rss() -> int:
    """A peak resident memory of 1 GiB on rank 0 and 3 GiB on rank 1."""
    return (1 + 2 * torch.distributed.get_rank()) * 2**30


def test_two_ranks_sum_tokens_gather_latencies_and_log_the_largest_memory(tmp_path, monkeypatch: pytest.MonkeyPatch):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("forked ranks need a parent without CUDA initialised (an earlier GPU test used it)")
    clock = FakeClock()
    # The batch order below is the unshuffled one: a seed left by an earlier run in this process would change it.
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.setattr(throughput, "perf_counter", clock)  # forked ranks inherit the patch and their own clock
    # Rank 1 generates twice as slowly as rank 0: a generate call reads the clock at its start, at its first token's
    # scores (the end of the prefill) and at its end, so each takes two of its rank's steps.
    monkeypatch.setattr(generation, "perf_counter", RankClock((0.05, 0.1)))
    monkeypatch.setattr(memory, "peak_rss_bytes", _rank_rss)
    logger = TensorBoardLogger(tmp_path, name="ddp", version=0)  # the parent must not pick a new one
    trainer = cpu_trainer(
        devices=2,
        strategy="ddp_fork",
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        logger=logger,
        callbacks=[
            TokenThroughputMonitor(warmup_steps=0, log_every_n_steps=1),
            InferenceLatencyMonitor(probe_new_tokens=PROBE_TOKENS),
            GPUMemoryMonitor(log_every_n_steps=1),
        ],
    )
    module = TinyLM(clock=clock, train_seconds=0.5)
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
    # Validation: one batch of 2 rows per rank (rows 0, 1 on rank 0; 2, 3 on rank 1), all among the probe's first 8
    # rows, each generated alone: latencies 0.1, 0.1, 0.2, 0.2 s.
    assert scalars["val/latency_ms_mean"][-1][1] == pytest.approx(150.0)
    assert scalars["val/latency_ms_p95"][-1][1] == pytest.approx(200.0)  # position 2.85 lies between two 0.2 s
    # Ranks generate in parallel: 2 × 2 tokens in 2 × 0.1 s plus 2 × 2 in 2 × 0.2 s.
    rate = BATCH * PROBE_TOKENS / (BATCH * 0.1) + BATCH * PROBE_TOKENS / (BATCH * 0.2)
    assert scalars["val/gen_tokens_per_sec"][-1][1] == pytest.approx(rate)
    # The prefill is a step (50 ms on rank 0, 100 ms on rank 1), and so is the one decoding step after it: the means
    # over both ranks' calls, alone and at each rank's validation batch.
    for name in ("prefill_ms", "decode_ms_per_token", "batch_prefill_ms", "batch_decode_ms_per_token"):
        assert scalars[f"val/{name}"][-1][1] == pytest.approx(75.0), name
    # Memory is per device, never summed (that would be 4 GiB): the largest rank's, rank 1's, at every log.
    assert [s for s, _ in scalars["cpu/peak_rss_gib"]][:2] == [1, 2]
    assert [v for _, v in scalars["cpu/peak_rss_gib"]] == [3.0] * len(scalars["cpu/peak_rss_gib"])
