"""`qlit sweep` running a tiny study end to end: interrupted by SIGTERM during a cell and run again, then its report
checked against the event files it came from. (Its own module: the two sweeps are the slowest part of the suite,
and the test workers run a module's tests together.)"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, run_main, scalars, write_study

# ----- running cells --------------------------------------------------------------------------------------------------
# Two cells that train plus one the model refuses, on SQuAD (a generation task: latency is measured). The second
# trains for a fixed time, so that a SIGTERM reaches it mid-training and its rerun still ends.
RUN_STUDY = {
    "base": str(ROOT / "configs/demo_squad.yaml"),
    "description": "A tiny study of the sweep's tests.",
    "set": {
        "trainer.max_epochs": -1,
        "trainer.log_every_n_steps": 1,
        "trainer.val_check_interval": 2,
        "trainer.limit_val_batches": 1,
        "trainer.limit_train_batches": 4,
        "trainer.num_sanity_val_steps": 0,
        "checkpoint.monitor": None,
        "data.init_args.batch_size": 4,
        "data.init_args.limit_train_samples": 16,
        "data.init_args.limit_val_samples": 4,
        "data.init_args.generate_val_samples": 4,
        "model.init_args.quantization.compute_dtype": "float32",
    },
    "strategies": {
        "full": {"set": {"trainer.max_steps": 2, "model.init_args.optimizer.init_args.lr": 0.0005}},
        "qlora": {
            "set": {
                "trainer.max_steps": 1000,  # a bound for the schedule; max_time ends the run
                "trainer.max_time": "00:00:00:20",
                "model.init_args.adapter.init_args.r": 4,
            }
        },
        "loha-nf4": {"from": "loha", "set": {"model.init_args.quantization.mode": "nf4"}},
    },
    "after": ["test"],
}


def _sweep(study: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qlit", "sweep", str(study)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )


def _events(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("events.out.tfevents.*")}


@pytest.fixture(scope="module")
def interrupted_and_rerun(tmp_path_factory):
    """The study run once and stopped by SIGTERM during its second cell, then run again to the end."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    study = write_study(tmp, {**RUN_STUDY, "name": "tiny", "output": str(out)})
    first = _sweep(study)
    fit = out / "runs" / "qlora" / "fit"
    deadline = time.monotonic() + 1800
    while first.poll() is None and time.monotonic() < deadline and "train/loss" not in scalars(fit):
        time.sleep(0.3)
    first.send_signal(signal.SIGTERM)
    first_output, _ = first.communicate(timeout=300)
    first_state = json.loads((out / "sweep.json").read_text())
    full_events = _events(out / "runs" / "full")
    partial_events = _events(fit)
    # The rerun in this process (its cells still run as their own processes): one interpreter start-up less.
    progress = io.StringIO()
    with contextlib.redirect_stdout(progress):
        second_code = run_main("sweep", str(study))
    return {
        "out": out,
        "first": (first.returncode, first_output, first_state, partial_events),
        "second": (second_code, progress.getvalue()),
        "full_events": full_events,
    }


@pytest.mark.slow
def test_an_interrupted_sweep_redoes_only_its_unfinished_cells(interrupted_and_rerun):
    out = interrupted_and_rerun["out"]
    code, output, state, partial_events = interrupted_and_rerun["first"]
    assert code == 143, output
    assert "[1/3] full: done in" in output and "interrupted; run the same command again" in output
    assert {name: cell["status"] for name, cell in state["cells"].items()} == {"full": "done", "qlora": "interrupted"}
    assert partial_events  # the stopped cell had begun training

    code, output = interrupted_and_rerun["second"]
    assert code == 0, output
    assert "[1/3] full: done earlier, skipped" in output
    assert "[2/3] qlora: done in" in output
    assert "[3/3] loha-nf4: failed (refused when the config was read): LoHaConfig cannot train on a nf4 base" in output
    assert _events(out / "runs" / "full") == interrupted_and_rerun["full_events"]  # untouched
    redone = _events(out / "runs" / "qlora" / "fit")
    assert redone and not set(redone) & set(partial_events)  # started again from nothing
    state = json.loads((out / "sweep.json").read_text())["cells"]
    assert [state[n]["status"] for n in ("full", "qlora", "loha-nf4")] == ["done", "done", "failed"]
    assert state["qlora"]["stages"] == ["fit", "test"]


@pytest.mark.slow
def test_the_report_holds_what_the_event_files_hold(interrupted_and_rerun):
    out = interrupted_and_rerun["out"]
    with (out / "report.csv").open(newline="") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["full", "qlora", "loha-nf4"]
    for name in ("full", "qlora"):
        row = rows[name]
        logged = scalars(out / "runs" / name / "fit")
        tested = scalars(out / "runs" / name / "test")
        assert row["status"] == "done" and row["reason"] == ""
        assert float(row["peak_memory_gib"]) == pytest.approx(max(v for _, v in logged["cpu/peak_rss_gib"]))
        assert row["peak_memory_of"] == "cpu rss"
        ratio = logged["params/trainable"][-1][1] / logged["params/total"][-1][1]
        assert float(row["params/trainable_ratio"]) == pytest.approx(ratio, rel=1e-6)
        assert float(row["val/f1"]) == pytest.approx(logged["val/f1"][-1][1])
        assert float(row["test/f1"]) == pytest.approx(tested["test/f1"][-1][1])
        assert float(row["val/latency_ms_mean"]) == pytest.approx(logged["val/latency_ms_mean"][-1][1])
        assert int(row["steps"]) == max(step for series in logged.values() for step, _ in series)
    assert rows["full"]["params/trainable_ratio"] == "1.0" and rows["full"]["technique"] == "full fine-tuning"
    assert rows["full"]["steps"] == "2"
    assert rows["qlora"]["label"] == "QLoRA (NF4 + DQ)" and rows["qlora"]["rank"] == "4"
    refused = rows["loha-nf4"]
    assert refused["status"] == "failed" and "LoHaConfig cannot train on a nf4 base" in refused["reason"]
    assert refused["technique"] == "LoHa on NF4 + DQ" and refused["peak_memory_gib"] == ""

    report = (out / "report.md").read_text()
    assert report.startswith("# Study: tiny\n\nA tiny study of the sweep's tests.")
    assert "## SQuAD (qlit-samples/squad), model `qlit-tiny/qwen2`" in report
    # The policy every cell ran under stands above the tables.
    policy = "- Memory policy: every cell ran with `gradient_checkpointing: true`"
    assert policy in report and report.index(policy) < report.index("## SQuAD")
    assert "- **LoHa on NF4 + DQ** (`loha-nf4`): failed: LoHaConfig cannot train on a nf4 base" in report
    # `qlit compare --report` on the study's folder writes the same table.
    assert run_main("compare", str(out), "--report", str(out.parent / "again")) == 0
    assert (out.parent / "again" / "report.csv").read_text() == (out / "report.csv").read_text()

    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    for plot in plots:
        assert f"](plots/{plot})" in report
    assert {"val_loss-squad_qlit_samples_squad.png", "speed-squad_qlit_samples_squad.png"} <= set(plots)
    # F1 against memory, or perplexity where every run's F1 is the same (a tiny random model's is 0).
    assert any(p.endswith("_vs_memory-squad_qlit_samples_squad.png") for p in plots)
    assert "### Example generations" in report  # SQuAD answers of both runs, side by side
