"""The fidelity callback: the stored base's weights and validation loss against the unquantized original, before any
training, from the real quantized layers."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ROOT, run_cli, scalars

from qlit.batch import IGNORE_INDEX
from qlit.models.loading import load_causal_lm
from qlit.models.quantization import Quantization
from qlit.study.compare import table
from qlit.study.runs import collect_runs

DEMO = ("--config", str(ROOT / "configs/demo.yaml"))
SHORT = (
    *("--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--latency.probe_samples", "0"),
    *("--data.init_args.limit_val_samples", "32", "--fidelity.enabled", "true", "--fidelity.batches", "2"),
)


def original_model():
    return load_causal_lm("qlit-tiny/qwen2", quantization=Quantization(), dtype="float32", device=torch.device("cpu"))


def fit(tmp_path, mode: str, *extra: str):
    dq = ["--model.init_args.quantization.double_quant", "false"] if mode != "nf4" else []
    cli = run_cli(tmp_path / mode, "fit", *DEMO, *SHORT, "--model.init_args.quantization.mode", mode, *dq, *extra)
    return cli, scalars(tmp_path / mode / "logs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fidelity")
    return tmp, {mode: fit(tmp, mode) for mode in ("int8", "nf4", "bitnet", "none")}


def test_each_quantization_logs_its_reconstruction_error_in_the_order_of_its_bits(runs):
    _, by_mode = runs
    error = {mode: logged["fidelity/weight_rel_error"][0] for mode, (_, logged) in by_mode.items() if mode != "none"}
    assert {mode: step for mode, (step, _) in error.items()} == {"int8": 0, "nf4": 0, "bitnet": 0}  # before training
    value = {mode: v for mode, (_, v) in error.items()}
    # 8 bits per weight, then 4, then ternary: each coarser grid reconstructs the weights worse.
    assert 0 < value["int8"] < value["nf4"] < value["bitnet"] < 1
    for mode, (_, logged) in by_mode.items():
        if mode != "none":
            assert logged["fidelity/weight_rel_error_max"][0][1] >= value[mode]
    assert not any(tag.startswith("fidelity/") for tag in by_mode["none"][1])  # nothing to measure


def test_the_nf4_error_is_the_one_of_bitsandbytes_own_round_trip(runs):
    import bitsandbytes.functional as F

    cli, logged = runs[1]["nf4"]
    original = load_causal_lm(
        "qlit-tiny/qwen2", quantization=Quantization(), dtype="float32", device=torch.device("cpu")
    )
    error = norm = 0.0
    for name, module in original.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.detach()
            packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            error += float((w - F.dequantize_4bit(packed, state).float()).pow(2).sum())
            norm += float(w.pow(2).sum())
    assert logged["fidelity/weight_rel_error"][0][1] == pytest.approx(math.sqrt(error / norm), rel=1e-4)


def test_the_base_loss_is_the_quantized_base_without_its_adapter_and_the_ratio_its_perplexity_factor(runs):
    cli, logged = runs[1]["nf4"]
    base, original = logged["fidelity/base_val_loss"][0][1], logged["fidelity/original_val_loss"][0][1]
    assert logged["fidelity/perplexity_ratio"][0][1] == pytest.approx(math.exp(base - original), rel=1e-5)
    assert base != pytest.approx(original, abs=1e-4)  # the 4-bit base computes something else
    # The original's loss, computed here from the checkpoint on the same two validation batches.
    model = original_model()
    total = tokens = 0.0
    with torch.no_grad():
        for i, batch in enumerate(cli.datamodule.val_dataloader()):
            if i == 2:
                break
            n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            total, tokens = total + float(out.loss) * n, tokens + n
    assert original == pytest.approx(total / tokens, rel=1e-5)


def test_compare_shows_the_fidelity_columns(runs):
    tmp, _ = runs
    rows = {row["quantization"]: row for row in table(collect_runs([str(tmp)]))}
    assert rows["nf4"]["fidelity/weight_rel_error"] > rows["int8"]["fidelity/weight_rel_error"]
    assert rows["nf4"]["fidelity/perplexity_ratio"] > 0
    assert rows["none"].get("fidelity/weight_rel_error") is None


def test_a_negative_batch_count_is_refused_by_name(tmp_path, capsys):
    from helpers import run_main

    assert run_main("fit", *DEMO, *SHORT, "--fidelity.batches", "-1") != 0
    assert "fidelity.batches must be 0 or more" in capsys.readouterr().err


def test_a_study_report_shows_the_fidelity_columns_and_says_what_they_are(runs, tmp_path):
    from qlit.study.report import Entry, write_report

    tmp, _ = runs
    by_mode = {run.hparams.get("quantization"): run for run in collect_runs([str(tmp)])}
    entries = [Entry(mode, run=by_mode[mode]) for mode in ("none", "int8", "nf4")]
    report = write_report(entries, tmp_path / "report", "Study: fidelity")[0].read_text()
    header = next(line for line in report.splitlines() if line.startswith("| technique"))
    assert "weight error ↓" in header and "base ppl × ↓" in header
    assert "relative reconstruction error" in report


def test_a_pre_quantized_checkpoint_is_measured_against_the_model_it_was_made_from(runs, tmp_path, capsys):
    # Stored quantized, it has no original of its own: a note, no metrics; named, its source is the original.
    gptq = ("--config", str(ROOT / "configs/demo_gptq.yaml"))
    alone = run_cli(tmp_path / "alone", "fit", *gptq, *SHORT)
    assert not any(tag.startswith("fidelity/") for tag in scalars(tmp_path / "alone" / "logs"))
    assert alone.trainer.global_step == 1
    run_cli(tmp_path / "named", "fit", *gptq, *SHORT, "--fidelity.original", "qlit-tiny/qwen2")
    logged = scalars(tmp_path / "named" / "logs")
    assert 0 < logged["fidelity/weight_rel_error"][0][1] < 0.5
    # The same original on the same validation batches as the NF4 run's: the same loss.
    nf4 = runs[1]["nf4"][1]
    assert logged["fidelity/original_val_loss"][0][1] == pytest.approx(nf4["fidelity/original_val_loss"][0][1])


def test_tensorboards_hparams_table_links_the_fidelity_of_a_measured_run(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    tmp, measured = runs
    (run_dir,) = {p.parent for p in (tmp / "nf4" / "logs").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG]
    linked = [i.name.tag for i in plugin_data_pb2.HParamsPluginData.FromString(content).experiment.metric_infos]
    # After the costs, so that the five columns TensorBoard ticks stay loss, the task's metric and the costs.
    assert linked[linked.index("time/fit_seconds") + 1 :][:3] == [
        *("fidelity/weight_rel_error", "fidelity/base_val_loss", "fidelity/perplexity_ratio")
    ]
    assert linked[:2] == ["val/loss", "val/accuracy"] and "fidelity/weight_rel_error_max" not in linked
    # The table reads each linked tag's last scalar: the run logged every one of them.
    _, logged = measured["nf4"]
    assert events.Scalars("fidelity/perplexity_ratio")[-1].value == pytest.approx(
        logged["fidelity/perplexity_ratio"][-1][1]
    )
