"""The console of `qlit fit`: what informs (the run's own lines, the progress bar), none of the libraries' noise, and
at the end where the run, the adapter and the last checkpoint went."""

import logging
from pathlib import Path

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
    assert "val/accuracy" in demo_run.stdout  # the progress bar


def test_a_fit_ends_with_where_the_run_adapter_and_checkpoint_went(demo_run):
    run, adapter, checkpoint = demo_run.stderr.strip().splitlines()[-3:]
    run_dir = demo_run.run_dir.relative_to(demo_run.cwd)
    assert run == f"Run:        {run_dir} (qlit board {run_dir.parent})"
    assert adapter == f"Adapter:    {run_dir / 'adapter'} (peft format)"
    assert checkpoint == f"Checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}"
    # Paths relative to where qlit ran, and there.
    assert (demo_run.cwd / run_dir / "adapter" / "adapter_config.json").is_file()
    assert (demo_run.cwd / Path(checkpoint.split()[-1])).is_file()


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
