"""The tokenised cache: a second set-up reads it back, with its skipped-row counts; a changed option misses it; a
damaged folder is rebuilt with one line, never read; killed runs' staging folders are removed."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import datasets
import pytest
from data_helpers import sample_rows, write_jsonl
from helpers import ROOT, cli_args, run_main

from qlit.data import IndicVaultDataModule, SST2DataModule
from qlit.trainer_cli import QlitCLI

GPT2 = "qlit-tiny/gpt2"


def test_a_second_setup_reads_the_tokenised_cache(qlit_cache):
    options = dict(tokenizer=GPT2, path="qlit-samples/indicvault_hinglish", limit_train_samples=50)
    first = IndicVaultDataModule(**options)
    first.setup("fit")
    assert first.cache_hits == 0
    assert len(list((qlit_cache / "tokenized").iterdir())) == 2
    second = IndicVaultDataModule(**options)
    second.setup("fit")
    assert second.cache_hits == 2
    for split in ("train", "validation"):
        assert second.datasets[split]["input_ids"] == first.datasets[split]["input_ids"]
        assert second.datasets[split]["labels"] == first.datasets[split]["labels"]
    # The skipped-row counts come back with the cache, so they are reported on every run.
    assert second.skipped == first.skipped and sum(s["policy"] for s in second.skipped.values()) > 0
    # Anything that changes the tokens is part of the key: a new option tokenises again.
    third = IndicVaultDataModule(**options, system_prompt="Hinglish mein jawab do.")
    third.setup("fit")
    assert third.cache_hits == 0
    assert len(list((qlit_cache / "tokenized").iterdir())) == 4


def _arrow(folder: Path) -> Path:
    (arrow,) = folder.glob("*.arrow")
    return arrow


def _overwrite_16_bytes(folder: Path) -> None:
    arrow = _arrow(folder)
    data = bytearray(arrow.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    arrow.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda f: os.truncate(_arrow(f), _arrow(f).stat().st_size // 2),
    "emptied": lambda f: _arrow(f).write_bytes(b""),
    "deleted": lambda f: _arrow(f).unlink(),
    "16 bytes overwritten": _overwrite_16_bytes,
    "dataset_info.json emptied": lambda f: (f / "dataset_info.json").write_text(""),
    "state.json emptied": lambda f: (f / "state.json").write_text(""),
    "skip counts emptied": lambda f: (f / "qlit_stats.json").write_text(""),
    "checksums deleted": lambda f: (f / "qlit_checksums.json").unlink(),
    "checksums garbled": lambda f: (f / "qlit_checksums.json").write_text("{"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_rebuilt_with_one_line(qlit_cache, caplog, damage):
    options = dict(tokenizer=GPT2, path="qlit-samples/sst2", limit_train_samples=24, limit_val_samples=8)
    first = SST2DataModule(**options)
    first.setup("validate")
    # Read before the damage: the split is memory-mapped from the file about to be cut.
    expected = list(first.datasets["validation"]["input_ids"])
    del first
    (folder,) = (qlit_cache / "tokenized").iterdir()
    DAMAGE[damage](folder)

    second = SST2DataModule(**options)
    with caplog.at_level(logging.WARNING, logger="qlit.data.cache"):
        second.setup("validate")
    assert second.cache_hits == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "qlit.data.cache"]
    assert len(lines) == 1 and lines[0].startswith(f"Tokenised cache {folder} is damaged (")
    assert lines[0].endswith("): rebuilding it.") and "\n" not in lines[0]
    assert list(second.datasets["validation"]["input_ids"]) == expected
    assert list(second.datasets["validation"]["row_index"]) == list(range(8))
    # The rebuilt folder verifies: the next run reads it, silently.
    caplog.clear()
    third = SST2DataModule(**options)
    with caplog.at_level(logging.WARNING, logger="qlit.data.cache"):
        third.setup("validate")
    assert third.cache_hits == 1 and not [r for r in caplog.records if r.name == "qlit.data.cache"]
    assert [p.name for p in (qlit_cache / "tokenized").iterdir()] == [folder.name]


def test_an_edit_that_keeps_size_and_modification_time_is_read(tmp_path, qlit_cache):
    rows = sample_rows("sst2", "train")[:20]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    options = dict(tokenizer=GPT2, data_files={"train": str(data)}, val_fraction=0.25)
    first = SST2DataModule(**options)
    first.setup("fit")
    old = rows[3]["sentence"]
    # Same length, same size, same modification time: only the content tells.
    rows[3]["sentence"] = old[::-1]
    assert rows[3]["sentence"] != old
    times = data.stat()
    before = data.stat().st_size
    write_jsonl(data, rows)
    os.utime(data, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert data.stat().st_size == before and data.stat().st_mtime_ns == times.st_mtime_ns

    second = SST2DataModule(**options)
    second.setup("fit")
    seen = [s for split in ("train", "validation") for s in second.datasets[split]["instruction"]]
    assert any(rows[3]["sentence"] in s for s in seen) and not any(old in s for s in seen)
    assert second.cache_hits == 0  # both splits come from the edited file
    third = SST2DataModule(**options)
    third.setup("fit")
    assert third.cache_hits == 2


def test_a_cache_that_cannot_be_written_is_one_line_and_the_run_goes_on(qlit_cache, caplog, monkeypatch):
    def full_disk(self, path, *args, **kwargs):
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"\0" * 100)  # part of it written, then no room
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full_disk)
    dm = SST2DataModule(tokenizer=GPT2, path="qlit-samples/sst2", limit_val_samples=4)
    with caplog.at_level(logging.WARNING, logger="qlit.data.cache"):
        dm.setup("validate")
    assert len(dm.datasets["validation"]) == 4
    (line,) = [r.getMessage() for r in caplog.records if r.name == "qlit.data.cache"]
    assert line.startswith(f"Tokenised cache {qlit_cache / 'tokenized'}/SST2DataModule-")
    assert line.endswith(" not written (OSError: [Errno 28] No space left on device): this run goes on without it.")
    assert list((qlit_cache / "tokenized").iterdir()) == []  # nothing half-written stays


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_staging_folders_of_killed_runs_are_removed(qlit_cache):
    tokenized = qlit_cache / "tokenized"
    dead = tokenized / f".SST2DataModule-0123456789abcdef0123.tmp-{_dead_pid()}"
    alive = tokenized / f".SST2DataModule-0123456789abcdef0123.tmp-{os.getppid()}"
    for folder in (dead, alive):
        folder.mkdir(parents=True)
        (folder / "data-00000-of-00001.arrow").write_bytes(b"\0" * 4096)
    SST2DataModule(tokenizer=GPT2, path="qlit-samples/sst2", limit_val_samples=4).setup("validate")
    assert not dead.exists()
    assert alive.exists()  # its process may still be writing it


FP32 = [
    "--config", str(ROOT / "configs/demo.yaml"), "--model.init_args.quantization.mode", "none",
    "--model.init_args.quantization.double_quant", "false", "--trainer.max_steps", "1",
    "--trainer.limit_val_batches", "0", "--data.init_args.limit_train_samples", "8",
    "--data.init_args.limit_val_samples", "4",
]  # fmt: skip


@pytest.mark.slow
def test_qlit_fit_rebuilds_a_damaged_cache_and_trains(tmp_path, qlit_cache, capsys, caplog):
    # The run's own DataModule, built from the same arguments, fills the cache that the run will read.
    QlitCLI(args=cli_args(tmp_path, *FP32), run=False).datamodule.setup("fit")
    folders = sorted((qlit_cache / "tokenized").iterdir())
    assert len(folders) == 2
    _overwrite_16_bytes(folders[0])
    capsys.readouterr()

    with caplog.at_level(logging.WARNING, logger="qlit.data.cache"):
        assert run_main(*cli_args(tmp_path, "fit", *FP32)) == 0
    assert "Traceback" not in capsys.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.name == "qlit.data.cache"]
    assert lines == [
        f"Tokenised cache {folders[0]} is damaged (data-00000-of-00001.arrow does not match its checksum): "
        "rebuilding it."
    ]
    assert list(tmp_path.glob("logs/*/version_0/checkpoints/last.ckpt"))
