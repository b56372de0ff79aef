"""All callbacks on a tiny CPU fit + test + predict, read back from TensorBoard's event files."""

from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_lm import TinyLM, cpu_trainer, loader

from qlit.callbacks import (
    GPUMemoryMonitor,
    InferenceLatencyMonitor,
    TokenThroughputMonitor,
    TrainableParamsMonitor,
    TrainingTimeMonitor,
)


def test_every_metric_reaches_tensorboard_with_plausible_values(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    callbacks = [
        GPUMemoryMonitor(log_every_n_steps=2),
        # CPUs have no known bf16 peak: give one so that MFU is logged too.
        TokenThroughputMonitor(log_every_n_steps=2, warmup_steps=1, peak_flops=1e12),
        TrainableParamsMonitor(),
        InferenceLatencyMonitor(),
        TrainingTimeMonitor(),
    ]
    trainer = cpu_trainer(
        max_steps=5,
        accumulate_grad_batches=1,
        val_check_interval=3,
        limit_val_batches=1,
        logger=logger,
        callbacks=callbacks,
    )
    module = TinyLM()
    trainer.fit(module, train_dataloaders=loader(5), val_dataloaders=loader(1))
    trainer.test(module, dataloaders=loader(1), verbose=False)
    trainer.predict(module, dataloaders=loader(1), return_predictions=False)

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    def last(name: str) -> float:
        assert name in scalars, f"{name} missing from {sorted(scalars)}"
        return scalars[name][-1]

    assert 0.05 < last("cpu/peak_rss_gib") < 1024
    assert len(scalars["cpu/peak_rss_gib"]) >= 2
    for name in ("train/tokens_per_sec", "train/padded_tokens_per_sec", "train/samples_per_sec"):
        assert last(name) > 0
    assert last("train/tokens_per_sec") < last("train/padded_tokens_per_sec")  # the batches hold padding
    assert 0 < last("train/padding_fraction") < 1
    assert 0 < last("train/step_time_sec") < 60
    assert last("train/model_tflops_per_sec") > 0
    assert 0 < last("train/mfu") < 1
    assert last("params/total") == last("params/trainable") > 0
    assert 0 < last("params/trainable_ratio") <= 1
    assert 0 < last("params/weight_gib") < 1
    for stage in ("val", "test", "predict"):
        assert last(f"{stage}/latency_ms_p95") >= last(f"{stage}/latency_ms_mean") > 0
        assert last(f"{stage}/gen_tokens_per_sec") > 0
    assert 0 < last("time/setup_seconds") <= last("time/first_step_seconds") <= last("time/fit_seconds")
    # The hyperparameter table holds the counts next to the module's hyperparameters.
    assert logger.hparams["params/trainable"] == last("params/trainable")
    assert "train_seconds" in logger.hparams
