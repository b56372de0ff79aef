"""Generation latency and generated tokens/s: the fixed probe of validation and test, and predict's own calls."""

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, cli_args, run_main
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_lm import DEMO_PROBE, NEW_TOKENS, PROMPT, RecordingLogger, TinyLM, batches, cpu_trainer, loader

import qlit.generation as generation
from qlit.callbacks import InferenceLatencyMonitor


def test_summary_is_per_sample_with_interpolated_p95():
    monitor = InferenceLatencyMonitor()
    trainer = SimpleNamespace(world_size=1)
    for outputs in (
        {"generation": {"seconds": 0.1, "samples": 2, "new_tokens": 8}},
        {"loss": 1.0},  # a step that did not generate
        {"generation": {"seconds": 0.3, "samples": 1, "new_tokens": 4}},
        None,
    ):
        monitor._record(outputs)
    metrics = monitor.summarise(trainer, "val")
    # Per-sample latencies: 0.1, 0.1 (both samples waited for their batch) and 0.3 s.
    assert metrics["val/latency_ms_mean"] == pytest.approx(1000 * (0.1 + 0.1 + 0.3) / 3)
    # p95 at position (3 - 1) × 0.95 = 1.9: 0.1 + 0.9 × (0.3 - 0.1) = 0.28 s.
    assert metrics["val/latency_ms_p95"] == pytest.approx(280.0)
    assert metrics["val/gen_tokens_per_sec"] == pytest.approx((8 + 4) / (0.1 + 0.3))


def test_no_generation_logs_nothing():
    monitor = InferenceLatencyMonitor()
    monitor._record({"loss": 0.5})
    assert monitor.summarise(SimpleNamespace(world_size=1), "test") == {}


def test_probe_generates_the_first_prompts_one_at_a_time_with_a_fixed_length(monkeypatch: pytest.MonkeyPatch):
    monitor = InferenceLatencyMonitor(probe_samples=3, probe_new_tokens=4)
    probed: list[list[torch.Tensor]] = []
    probe = monitor.probe
    monkeypatch.setattr(monitor, "probe", lambda module, prompts: probed.append(prompts) or probe(module, prompts))
    (results,) = cpu_trainer(logger=False, callbacks=[monitor]).validate(TinyLM(), loader(3), verbose=False)
    # Rows 0 to 5 in three batches of two: the probe takes rows 0, 1 (batch 0) and 2 (batch 1), in that order.
    rows = [b["input_ids"][i, :PROMPT] for b in batches(2) for i in range(2)][:3]
    assert len(probed) == 1 and all(torch.equal(p, r) for p, r in zip(probed[0], rows, strict=True))
    # Each prompt alone, exactly 4 new tokens (end-of-sequence cannot stop it early).
    assert [(samples, tokens) for _, samples, tokens in monitor._records] == [(1, 4)] * 3
    seconds = [s for s, *_ in monitor._records]
    assert results["val/latency_ms_mean"] == pytest.approx(1000 * sum(seconds) / 3, rel=1e-5)
    assert results["val/latency_ms_p95"] >= results["val/latency_ms_mean"] > 0
    assert results["val/gen_tokens_per_sec"] == pytest.approx(12 / sum(seconds), rel=1e-5)


