"""Every dataset's demo config trains and validates offline on CPU and logs its task's metrics to TensorBoard."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, cli_args, run_main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# config → what its validation logs beside val/loss and val/perplexity (scalars, and TensorBoard text tags).
DEMOS = {
    "demo_squad.yaml": (["val/exact_match", "val/f1"], []),
    "demo_codesearchnet.yaml": (["val/bleu"], []),
    "demo_pricer.yaml": (["val/price_mae", "val/price_rmsle", "val/price_hit_rate", "val/price_unparsed"], []),
    "demo_hinglish.yaml": ([], ["val/samples"]),
    "demo_jsonl.yaml": ([], ["val/samples"]),
}
# One epoch of a few rows (however many packed steps they make): every stage runs and logs; learning is not the point.
SMALL = [
    "--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0",
    "--trainer.log_every_n_steps", "1", "--data.init_args.limit_train_samples", "8",
    "--data.init_args.batch_size", "4", "--data.init_args.limit_val_samples", "4",
    "--data.init_args.generate_val_samples", "2", "--model.init_args.max_new_tokens", "4",
]  # fmt: skip


def _logged(run_dir: Path) -> tuple[dict[str, list[float]], set[str]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {t: [e.value for e in events.Scalars(t)] for t in tags["scalars"]}
    texts = {t.removesuffix("/text_summary") for t in tags["tensors"]}
    return scalars, texts


def test_every_dataset_has_a_demo_and_a_qwen_config():
    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    for demo in DEMOS:
        assert demo in names
        assert demo.replace("demo_", "qwen_qlora_") in names


@pytest.mark.parametrize("config", sorted(DEMOS))
def test_demo_fits_then_validates_and_logs_its_task_metrics(config, tmp_path):
    base = ["--config", str(ROOT / "configs" / config), *SMALL]
    assert run_main(*cli_args(tmp_path, "fit", *base)) == 0
    (ckpt,) = tmp_path.glob("logs/*/version_0/checkpoints/last.ckpt")
    assert run_main(*cli_args(tmp_path, "validate", *base, "--ckpt_path", str(ckpt))) == 0

    wanted_scalars, wanted_texts = DEMOS[config]
    runs = sorted(tmp_path.glob("logs/*/version_*"))
    assert [r.name for r in runs] == ["version_0", "version_1"]  # fit, then validate
    for run in runs:
        scalars, texts = _logged(run)
        for name in ["val/loss", "val/perplexity", *wanted_scalars]:
            assert name in scalars, f"{name} missing from {run.name}: {sorted(scalars)}"
        assert set(wanted_texts) <= texts, f"{run.name} logged text {sorted(texts)}"
        assert scalars["val/loss"][-1] > 0
    fit_scalars, _ = _logged(runs[0])
    assert "train/loss" in fit_scalars
    if "val/price_unparsed" in wanted_scalars:  # 2 rows generated: each is parsed or counted
        assert 0 <= fit_scalars["val/price_unparsed"][-1] <= 2
        assert 0 <= fit_scalars["val/price_hit_rate"][-1] <= 1
