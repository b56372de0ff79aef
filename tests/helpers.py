"""Running the qlit CLI in-process with its output under a test's temporary folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlit.batch import IGNORE_INDEX
from qlit.cli import main
from qlit.trainer_cli import QlitCLI

ROOT = Path(__file__).resolve().parent.parent


def cli_args(tmp_path: Path, *args: str) -> list[str]:
    """``args`` plus the options that keep a run's logs and checkpoints inside ``tmp_path``, quietly."""
    return [
        *args,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]


def run_cli(tmp_path: Path, *args: str) -> QlitCLI:
    """Run a subcommand and return the CLI object (its trainer and model stay inspectable)."""
    return QlitCLI(args=cli_args(tmp_path, *args))


def run_main(*args: str) -> int:
    """Run ``qlit`` like the shell does; the exit code (0 when it returned normally)."""
    try:
        main(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard event files under ``log_dir``: tag → [(step, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def write_study(tmp_path: Path, study: dict, name: str = "study.yaml") -> Path:
    """A study file over ``configs/demo.yaml`` (unless ``study`` names its own base)."""
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": str(ROOT / "configs/demo.yaml"), **study}, sort_keys=False))
    return path


def packable_rows(vocab: int) -> list[dict]:
    """Three rows of 7, 12 and 5 tokens (prompts of 3, 5 and 2 not learned), seeded: what packing tests pack."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((7, 3), (12, 5), (5, 2)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "prompt_length": prompt})
    return rows


def launch(command: list[str], cwd: Path, timeout: float, *paths: Path) -> str:
    """Run ``command`` (a multi-process launch) in ``cwd`` with qlit, the tests and ``paths`` importable, within
    ``timeout`` seconds (a rank waiting in a collective another never joins fails the test instead of hanging); it
    must exit cleanly, without a traceback. Its console."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (ROOT, ROOT / "tests", *paths))}
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{command[2:5]} did not end within {timeout} s: {(err.stderr or b'')[-3000:]!r}")
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    assert "Traceback" not in console, console[-4000:]
    return console
