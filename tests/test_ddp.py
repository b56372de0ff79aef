"""`qlit fit` on two CPU processes (DDP over gloo), as a user starts it: training, validation, the adapter, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT, run_main, scalars
from lightning.pytorch import Callback, LightningModule, Trainer

from qlit.batch import IGNORE_INDEX


class RankRecord(Callback):
    """Writes, per rank, what Lightning reports after each validation and this rank's own share of the val loss.

    Args:
        directory: where ``rank<N>.json`` goes.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.records: list[dict[str, Any]] = []
        self._loss_sum = 0.0
        self._tokens = 0

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self._loss_sum += float(outputs["loss"]) * tokens
        self._tokens += tokens

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.records.append(
            {"step": trainer.global_step, "logged": logged, "loss_sum": self._loss_sum, "tokens": self._tokens}
        )
        self._loss_sum, self._tokens = 0.0, 0

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"world_size": trainer.world_size, "step": trainer.global_step, "validations": self.records}
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def ddp_fit(tmp_path: Path, records: Path, *args: str) -> subprocess.CompletedProcess:
    """``qlit fit`` of the tiny demo (fp32, no quantization) on 2 CPU processes, as the shell starts it."""
    extra = tmp_path / f"record-{records.name}.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n    - class_path: test_ddp.RankRecord\n"
        f"      init_args:\n        directory: {json.dumps(str(records))}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    command = [
        *(sys.executable, "-m", "qlit", "fit", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(extra)),
        *("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"),
        *("--model.init_args.quantization.mode", "none", "--model.init_args.quantization.double_quant", "false"),
        *("--trainer.max_epochs", "-1", "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0"),
        *(
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.limit_train_batches",
            "4",
        ),
        *("--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "4"),
        *("--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false"),
        *("--trainer.enable_model_summary", "false"),
        *args,
    ]
    try:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:  # a rank waiting in a collective the other never joins
        pytest.fail(f"qlit fit on 2 processes did not end: {(err.stderr or b'')[-3000:]!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def ranks(records: Path) -> list[dict[str, Any]]:
    return [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch build has no torch.distributed")
def test_two_process_fit_saves_one_adapter_syncs_validation_and_resumes(tmp_path, tiny_qwen2):
    # tiny_qwen2: built once here, not by both ranks at once.
    ddp_fit(tmp_path, tmp_path / "first", "--trainer.max_steps", "2")

    runs = sorted((tmp_path / "logs" / "demo").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # one run directory, whatever the number of ranks
    adapters = sorted(p.parent for p in (tmp_path / "logs").rglob("adapter_config.json"))
    assert adapters == [runs[0] / "adapter"]
    assert {"adapter_model.safetensors", "qlit_base.json", "tokenizer_config.json"} <= {
        p.name for p in adapters[0].iterdir()
    }

    first = ranks(tmp_path / "first")
    assert [r["world_size"] for r in first] == [2, 2] and [r["step"] for r in first] == [2, 2]
    (zero,), (one,) = first[0]["validations"], first[1]["validations"]
    # Each rank scored its own rows (their local losses differ), yet both report the same metrics: the mean over
    # every answer token of both ranks' rows.
    assert zero["tokens"] > 0 and one["tokens"] > 0
    assert zero["loss_sum"] / zero["tokens"] != pytest.approx(one["loss_sum"] / one["tokens"])
    assert set(zero["logged"]) >= {"val/loss", "val/perplexity", "val/accuracy"}
    assert zero["logged"] == pytest.approx(one["logged"])
    both = (zero["loss_sum"] + one["loss_sum"]) / (zero["tokens"] + one["tokens"])
    assert zero["logged"]["val/loss"] == pytest.approx(both, rel=1e-5)

    # Resume on two processes from the run's last checkpoint: it continues at step 2 and trains steps 2 and 3.
    last = runs[0] / "checkpoints" / "last.ckpt"
    ddp_fit(tmp_path, tmp_path / "resumed", "--trainer.max_steps", "4", "--ckpt_path", str(last))
    resumed = ranks(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [4, 4]
    assert [v["step"] for v in resumed[0]["validations"]] == [4]
    assert resumed[0]["validations"][0]["logged"] == pytest.approx(resumed[1]["validations"][0]["logged"])
    second = tmp_path / "logs" / "demo" / "version_1"
    assert sorted(step for step, _ in scalars(second)["train/loss"]) == [2, 3]
    assert (second / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_qlora_config_builds_a_sharding_strategy_by_decoder_layer(capsys):
    # Lightning refuses FSDP on a CPU (it requires a GPU accelerator), so the strategy is built from the parsed
    # config without a Trainer; the run itself needs two GPUs.
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from qlit.models.quantization import Quantization

    assert run_main("fit", "--config", str(ROOT / "configs/qwen_qlora_fsdp.yaml"), "--print_config") == 0
    config = yaml.safe_load(capsys.readouterr().out)
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config["trainer"]["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy)
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(wrap, ModuleWrapPolicy) and wrap._module_classes == {Qwen2DecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Qwen2DecoderLayer}
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "full"
    assert strategy.kwargs["use_orig_params"]  # frozen 4-bit and trainable LoRA weights in one unit

    # One dtype in every unit: packed 4-bit storage, the other weights, and FSDP's bf16 policy for the LoRA weights.
    precision = FSDPPrecision(config["trainer"]["precision"]).mixed_precision_config
    assert precision.param_dtype == precision.reduce_dtype == torch.bfloat16
    model = config["model"]["init_args"]
    quantization = Quantization(**model["quantization"])
    assert quantization.quant_storage == quantization.compute_dtype == model["dtype"] == "bfloat16"
    assert model["gradient_checkpointing"] is False and model["prepare_kbit"] is False
    assert model["save_adapter"] is False  # the end-of-fit export would read FSDP shards on rank 0 alone


def test_nf4_stored_as_bf16_packs_its_weights_in_bf16_and_trains_a_step(tmp_path, tiny_qwen2):
    import bitsandbytes as bnb
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from peft import LoraConfig

    from qlit.models.quantization import Quantization
    from qlit.module import QLitModule

    quantization = Quantization(mode="nf4", compute_dtype="bfloat16", quant_storage="bfloat16")
    adapter = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    module = QLitModule(
        pretrained="qlit-tiny/qwen2", quantization=quantization, dtype="bfloat16", adapter=adapter, prepare_kbit=False
    )
    module.configure_model()
    packed = [m.weight for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert packed and {w.dtype for w in packed} == {torch.bfloat16}
    # Two 4-bit weights to a byte: a bf16 element holds four.
    assert all(w.numel() * 4 == w.quant_state.shape.numel() for w in packed)
    # peft keeps the LoRA weights in fp32; under bf16-true Lightning casts the module before FSDP wraps it, leaving one
    # dtype in every unit as FSDP needs to flatten it, and the packed weights intact.
    before = [w.detach().view(torch.uint8).clone() for w in packed]  # bytes: some read as bf16 NaNs
    assert torch.float32 in {p.dtype for p in module.model.parameters()}
    module = FSDPPrecision("bf16-true").convert_module(module)
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    after = [m.weight for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(torch.equal(w.view(torch.uint8), b) for w, b in zip(after, before, strict=True))

    lora = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    batch = {"input_ids": torch.randint(1, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-2)
    loss = module.model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    moved = [n for n, p in module.model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert moved and len(moved) == len(lora) // 2  # every LoRA B moved off zero (A's gradient is zero at step 1)
