"""Exact resume: a run stopped and resumed follows the uninterrupted trajectory; SIGTERM leaves a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli_args, run_cli, scalars

# fp32 end to end (no quantization), so that identical computations give identical numbers.
FP32 = [
    "--config",
    str(ROOT / "configs/demo.yaml"),
    "--model.init_args.quantization.mode",
    "none",
    "--model.init_args.quantization.double_quant",
    "false",
    "--model.init_args.dtype",
    "float32",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.limit_val_batches",
    "0",
    "--trainer.max_epochs",
    "-1",
    # 4 batches an epoch, so the 6 steps cross an epoch boundary and the per-epoch shuffle is exercised too.
    "--trainer.limit_train_batches",
    "4",
    "--checkpoint.monitor",
    "null",
    "--checkpoint.save_top_k",
    "-1",
    "--checkpoint.every_n_train_steps",
    "3",
]


def losses(cli) -> dict[int, float]:
    return dict(scalars(cli.trainer.log_dir)["train/loss"])


def test_stopped_and_resumed_run_matches_the_uninterrupted_one(tmp_path):
    whole = run_cli(tmp_path / "whole", "fit", *FP32, "--trainer.max_steps", "6")
    first = run_cli(tmp_path / "part", "fit", *FP32, "--trainer.max_steps", "3")
    ckpt = next((Path(first.trainer.log_dir) / "checkpoints").glob("*step=3*.ckpt"))
    rest = run_cli(tmp_path / "part", "fit", *FP32, "--trainer.max_steps", "6", "--ckpt_path", str(ckpt))

    expected = losses(whole)
    got = {**losses(first), **losses(rest)}
    assert sorted(expected) == sorted(got) == [0, 1, 2, 3, 4, 5]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), (step, got, expected)
    assert sorted(losses(rest)) == [3, 4, 5]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_fit_writes_a_checkpoint_that_resumes(tmp_path, sig):
    args = cli_args(tmp_path, "fit", *FP32, "--trainer.max_steps", "100000", "--checkpoint.every_n_train_steps", "0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlit", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    # Training has begun once a step's loss is logged (every step here): Lightning installs its signal handlers only
    # after set-up and model loading, and the logger's event file exists from set-up on, so that is too early a cue.
    deadline = time.monotonic() + 180
    while "train/loss" not in scalars(tmp_path / "logs") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    state = torch.load(last, map_location="cpu", weights_only=True)
    stopped_at = state["global_step"]
    assert stopped_at > 0, output
    assert f"step {stopped_at}" in output

    resumed = run_cli(tmp_path, "fit", *FP32, "--trainer.max_steps", str(stopped_at + 2), "--ckpt_path", str(last))
    assert resumed.trainer.global_step == stopped_at + 2
    assert sorted(losses(resumed)) == [stopped_at, stopped_at + 1]
