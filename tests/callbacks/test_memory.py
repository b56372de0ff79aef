"""Memory monitor: resident memory on CPU (said once), GPU peaks against CUDA's own counter on a GPU."""

import logging

import pytest
import torch
from tiny_lm import RecordingLogger, TinyLM, cpu_trainer, loader

from qlit.callbacks import GPUMemoryMonitor


def test_cpu_fallback_logs_peak_rss_every_n_steps_and_says_so_once(caplog: pytest.LogCaptureFixture):
    logger = RecordingLogger()
    monitor = GPUMemoryMonitor(log_every_n_steps=2)
    trainer = cpu_trainer(max_steps=4, max_epochs=1, logger=logger, callbacks=[monitor])
    with caplog.at_level(logging.INFO):
        trainer.fit(TinyLM(), train_dataloaders=loader(4))
        trainer.fit(TinyLM(), train_dataloaders=loader(4))  # a second fit does not repeat the line
    said = [r for r in caplog.records if "GPUMemoryMonitor" in r.getMessage()]
    assert len(said) == 1 and "cpu/peak_rss_gib" in said[0].getMessage()
    rss = logger.series("cpu/peak_rss_gib")
    # Steps 2 and 4, then the epoch end (step 4); both fits log.
    assert [s for s, _ in rss[:3]] == [2, 4, 4]
    # A Python process with torch and transformers loaded holds well over 100 MiB, and less than the machine.
    assert all(0.1 < v < 1024 for _, v in rss)
    assert not any(name.startswith("gpu/") for _, m in logger.records for name in m)


def test_memory_held_by_cuda_graphs_counts_as_allocated(monkeypatch):
    """The activations CUDA graphs keep between replays are free blocks of their pool to the allocator's counters:
    the monitor adds what the module says its graphs hold to both allocated figures, and nothing to reserved."""
    gib = 2**30
    stats = {
        "allocated_bytes.all.current": 2 * gib,
        "allocated_bytes.all.peak": 3 * gib,
        "reserved_bytes.all.current": 6 * gib,
        "reserved_bytes.all.peak": 7 * gib,
    }
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: stats)
    monitor = GPUMemoryMonitor()
    monitor._device = torch.device("cuda", 0)
    assert monitor.read() == {
        "gpu/allocated_gib": 2.0,
        "gpu/reserved_gib": 6.0,
        "gpu/peak_allocated_gib": 3.0,
        "gpu/peak_reserved_gib": 7.0,
    }
    held = monitor.read(held_bytes=gib // 2)
    assert (held["gpu/allocated_gib"], held["gpu/peak_allocated_gib"]) == (2.5, 3.5)
    assert (held["gpu/reserved_gib"], held["gpu/peak_reserved_gib"]) == (6.0, 7.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nf4_run_peak_matches_cuda_counter(tmp_path):
    import peft
    import transformers
    from lightning.pytorch import Trainer

    class NF4LM(TinyLM):
        def configure_model(self) -> None:
            if self.model is not None:
                return
            torch.manual_seed(0)
            config = transformers.Qwen2Config(
                hidden_size=512,
                intermediate_size=1536,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=2,
                vocab_size=128,
            )
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
            bnb = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
            base = transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path / "base", quantization_config=bnb, device_map={"": torch.cuda.current_device()}
            )
            self.model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    logger = RecordingLogger()
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=4,
        logger=logger,
        callbacks=[GPUMemoryMonitor(log_every_n_steps=1)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(NF4LM(), train_dataloaders=loader(4))
    logged = logger.series("gpu/peak_allocated_gib")[-1][1]
    independent = torch.cuda.max_memory_allocated() / 2**30
    assert logged == pytest.approx(independent, rel=0.05)
    assert 0 < logger.series("gpu/allocated_gib")[-1][1] <= logged
    assert logger.series("gpu/reserved_gib")[-1][1] >= logger.series("gpu/allocated_gib")[-1][1]
