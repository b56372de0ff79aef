"""Fit wall time and time to the first optimizer step, with a fake clock."""

import pytest
from tiny_lm import FakeClock, RecordingLogger, TinyLM, cpu_trainer, loader

import qlit.callbacks.timing as timing
from qlit.callbacks import TrainingTimeMonitor


def test_setup_first_step_and_fit_seconds(monkeypatch: pytest.MonkeyPatch):
    clock = FakeClock()
    monkeypatch.setattr(timing, "perf_counter", clock)
    logger = RecordingLogger()
    trainer = cpu_trainer(max_steps=3, accumulate_grad_batches=2, logger=logger, callbacks=[TrainingTimeMonitor()])
    # configure_model (the model load) takes 3 s, each micro-batch 0.5 s: the first step ends after two of them.
    trainer.fit(TinyLM(clock=clock, load_seconds=3.0, train_seconds=0.5), train_dataloaders=loader(6))
    assert logger.series("time/setup_seconds") == [(1, 3.0)]
    assert logger.series("time/first_step_seconds") == [(1, 4.0)]
    assert logger.series("time/fit_seconds") == [(3, pytest.approx(3.0 + 6 * 0.5))]
