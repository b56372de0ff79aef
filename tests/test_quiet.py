"""A plain `qlit fit` prints no library advice: each hint the libraries print on a GPU run is gone at its source, or
turned into one qlit line the user can act on. Here the sources a CPU can reach; tests/test_gpu_console.py runs the
GPU config on a GPU."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import torch
from helpers import ROOT, scalars
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from qlit.cli import main
from qlit.trainer_cli import matmul_precision

# configs/qwen_qlora.yaml's trainer, model and data on the CPU: the tiny model, the bundled sample, torch's AdamW
# for bitsandbytes' paged one (CUDA memory), 32 rows (2 batches of 16, fewer than its log_every_n_steps of 10).
GPU_SHAPED = [
    *("fit", "--config", str(ROOT / "configs/qwen_qlora.yaml"), "--trainer.accelerator", "cpu"),
    *("--model.init_args.pretrained", "qlit-tiny/qwen2", "--data.init_args.path", "qlit-samples/sst2"),
    *("--model.init_args.optimizer", "torch.optim.AdamW", "--model.init_args.optimizer.lr", "0.001"),
    *("--data.init_args.limit_train_samples", "32", "--data.init_args.limit_val_samples", "8"),
    *("--data.init_args.num_workers", "0", "--trainer.val_check_interval", "1.0"),
    *("--latency.probe_samples", "1", "--latency.probe_new_tokens", "2"),
]


def in_tmp(tmp_path, *args: str) -> list[str]:
    """``args`` with the run's logs and checkpoints under ``tmp_path`` (the config's progress bar kept)."""
    return [
        *args,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]


def fit_recording_warnings(tmp_path, *extra: str) -> list[str]:
    """Run ``qlit fit`` of the GPU-shaped config in-process; the warnings that reached the console."""
    with warnings.catch_warnings(record=True) as caught:
        try:
            main(in_tmp(tmp_path, *GPU_SHAPED, *extra))
        except SystemExit as exit_:
            assert not exit_.code, exit_.code
    return [str(w.message) for w in caught]


def test_lightnings_dataloader_and_logging_interval_hints_do_not_reach_the_console(tmp_path, monkeypatch, caplog):
    # On a machine of more cores than this one, Lightning suggests worker processes for both loaders.
    monkeypatch.setattr("lightning.pytorch.trainer.connectors.data_connector.suggested_max_num_workers", lambda n: 8)
    with caplog.at_level(logging.INFO):
        shown = fit_recording_warnings(tmp_path)
    hints = ("does not have many workers", "smaller than the logging interval")
    assert [m for m in shown if any(hint in m for hint in hints)] == [], shown
    # The fit's 2 steps are fewer than log_every_n_steps: one qlit line says so, and the loss is logged anyway.
    assert "This fit has 2 optimizer steps, fewer than trainer.log_every_n_steps (10)" in caplog.text, caplog.text
    assert "train/loss" in scalars(tmp_path / "logs")


def test_the_hints_are_lightnings_own(tmp_path, monkeypatch):
    """Without qlit's console settings (``python -W``: the user asks for every warning) the same run shows both
    hints: the test above would see them if they came."""
    monkeypatch.setattr("lightning.pytorch.trainer.connectors.data_connector.suggested_max_num_workers", lambda n: 8)
    monkeypatch.setattr("sys.warnoptions", ["default"])
    shown = fit_recording_warnings(tmp_path, "--trainer.limit_val_batches", "0")
    assert any("does not have many workers" in m for m in shown), shown
    assert any("smaller than the logging interval" in m for m in shown), shown


def test_auto_matmul_precision_is_tf32_on_cuda_only():
    # Lightning advises set_float32_matmul_precision on a CUDA device with tensor cores unless it is set.
    cuda, cpu = SimpleNamespace(accelerator=CUDAAccelerator()), SimpleNamespace(accelerator=CPUAccelerator())
    assert matmul_precision("auto", cuda) == "high"
    assert matmul_precision("auto", cpu) is None
    assert matmul_precision("medium", cpu) == "medium"


def test_a_run_sets_its_matmul_precision_and_restores_the_processs(tmp_path, monkeypatch):
    seen = []
    setter = torch.set_float32_matmul_precision
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: (seen.append(p), setter(p)))

    before = torch.get_float32_matmul_precision()
    args = [*GPU_SHAPED, "--matmul_precision", "medium", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    main(in_tmp(tmp_path, *args))
    assert seen == ["medium", before]
    assert torch.get_float32_matmul_precision() == before
    assert "matmul_precision: medium" in next((tmp_path / "logs").rglob("config.yaml")).read_text()


def test_a_forward_that_falls_back_to_use_return_dict_is_given_return_dict(tiny_qwen2, monkeypatch):
    """Liger's fused-loss forwards read ``config.use_return_dict`` (deprecated in transformers 5, with a warning)
    unless the caller names ``return_dict``: qlit's training step names it."""
    from transformers import Qwen2ForCausalLM

    from qlit.data import SST2DataModule
    from qlit.models.quantization import Quantization
    from qlit.module import QLitModule

    plain = Qwen2ForCausalLM.forward

    def liger_like(self, *args, return_dict=None, **kwargs):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        return plain(self, *args, return_dict=return_dict, **kwargs)

    monkeypatch.setattr(Qwen2ForCausalLM, "forward", liger_like)
    logging.Logger.warning_once.cache_clear()  # shown once per process: this test's count starts afresh
    from peft import LoraConfig

    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        quantization=Quantization(mode="none"),
        adapter=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    module.configure_model()
    data = SST2DataModule(tokenizer="qlit-tiny/qwen2", path="qlit-samples/sst2", batch_size=2, packing=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    config_log = logging.getLogger("transformers.configuration_utils")
    config_log.addHandler(handler)
    level = config_log.level
    config_log.setLevel(logging.WARNING)  # an earlier test in this process may have quietened transformers' loggers
    try:
        module(batch).loss.backward()
        assert [r for r in records if "use_return_dict" in r] == []
        module.model(input_ids=batch["input_ids"])  # the same forward, called without return_dict: the warning
        assert [r for r in records if "use_return_dict" in r] != []
    finally:
        config_log.removeHandler(handler)
        config_log.setLevel(level)


def test_pytorchs_note_that_it_set_the_cublas_context_itself_goes_and_other_warnings_stay(monkeypatch):
    from qlit.trainer_cli import quiet_console

    monkeypatch.setattr("sys.warnoptions", [])
    with warnings.catch_warnings(record=True) as caught:
        quiet_console()
        # As PyTorch raises it (TORCH_WARN_ONCE in its cuBLAS handle pool), replayed on the thread that ran backward.
        warnings.warn(
            "Attempting to run cuBLAS, but there was no current CUDA context! Attempting to set the primary context... "
            "(Triggered internally at /pytorch/aten/src/ATen/cuda/CublasHandlePool.cpp:180.)",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("a warning about this run", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning about this run"]
