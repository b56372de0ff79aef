"""The console of `qlit fit`: what informs (the run's own lines, the progress bar), none of the libraries' noise, and
at the end where the run, the adapter and the last checkpoint went."""

import io
import logging
import re
from pathlib import Path
from types import SimpleNamespace

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from qlit.callbacks.progress import LineProgressBar, progress_bar
from qlit.trainer_cli import _Once, quiet_console

NOISE = (
    "litlogger",  # Lightning's advert
    "Tip:",
    "TPU available",
    "Generating train split",  # datasets' progress bars
    "Saving the dataset",
    "Loading weights",  # transformers' progress bar
    "Warning",  # DeprecationWarning, FutureWarning, ...
    "deprecated",
    "FLOPs",  # Lightning's model summary, whose counts disagree with peft's for 4-bit weights
    "Total params",
)


def test_a_fit_shows_its_own_lines_and_no_library_noise(demo_run):
    console = demo_run.stdout + demo_run.stderr
    assert [noise for noise in NOISE if noise in console] == [], console[-3000:]
    assert "Trainable parameters: 16,384 of 221,760" in demo_run.stderr  # LoRA r=8 on every linear layer


def test_off_a_terminal_the_progress_is_a_line_per_validation_with_the_loss_and_the_tasks_metric(demo_run):
    # The fit's output is a pipe: no redrawn bar (carriage returns), no run version (v_num), one plain line.
    assert "\r" not in demo_run.stdout and "v_num" not in demo_run.stdout, demo_run.stdout[-2000:]
    line = r"Epoch 1/3, step 2/2: train/loss \d+\.\d{3}, val/loss \d+\.\d{3}, val/accuracy [01]\.\d{3} \(\d+ s\)"
    assert re.fullmatch(line, demo_run.stdout.strip()), demo_run.stdout


def test_a_fit_ends_with_where_the_run_and_checkpoint_went_and_its_result(demo_run):
    run, checkpoint, result = demo_run.stderr.strip().splitlines()[-3:]
    run_dir = demo_run.run_dir.relative_to(demo_run.cwd)
    assert run == f"Run:        {run_dir} (qlit board {run_dir.parent})"
    assert checkpoint == f"Checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}"
    # The run's name, the task's metric and the monitored one, how long, and where the adapter went.
    accuracy = r"demo: val/accuracy [01]\.\d{3}, val/loss \d+\.\d{3} after 2 steps \(\d+ s\)"
    assert re.fullmatch(rf"{accuracy}; adapter in {re.escape(str(run_dir / 'adapter'))} \(peft format\)", result), (
        result
    )
    # Paths relative to where qlit ran, and there.
    assert (demo_run.cwd / run_dir / "adapter" / "adapter_config.json").is_file()
    assert (demo_run.cwd / Path(checkpoint.split()[-1])).is_file()


def test_on_a_terminal_the_bar_is_lightnings_without_the_run_version():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress_bar(Terminal())
    assert isinstance(bar, RichProgressBar | TQDMProgressBar)
    assert isinstance(progress_bar(io.StringIO()), LineProgressBar)
    trainer = SimpleNamespace(
        loggers=[SimpleNamespace(version=3)], progress_bar_metrics={"train/loss": 0.25, "val/accuracy": 0.9}
    )
    assert bar.get_metrics(trainer, None) == {"train/loss": 0.25, "val/accuracy": 0.9}


def test_a_library_note_logged_at_every_call_shows_once(caplog):
    # bitsandbytes logs this at every 8-bit matmul whose input is not float16: thousands of lines in an int8 demo.
    quiet_console()
    int8 = logging.getLogger("bitsandbytes.autograd._functions")
    # An 8-bit test earlier in this process may have shown the note already: start this test's count afresh.
    for once in int8.filters:
        if isinstance(once, _Once):
            once.seen.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            int8.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        int8.warning("another note")
    assert [r.getMessage() for r in caplog.records] == [
        "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
        "another note",
    ]


def test_liger_notes_about_other_hardware_go_and_its_other_warnings_stay(caplog):
    quiet_console()
    registry = logging.getLogger("liger_kernel.backends.registry")
    note = "Backend impl '%s' for op '%s' could not be imported: %s: %s"
    with caplog.at_level(logging.WARNING):
        registry.warning(note, "liger_kernel.ops.backends._ascend.rope", "rope", "ImportError", "no tanh")
        registry.warning(note, "liger_kernel.ops.backends._cutedsl.rope", "rope", "ImportError", "no CuTe DSL")
        registry.warning(note, "liger_kernel.ops.backends._triton.rope", "rope", "ImportError", "broken")
    assert [r.getMessage() for r in caplog.records] == [
        "Backend impl 'liger_kernel.ops.backends._triton.rope' for op 'rope' could not be imported: ImportError: broken"
    ]
