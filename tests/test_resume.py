"""Exact resume: a run stopped and resumed follows the uninterrupted trajectory; SIGTERM leaves a checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli_args, run_cli, run_main, scalars
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qlit.data.batching import data_loader
from qlit.trainer_cli import TRAINER_DEFAULTS, QlitCLI

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


def per_step(log_dir: Path, tag: str = "train/loss") -> dict[int, list[float]]:
    """Every value logged under ``tag`` in all the runs under ``log_dir``, by step."""
    out: dict[int, list[float]] = {}
    for step, value in scalars(log_dir)[tag]:
        out.setdefault(step, []).append(value)
    return out


def assert_same_trajectory(got: dict[int, list[float]], expected: dict[int, list[float]]) -> None:
    assert sorted(got) == sorted(expected), (got, expected)
    for step, values in expected.items():
        assert got[step] == pytest.approx(values, abs=1e-6), (step, got, expected)


def fit(tmp_path: Path, *args: str, callbacks: tuple[Callback, ...] = ()) -> QlitCLI:
    """``qlit fit`` with the FP32 options, ``args`` and extra callbacks (those the tests interrupt runs with)."""
    defaults = {**TRAINER_DEFAULTS, "callbacks": list(callbacks)}
    return QlitCLI(args=cli_args(tmp_path, "fit", *FP32, *args), trainer_defaults=defaults)


class SignalAtBatch(Callback):
    """Sends this process ``sig`` as the ``batch``-th training batch of the run (counted from 0) starts."""

    def __init__(self, batch: int, sig: int = signal.SIGTERM) -> None:
        self.batch, self.sig, self.seen = batch, sig, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen == self.batch:
            os.kill(os.getpid(), self.sig)
        self.seen += 1


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory) -> dict[int, list[float]]:
    """An uninterrupted run of two epochs of 4 batches: the trajectory the resumed runs below must follow."""
    tmp = tmp_path_factory.mktemp("whole")
    fit(tmp, "--trainer.max_steps", "8", "--checkpoint.every_n_train_steps", "0")
    return per_step(tmp / "logs")


@pytest.fixture
def lightning_log(caplog):
    # Lightning's logger keeps its messages to itself when the root logger had no handler at import time.
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_stopped_and_resumed_run_matches_the_uninterrupted_one(tmp_path, eight_steps):
    first = run_cli(tmp_path, "fit", *FP32, "--trainer.max_steps", "3")
    ckpt = next((Path(first.trainer.log_dir) / "checkpoints").glob("*step=3*.ckpt"))
    rest = run_cli(tmp_path, "fit", *FP32, "--trainer.max_steps", "8", "--ckpt_path", str(ckpt))
    assert sorted(losses(rest)) == [3, 4, 5, 6, 7]
    assert_same_trajectory(per_step(tmp_path / "logs"), eight_steps)


def test_sigterm_during_fit_writes_a_checkpoint_that_resumes(tmp_path):
    """As a scheduler stops a job: ``qlit fit`` in its own process, SIGTERM from outside."""
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
    deadline = time.monotonic() + 600
    while "train/loss" not in scalars(tmp_path / "logs") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert_checkpoint_resumes(tmp_path, output)


def test_ctrl_c_during_fit_writes_a_checkpoint_that_resumes(tmp_path, capsys, lightning_log):
    """Ctrl+C: SIGINT to ``qlit fit`` (run in this process, the signal sent by a callback as batch 2 starts)."""
    interrupt = tmp_path / "interrupt.yaml"
    interrupt.write_text(
        "trainer:\n  callbacks:\n    - class_path: test_resume.SignalAtBatch\n"
        f"      init_args:\n        batch: 2\n        sig: {int(signal.SIGINT)}\n"
    )
    args = cli_args(tmp_path, "fit", *FP32, "--config", str(interrupt), "--trainer.max_steps", "100000")
    code = run_main(*args, "--checkpoint.every_n_train_steps", "0")
    captured = capsys.readouterr()
    assert code == 143, captured.err[-3000:]
    assert_checkpoint_resumes(tmp_path, lightning_log.text + captured.err)


def assert_checkpoint_resumes(tmp_path: Path, output: str) -> None:
    """The interrupted run's ``last.ckpt`` names its step in the console and resumes there."""
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    state = torch.load(last, map_location="cpu", weights_only=True)
    stopped_at = state["global_step"]
    assert stopped_at > 0, output
    assert f"step {stopped_at}" in output

    resumed = run_cli(tmp_path, "fit", *FP32, "--trainer.max_steps", str(stopped_at + 2), "--ckpt_path", str(last))
    assert resumed.trainer.global_step == stopped_at + 2
    assert sorted(losses(resumed)) == [stopped_at, stopped_at + 1]


