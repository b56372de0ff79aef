"""`qlit fit` on two CPU processes (DDP over gloo), as a user starts it: training, validation, the adapter, resume
(sharded training: tests/test_fsdp2.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT, scalars
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
