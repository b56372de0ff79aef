"""The console of a GPU run: a plain `qlit fit` of the GPU config prints qlit's lines and the progress, and none of
the libraries' advice to their own developers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.gpu

#: What the libraries printed on a GPU run before qlit dealt with each: the source, and a piece of its text.
GPU_NOISE = {
    "Lightning's TF32 hint": "set_float32_matmul_precision",
    "Lightning's DataLoader workers hint": "does not have many workers",
    "Lightning's log_every_n_steps hint": "smaller than the logging interval",
    "transformers' use_return_dict deprecation": "use_return_dict",
    "cuBLAS without a CUDA context": "no current CUDA context",
    "AccumulateGrad's stream mismatch (CUDA graphs)": "AccumulateGrad",
    "any other Python warning": "Warning:",
}


def test_a_plain_gpu_fit_prints_no_library_advice(tmp_path):
    # configs/qwen_qlora.yaml as it is (bf16, NF4, Liger's kernels where installed, packed batches, CUDA graphs on
    # the layers auto keeps), on the tiny model and the bundled sample: 64 rows are 2 packed batches an epoch, fewer
    # than its log_every_n_steps (10), and 3 epochs are 6 steps, fewer too.
    args = [
        *("fit", "--config", str(ROOT / "configs/qwen_qlora.yaml")),
        *("--model.init_args.pretrained", "qlit-tiny/qwen2", "--data.init_args.path", "qlit-samples/sst2"),
        *("--data.init_args.limit_train_samples", "64", "--data.init_args.limit_val_samples", "32"),
        *("--trainer.max_epochs", "3", "--trainer.val_check_interval", "1.0"),
        *("--latency.probe_samples", "2", "--latency.probe_new_tokens", "4"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "qlit", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    assert {source: text for source, text in GPU_NOISE.items() if text in console} == {}, console[-6000:]
    assert "CUDA graphs off" not in console, console[-3000:]  # the graphed path ran, where the stream warning was
    assert "fewer than trainer.log_every_n_steps (10)" in done.stderr  # the one line that replaces the hint
    assert done.stderr.strip().splitlines()[-1].startswith("qwen_qlora: val/accuracy ")
