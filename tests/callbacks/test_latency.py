"""Generation latency and generated tokens/s from the steps' ``"generation"`` records."""

from types import SimpleNamespace

import pytest
from tiny_lm import NEW_TOKENS, RecordingLogger, TinyLM, cpu_trainer, loader

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


def test_test_results_and_predict_go_to_the_logger():
    logger = RecordingLogger()
    monitor = InferenceLatencyMonitor()
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
