"""Fixtures shared by the callback tests (helpers live in ``tiny_lm.py``)."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_lm import DEMO_PROBE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _small_threads():
    # Two shared CPU cores: more threads than that only slows the tiny model down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``qlit fit --config configs/demo.yaml`` as a user runs it (a subprocess, its own console), made tiny: SST-2's
    sample, NF4 + LoRA, two steps, one validation pass. Gives its exit code, stdout, stderr, folder and run folder."""
    work = tmp_path_factory.mktemp("demo-run")
    args = [
        *("fit", "--config", str(ROOT / "configs/demo.yaml")),
        *("--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"),
        *("--trainer.log_every_n_steps", "1", "--data.init_args.batch_size", "4"),
        *("--data.init_args.limit_train_samples", "16", "--data.init_args.limit_val_samples", "8"),
        *("--latency.probe_samples", str(DEMO_PROBE[0]), "--latency.probe_new_tokens", str(DEMO_PROBE[1])),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)  # it would ask for every warning
    done = subprocess.run(
        [sys.executable, "-m", "qlit", *args], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = {p.parent for p in (work / "logs").rglob("events.out.tfevents.*")}
    return SimpleNamespace(stdout=done.stdout, stderr=done.stderr, cwd=work, run_dir=run_dir)
