"""Checkpoints: written beside their target (never through the system temp folder), a full disk is one sentence
that keeps the previous checkpoint, and killed saves' temporary files are removed by the next run."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli_args, run_main

from qlit import checkpoint_io
from qlit.checkpoint_io import AtomicCheckpointIO
from qlit.errors import QlitError


def _state(step: int) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), float(step))}, "global_step": step}


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes."""

    room = 1000

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            super().write(bytes(data)[: max(0, self.room - self.tell())])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _full_disk_open(path, mode="r", *args, **kwargs):
    return io.BufferedWriter(_FullDisk(path, mode)) if "w" in mode else open(path, mode, *args, **kwargs)


def test_a_save_needs_no_system_temp_folder(tmp_path, monkeypatch):
    # A system temp folder that cannot be written (full, or gone) must not matter: the staging file is beside the
    # target.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    target = tmp_path / "checkpoints" / "last.ckpt"
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint(_state(1), target)
    assert torch.equal(plugin.load_checkpoint(target)["state_dict"]["w"], _state(1)["state_dict"]["w"])
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    assert not (tmp_path / "no-such-tmp").exists()


def test_a_full_disk_is_one_sentence_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint(_state(1), target)
    before = target.read_bytes()
    assert len(before) > _FullDisk.room  # the disk fills in the middle of the new checkpoint
    monkeypatch.setattr(checkpoint_io, "open", _full_disk_open, raising=False)
    with pytest.raises(QlitError) as err:
        plugin.save_checkpoint(_state(2), target)
    assert str(err.value).startswith(f"No space left on {target.parent} to write checkpoint last.ckpt:")
    assert "\n" not in str(err.value)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # the partial file is gone


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def denied(path, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(checkpoint_io, "open", denied, raising=False)
    with pytest.raises(PermissionError):
        AtomicCheckpointIO().save_checkpoint(_state(1), tmp_path / "last.ckpt")


def test_temporary_files_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    run = tmp_path / "logs" / "demo"
    killed = run / "version_0" / "checkpoints" / f".last.ckpt.tmp-{_dead_pid()}"
    writing = run / "version_0" / "checkpoints" / f".epoch=0-step=3.ckpt.tmp-{os.getppid()}"
    mine = run / "version_1" / "checkpoints" / f".last.ckpt.tmp-{_dead_pid()}"
    unrelated = run / "version_0" / "checkpoints" / ".last.ckpt.tmp-notes"
    for path in (killed, writing, mine, unrelated):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1024)
    # A new run writes into version_2: it cleans its own folder and those of the runs beside it.
    AtomicCheckpointIO().save_checkpoint(_state(1), run / "version_2" / "checkpoints" / "last.ckpt")
    assert not killed.exists() and not mine.exists()
    assert writing.exists()  # its process is alive: it may still be writing
    assert unrelated.exists()  # not a name a save stages under


def test_temporary_files_of_another_machine_wait_a_day(tmp_path):
    # Several machines may share the folder: a PID of another one says nothing here, only the file's age does.
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    fresh = folder / f".last.ckpt.tmp-{_dead_pid()}@another-node"
    old = folder / f".epoch=0-step=9.ckpt.tmp-{_dead_pid()}@another-node"
    for path in (fresh, old):
        path.write_bytes(b"\0" * 64)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    AtomicCheckpointIO().save_checkpoint(_state(1), folder / "last.ckpt")
    assert fresh.exists() and not old.exists()


def test_loading_removes_the_killed_saves_beside_the_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    torch.save(_state(3), target)
    killed = tmp_path / f".last.ckpt.tmp-{_dead_pid()}"
    killed.write_bytes(b"\0" * 64)
    assert AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 3
    assert not killed.exists()


FP32 = [
    "--config", str(ROOT / "configs/demo.yaml"), "--model.init_args.quantization.mode", "none",
    "--model.init_args.quantization.double_quant", "false", "--trainer.max_steps", "3",
    "--trainer.limit_val_batches", "0", "--data.init_args.limit_train_samples", "24",
    "--data.init_args.batch_size", "8", "--checkpoint.monitor", "null", "--checkpoint.every_n_train_steps", "1",
]  # fmt: skip


@pytest.mark.slow
def test_qlit_fit_on_a_full_disk_fails_in_one_line_and_keeps_last_ckpt(tmp_path, monkeypatch, capsys):
    # A save killed in an earlier run of the same experiment left its temporary file.
    stray = tmp_path / "logs" / "demo" / "version_0" / "checkpoints" / f".last.ckpt.tmp-{_dead_pid()}"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"\0" * 4096)
    # The disk fills up once a first last.ckpt is written: the next save fails mid-write.
    kept: dict[str, bytes] = {}

    def open_(path, mode="r", *args, **kwargs):
        last = Path(path).parent / "last.ckpt"
        if "w" in mode and last.exists():
            kept.setdefault("last", last.read_bytes())
            return _full_disk_open(path, mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "open", open_, raising=False)
    code = run_main(*cli_args(tmp_path, "fit", *FP32))
    err = capsys.readouterr().err
    checkpoints = tmp_path / "logs" / "demo" / "version_1" / "checkpoints"
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("qlit: error:")]
    assert lines == [
        f"qlit: error: No space left on {checkpoints} to write checkpoint epoch=0-step=2.ckpt: the previous "
        "checkpoint is kept; free space there or point checkpoint.dirpath at another disk."
    ]
    assert "Traceback" not in err
    assert (checkpoints / "last.ckpt").read_bytes() == kept["last"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert not stray.exists()