class _Ticking:
    """A clock each read of which is ``step`` seconds after the last."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_prefill_and_decoding_are_timed_apart_alone_and_at_the_validation_batch(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(generation, "perf_counter", _Ticking(0.01))
    monitor = InferenceLatencyMonitor(probe_samples=3, probe_new_tokens=5)
    batches_seen: list[tuple[int, ...]] = []
    probe_batch = monitor.probe_batch
    monkeypatch.setattr(
        monitor,
        "probe_batch",
        lambda module, ids, mask: batches_seen.append(tuple(ids.shape)) or probe_batch(module, ids, mask),
    )
    (results,) = cpu_trainer(logger=False, callbacks=[monitor]).validate(TinyLM(), loader(3), verbose=False)
    # A generate call reads the clock at its start, at its first token's scores and at its end: 10 ms of prefill,
    # then 10 ms for the 4 decoding steps of the other new tokens.
    assert results["val/prefill_ms"] == pytest.approx(10.0) and results["val/decode_ms_per_token"] == pytest.approx(2.5)
    assert results["val/latency_ms_mean"] == pytest.approx(20.0)
    # The same once for the pass's first batch, its two rows at once.
    assert batches_seen == [(2, PROMPT)]
    assert results["val/batch_prefill_ms"] == pytest.approx(10.0)
    assert results["val/batch_decode_ms_per_token"] == pytest.approx(2.5)


class _Passes(Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.count += not trainer.sanity_checking


def test_a_fit_probes_once_and_zero_samples_turn_the_probe_off():
    logger, passes = RecordingLogger(), _Passes()
    monitor = InferenceLatencyMonitor(probe_samples=2, probe_new_tokens=2)
    trainer = cpu_trainer(
        max_steps=4, val_check_interval=2, limit_val_batches=1, logger=logger, callbacks=[monitor, passes]
    )
    trainer.fit(TinyLM(), train_dataloaders=loader(4), val_dataloaders=loader(1))
    # Latency does not change as the weights train: two validation passes, one probe.
    assert passes.count == 2
    assert len(logger.series("val/latency_ms_mean")) == 1
    off = InferenceLatencyMonitor(probe_samples=0)
    (results,) = cpu_trainer(logger=False, callbacks=[off]).validate(TinyLM(), loader(1), verbose=False)
    assert not [name for name in results if "latency" in name or "gen_tokens" in name]


def test_test_results_and_predict_go_to_the_logger():
    logger = RecordingLogger()
    monitor = InferenceLatencyMonitor(probe_samples=2, probe_new_tokens=3)
    trainer = cpu_trainer(logger=logger, callbacks=[monitor])
    module = TinyLM()
    (results,) = trainer.test(module, dataloaders=loader(2), verbose=False)
    assert results["test/latency_ms_p95"] >= results["test/latency_ms_mean"] > 0
    assert results["test/gen_tokens_per_sec"] > 0
    trainer.predict(module, dataloaders=loader(2), return_predictions=False)
    (predict,) = [m for _, m in logger.records if "predict/latency_ms_mean" in m]
    assert predict["predict/latency_ms_p95"] >= predict["predict/latency_ms_mean"] > 0
    # 2 batches × 2 samples × NEW_TOKENS over the time generate took, which the step measured itself.
    assert predict["predict/gen_tokens_per_sec"] == pytest.approx(
        4 * NEW_TOKENS / (sum(s for s, *_ in monitor._records))
    )


def test_a_scoring_task_gets_its_latency_from_the_probe(demo_run):
    # SST-2 is judged by scoring the label word: its validation generates nothing, yet the run has its latency.
    events = EventAccumulator(str(demo_run.run_dir), size_guidance={"scalars": 0})
    events.Reload()
    mean, p95, rate = (
        events.Scalars(f"val/{name}")[-1].value for name in ("latency_ms_mean", "latency_ms_p95", "gen_tokens_per_sec")
    )
    assert math.isfinite(p95) and p95 >= mean > 0
    # Every probe prompt generated exactly its DEMO_PROBE[1] tokens: tokens/s × seconds per prompt = tokens per prompt.
    assert rate * mean / 1000 == pytest.approx(DEMO_PROBE[1], rel=1e-3)


@pytest.mark.parametrize(("option", "value"), [("probe_samples", "-1"), ("probe_new_tokens", "0")])
def test_a_bad_probe_option_is_one_sentence_before_any_run_directory(tmp_path, capsys, monkeypatch, option, value):
    # The config's seed_everything sets these for the process: they must not outlive the test (a DDP test's
    # training order depends on PL_GLOBAL_SEED).
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    args = cli_args(tmp_path, "fit", "--config", str(ROOT / "configs/demo.yaml"), f"--latency.{option}", value)
    assert run_main(*args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qlit: error: latency.{option} must be") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "logs").exists()