def test_a_finished_run_trained_longer_re_plans_its_schedule(tmp_path, eight_steps, lightning_log):
    # The first run finishes after one epoch (4 steps, all in the demo's 5-step warm-up, where the schedule does not
    # depend on its length); resumed for two epochs, the schedule is re-planned for 8 steps, so the whole trajectory
    # is the uninterrupted 8-step run's. Before, the stored 4-step plan put the learning rate at 0 from step 6 on.
    fit(tmp_path, "--trainer.max_epochs", "1", "--checkpoint.every_n_train_steps", "0")
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    lightning_log.clear()
    fit(tmp_path, "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "0", "--ckpt_path", str(last))

    assert_same_trajectory(per_step(tmp_path / "logs"), eight_steps)
    lrs = per_step(tmp_path / "logs", "lr-AdamW")
    assert sorted(lrs) == list(range(8))
    assert all(value > 0 for values in lrs.values() for value in values), lrs
    replanned = [r.getMessage() for r in lightning_log.records if "re-planned" in r.getMessage()]
    assert replanned, lightning_log.text
    assert "Resuming at step 4" in replanned[0] and "total_steps 4 -> 8" in replanned[0], replanned


def test_a_checkpoint_on_a_limited_epochs_last_batch_resumes_at_the_next_epochs_start(tmp_path, eight_steps):
    # Under limit_train_batches the epoch ends before the loader does: the position stored with the checkpoint
    # (4 batches) belongs to epoch 0 and must not be skipped in epoch 1.
    fit(tmp_path, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "4")
    ckpt = next((tmp_path / "logs").rglob("*step=4*.ckpt"))
    fit(tmp_path, "--trainer.max_steps", "8", "--checkpoint.every_n_train_steps", "0", "--ckpt_path", str(ckpt))
    assert_same_trajectory(per_step(tmp_path / "logs"), eight_steps)


def test_sigterm_on_an_epochs_last_batch_resumes_at_the_next_epochs_start(tmp_path, eight_steps):
    with pytest.raises(SIGTERMException):
        fit(
            tmp_path, "--trainer.max_steps", "8", "--checkpoint.every_n_train_steps", "0", callbacks=(SignalAtBatch(3),)
        )
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    fit(tmp_path, "--trainer.max_steps", "8", "--checkpoint.every_n_train_steps", "0", "--ckpt_path", str(last))
    assert_same_trajectory(per_step(tmp_path / "logs"), eight_steps)


class RecordBatches(Callback):
    """Every training batch a run trains: (step, epoch, index in the epoch, its input ids)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, list[list[int]]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, trainer.current_epoch, batch_idx, batch["input_ids"].tolist()))


# Two epochs of 4 batches bounded by max_epochs alone (the 8 steps are Lightning's estimate, not max_steps).
TWO_EPOCHS = ["--trainer.max_epochs", "2", "--trainer.max_steps", "-1"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> tuple[Path, dict[int, list[float]], list]:
    """The uninterrupted max_epochs-bounded run: its folder (checkpoints at steps 3 and 6), losses and batches."""
    tmp = tmp_path_factory.mktemp("epochs")
    record = RecordBatches()
    fit(tmp, *TWO_EPOCHS, callbacks=(record,))
    return tmp, per_step(tmp / "logs"), record.seen


def assert_continues(tmp_path: Path, two_epochs, ckpt: Path, *args: str) -> None:
    """Resumed from ``ckpt`` under max_epochs, the run trains the rest of the uninterrupted run's batches, in order,
    with its losses."""
    _, whole_losses, whole_batches = two_epochs
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    record = RecordBatches()
    fit(tmp_path, *TWO_EPOCHS, *args, "--ckpt_path", str(ckpt), callbacks=(record,))
    # Before, estimated_stepping_batches (asked for the schedule's length before the checkpoint was restored) made
    # Lightning create the loader's iterator early, so the restored position never reached it: the epoch restarted
    # at batch 0 and the losses left the uninterrupted run's from the first resumed step on.
    assert record.seen == [b for b in whole_batches if b[0] >= step]
    assert_same_trajectory(per_step(tmp_path / "logs"), {s: v for s, v in whole_losses.items() if s >= step})


@pytest.mark.parametrize("step", [3, 6], ids=["epoch0", "epoch1"])
def test_a_mid_epoch_checkpoint_resumes_where_it_stopped_under_max_epochs(tmp_path, two_epochs, step):
    ckpt = next((two_epochs[0] / "logs").rglob(f"*step={step}.ckpt"))
    assert_continues(tmp_path, two_epochs, ckpt, "--checkpoint.every_n_train_steps", "0")


def test_sigterm_mid_epoch_resumes_where_it_stopped_under_max_epochs(tmp_path, two_epochs):
    part = tmp_path / "part"
    with pytest.raises(SIGTERMException):
        fit(part, *TWO_EPOCHS, "--checkpoint.every_n_train_steps", "0", callbacks=(SignalAtBatch(1),))
    last = next((part / "logs").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    assert_continues(tmp_path / "rest", two_epochs, last, "--checkpoint.every_n_train_steps", "0")


def test_sigterm_between_accumulated_micro_batches_finishes_the_optimizer_step(tmp_path):
    accumulate = ["--trainer.accumulate_grad_batches", "2", "--checkpoint.every_n_train_steps", "0"]
    fit(tmp_path / "whole", *accumulate, "--trainer.max_steps", "5")
    # The signal comes as micro-batch 4 (the first half of step 3, epoch 1) starts: the run finishes micro-batch 5,
    # steps, and writes its checkpoint there, mid-epoch; the resumed run goes on with micro-batch 6.
    part = tmp_path / "part"
    with pytest.raises(SIGTERMException):
        fit(part, *accumulate, "--trainer.max_steps", "5", callbacks=(SignalAtBatch(4),))
    last = next((part / "logs").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    fit(part, *accumulate, "--trainer.max_steps", "5", "--ckpt_path", str(last))
    # A step logs the loss of its last micro-batch; a lost half of step 3's gradient shows in step 4's loss.
    assert_same_trajectory(per_step(part / "logs"), per_step(tmp_path / "whole" / "logs"))


# ----- the loader's position, without a trainer ------------------------------------------------------------------
ROWS = [{"input_ids": [1] * (2 + i % 5), "labels": [1] * (2 + i % 5), "prompt_length": 1, "row": i} for i in range(24)]


def _loader(packed: bool, done: list[int]):
    """A training loader of ``ROWS`` whose batches are the row numbers; ``done[0]`` plays the trainer's count."""
    return data_loader(
        ROWS,
        lambda rows: [r["row"] for r in rows],
        batch_size=4,
        shuffle=True,
        seed=7,
        max_tokens=16 if packed else None,
        batches_done=lambda: done[0],
    )


def _epoch(loader, epoch: int) -> list[list[int]]:
    # Lightning's order: iter() first (in set-up), then the epoch is set, then the first batch is fetched.
    iterator = iter(loader)
    _set_sampler_epoch(loader, epoch)
    return list(iterator)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_loaders_position_applies_to_its_own_epoch_only(packed):
    done = [0]
    reference = _loader(packed, done)
    epochs = [_epoch(reference, e) for e in (0, 1)]
    assert epochs[0] != epochs[1]  # Lightning's set_epoch reaches the order, packed too

    _set_sampler_epoch(reference, 1)
    done[0] = 2
    mid_epoch = reference.state_dict()
    assert mid_epoch == {"epoch": 1, "batches_done": 2}
    resumed = _loader(packed, done)
    resumed.load_state_dict(mid_epoch)
    assert _epoch(resumed, 1) == epochs[1][2:]
    assert _epoch(resumed, 2) == _epoch(reference, 2)  # the position is used once

    # The last batch of epoch 0 under a limit of 3 batches: Lightning goes on with epoch 1, from its first batch.
    resumed = _loader(packed, done)
    resumed.load_state_dict({"epoch": 0, "batches_done": 3})
    assert _epoch(resumed, 1) == epochs[1]


def test_a_fit_without_an_end_names_what_its_schedule_needs(tmp_path, capsys):
    # The warm-up + cosine schedule spans the fit: with neither max_steps nor max_epochs it has no length to span.
    code = run_main(*cli_args(tmp_path, "fit", *FP32, "--trainer.max_steps", "-1"))
    err = capsys.readouterr().err
    assert code == 1, err
    assert "the fit has no end: set trainer.max_steps or trainer.max_epochs" in err, err
    assert "Traceback" not in err and not list(tmp_path.rglob("*.ckpt"))
