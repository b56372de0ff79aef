"""qlit compare: runs read back from their TensorBoard logs give one row each with exactly the values they logged."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run_cli, scalars
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from qlit.callbacks.params import TrainableParamsMonitor
from qlit.errors import QlitError
from qlit.study.compare import main, plot, table, to_csv, to_markdown
from qlit.study.report import Entry, parse_samples, plot_report, report_rows, write_report
from qlit.study.runs import collect_runs, read_run
from qlit.study.techniques import describe_config, technique

# Above 2**24, so a float32 TensorBoard scalar cannot hold it: the table must take it from the float64 hparams.
FULL_PARAMS = 494_032_769
QLORA_RATIO = 0.0123456789  # not a float32 value either
QLORA_TOKENS = [900.0, 3000.0, 2000.0, 2500.0]  # median 2250: the slow first step must not decide it
FULL_TOKENS = [100.0, 300.0, 200.0]


def tb_run(root: Path, name: str, hparams: dict, series: dict[str, list[tuple[int, float]]]) -> Path:
    """A run written the way qlit's CLI writes one: Lightning's TensorBoardLogger, hparams record, then metrics."""
    logger = TensorBoardLogger(save_dir=str(root), name=name)
    logger.log_hyperparams(hparams)
    for step, metrics in sorted(_by_step(series).items()):
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")
    return Path(logger.log_dir)


def _by_step(series: dict[str, list[tuple[int, float]]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for tag, points in series.items():
        for step, value in points:
            out.setdefault(step, {})[tag] = value
    return out


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Three runs under ``tmp_path/logs``: full fine-tuning (CPU), QLoRA (GPU), and DoRA without an hparams record."""
    logs = tmp_path / "logs"
    tb_run(
        logs,
        "full",
        {"pretrained": "tiny", "quantization": "none", "adapter": "full", "params/trainable": FULL_PARAMS},
        {
            "params/trainable": [(0, float(FULL_PARAMS))],
            "params/trainable_ratio": [(0, 1.0)],
            "cpu/peak_rss_gib": [(5, 1.5), (10, 2.25), (15, 2.0)],
            "train/tokens_per_sec": list(zip((5, 10, 15), FULL_TOKENS, strict=True)),
            "train/loss": [(4, 3.0), (9, 2.0), (14, 1.5)],
            "val/loss": [(9, 2.5), (19, 1.75)],
            "val/accuracy": [(9, 0.5), (19, 0.75)],
            "time/fit_seconds": [(20, 120.5)],
        },
    )
    tb_run(
        logs,
        "qlora",
        {"pretrained": "tiny", "quantization": "nf4", "adapter": "LoraConfig", "params/trainable_ratio": QLORA_RATIO},
        {
            "params/trainable": [(0, 16384.0)],  # not in its hparams: the scalar is the fallback
            "params/trainable_ratio": [(0, QLORA_RATIO)],
            "gpu/peak_allocated_gib": [(5, 3.5), (10, 4.25), (15, 4.0)],
            "cpu/peak_rss_gib": [(5, 9.0)],  # a GPU run: its GPU peak is the one to compare
            "train/tokens_per_sec": list(zip((5, 10, 15, 20), QLORA_TOKENS, strict=True)),
            "train/loss": [(4, 2.0), (9, 1.0), (14, 0.5)],
            "val/loss": [(9, 2.0), (19, 1.0), (29, 1.25)],  # the final value, not the best
            "val/perplexity": [(29, 3.5)],
            "val/accuracy": [(29, 0.875)],
            "val/latency_ms_mean": [(29, 12.5)],
            "time/fit_seconds": [(30, 60.25)],
        },
    )
    # A run whose event file has no hparams record (as from an older qlit): model, quantization and adapter come
    # from the resolved config.yaml LightningCLI writes beside it.
    dora = logs / "squad" / "version_1"
    with SummaryWriter(str(dora)) as writer:
        writer.add_scalar("train/loss", 4.0, 1)
        for tag, value in {"train/loss": 3.0, "val/loss": 0.5, "val/f1": 40.0, "val/exact_match": 25.0}.items():
            writer.add_scalar(tag, value, 2)
        writer.add_scalar("cpu/peak_rss_gib", 1.0, 2)
    config = {
        "model": {
            "class_path": "qlit.module.QLitModule",
            "init_args": {
                "pretrained": "qlit-tiny/llama",
                "quantization": {"mode": "int8", "compute_dtype": "bfloat16"},
                "adapter": {"class_path": "peft.LoraConfig", "init_args": {"r": 8, "use_dora": True}},
            },
        }
    }
    (dora / "config.yaml").write_text(yaml.safe_dump(config))
    return logs


def by_run(rows: list[dict]) -> dict[str, dict]:
    return {row["run"]: row for row in rows}


def test_one_row_per_run_with_the_logged_values(study):
    runs = collect_runs([study])
    assert [run.name for run in runs] == ["full/version_0", "qlora/version_0", "squad/version_1"]
    rows = by_run(table(runs))
    qlora, full, dora = rows["qlora/version_0"], rows["full/version_0"], rows["squad/version_1"]

    assert (qlora["model"], qlora["quantization"], qlora["adapter"]) == ("tiny", "nf4", "LoraConfig")
    assert qlora["params/trainable_ratio"] == QLORA_RATIO  # from the float64 hparams, not the float32 scalar
    assert qlora["params/trainable"] == 16384
    assert (qlora["peak_memory_gib"], qlora["peak_memory_of"]) == (4.25, "gpu allocated")
    assert qlora["train/tokens_per_sec"] == statistics.median(QLORA_TOKENS) == 2250.0
    assert qlora["train/loss"] == 0.5
    assert qlora["val/loss"] == 1.25
    assert (qlora["val/perplexity"], qlora["val/accuracy"], qlora["val/latency_ms_mean"]) == (3.5, 0.875, 12.5)
    assert qlora["time/fit_seconds"] == 60.25

    assert full["params/trainable"] == FULL_PARAMS
    assert (full["peak_memory_gib"], full["peak_memory_of"]) == (2.25, "cpu rss")
    assert full["train/tokens_per_sec"] == 200.0
    assert full["val/latency_ms_mean"] is None

    assert (dora["model"], dora["quantization"], dora["adapter"]) == ("qlit-tiny/llama", "int8", "LoraConfig+dora")
    assert (dora["val/f1"], dora["val/exact_match"], dora["val/loss"]) == (40.0, 25.0, 0.5)
    assert dora["params/trainable_ratio"] is None and dora["train/tokens_per_sec"] is None


def test_columns_no_run_has_are_dropped(study):
    columns = list(table(collect_runs([study]))[0])
    # No run logged its epoch or the task it trained on (no data section in the one config.yaml).
    assert columns[:7] == ["run", "technique", "model", "quantization", "adapter", "rank", "steps"]
    assert {"val/accuracy", "val/f1", "val/exact_match", "val/latency_ms_mean"} <= set(columns)
    for absent in ("val/bleu", "val/price_mae", "val/price_rmsle", "val/price_hit_rate", "predict/latency_ms_mean"):
        assert absent not in columns


def test_sorting_puts_runs_without_the_value_last(study):
    runs = collect_runs([study])
    assert [r["run"] for r in table(runs, sort="val/loss")] == ["squad/version_1", "qlora/version_0", "full/version_0"]
    ranked = table(runs, sort="val/accuracy", descending=True)
    assert [r["run"] for r in ranked] == ["qlora/version_0", "full/version_0", "squad/version_1"]
    with pytest.raises(QlitError, match="val/bleu"):
        table(runs, sort="val/bleu")


def test_markdown_and_csv_round_trip(study, tmp_path):
    rows = table(collect_runs([study]), sort="val/loss")
    markdown = to_markdown(rows).splitlines()
    assert markdown[0] == "| " + " | ".join(rows[0]) + " |"
    assert len(markdown) == 2 + len(rows)
    assert "| qlora/version_0 | QLoRA (NF4) | tiny | nf4 | LoraConfig | — | 30 | 0.01235 | 16,384 |" in markdown[3]
    assert "—" in markdown[2]  # the DoRA run has no trainable ratio

    with to_csv(rows, tmp_path / "out" / "study.csv").open(newline="") as f:
        back = list(csv.DictReader(f))
    assert [list(r) for r in back] == [list(r) for r in rows]
    for row, read in zip(rows, back, strict=True):
        for column, value in row.items():
            if value is None:
                assert read[column] == ""
            elif isinstance(value, str):
                assert read[column] == value
            else:
                assert float(read[column]) == value  # full precision


def test_plot_writes_pngs(study, tmp_path):
    pytest.importorskip("matplotlib")
    written = plot(collect_runs([study]), tmp_path / "plots")
    names = {p.name for p in written}
    # Runs without a task share one group; only the full and QLoRA runs logged a validation-loss curve (2+ points),
    # two runs have a memory peak and a main metric (accuracy), and no run varied the rank (no rank plot).
    assert names == {"val_loss-runs.png", "train_loss-runs.png", "val_accuracy_vs_memory-runs.png", "speed-runs.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_paths_are_run_dirs_or_folders_read_once(study, tmp_path):
    runs = collect_runs([study / "qlora", study, str(study / "qlora" / "version_0")])
    assert [run.name for run in runs] == ["qlora/version_0", "full/version_0", "squad/version_1"]
    # Runs of the same name under two log roots are told apart by their parent folder.
    other = tb_run(tmp_path / "other", "qlora", {"adapter": "IA3Config"}, {"train/loss": [(1, 1.0)]})
    names = [run.name for run in collect_runs([study / "qlora", other])]
    assert names == ["logs/qlora/version_0", "other/qlora/version_0"]


def test_versions_in_numeric_order(tmp_path):
    for _ in range(11):
        tb_run(tmp_path, "demo", {}, {"train/loss": [(1, 1.0)]})
    names = [run.name for run in collect_runs([tmp_path])]
    assert names[:3] == ["demo/version_0", "demo/version_1", "demo/version_2"] and names[-1] == "demo/version_10"


def test_user_errors_name_the_path(tmp_path, capsys):
    with pytest.raises(QlitError, match="'.*missing' does not exist"):
        collect_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(QlitError, match="'.*empty' holds no TensorBoard run"):
        collect_runs([tmp_path / "empty"])
    SummaryWriter(str(tmp_path / "crashed" / "version_0")).close()  # an event file with no metric in it
    with pytest.raises(QlitError, match="'.*crashed' holds only runs that logged no metric"):
        collect_runs([tmp_path / "crashed"])

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "empty")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("qlit compare: error: ") and err.count("\n") == 1


def test_main_prints_the_table_and_writes_files(study, tmp_path, capsys):
    main([str(study), "--sort", "val/loss", "--csv", str(tmp_path / "t.csv")])
    out, err = capsys.readouterr()
    assert out.splitlines()[2].startswith("| squad/version_1 |")
    assert f"wrote {tmp_path / 't.csv'}" in err and (tmp_path / "t.csv").is_file()


def test_a_real_run(tmp_path):
    cli = run_cli(tmp_path, "fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.max_steps", "2",
                  "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
                  "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1")  # fmt: skip
    (run,) = collect_runs([tmp_path / "logs"])
    (row,) = table([run])
    logged = scalars(run.path)
    counted = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TrainableParamsMonitor)).metrics
    assert (row["run"], row["model"], row["quantization"], row["adapter"]) == (
        "demo/version_0", "qlit-tiny/qwen2", "nf4", "LoraConfig"
    )  # fmt: skip
    assert row["params/trainable_ratio"] == counted["params/trainable_ratio"]
    assert row["params/trainable"] == counted["params/trainable"]
    assert row["peak_memory_of"] == "cpu rss"
    assert row["peak_memory_gib"] == max(v for _, v in logged["cpu/peak_rss_gib"])
    assert row["val/loss"] == logged["val/loss"][-1][1]
    assert row["train/tokens_per_sec"] == statistics.median(v for _, v in logged["train/tokens_per_sec"])
    assert row["time/fit_seconds"] > 0 and row["val/accuracy"] is not None


def test_plot_without_matplotlib_says_how_to_install_it(study, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail as if not installed
    with pytest.raises(QlitError, match=r"pip install matplotlib"):
        plot(collect_runs([study]), tmp_path / "plots")


# ----- the report -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("quantization", "adapter", "double_quant", "dtype", "name"),
    [
        ("none", "full", False, "float32", "full fine-tuning (fp32)"),
        ("none", "full", False, "auto", "full fine-tuning"),
        ("bitnet", "full", None, None, "BitNet b1.58"),
        ("none", "LoraConfig", False, "bfloat16", "LoRA"),
        ("int8", "LoraConfig", False, None, "8-bit + LoRA"),
        ("nf4", "LoraConfig", True, None, "QLoRA (NF4 + DQ)"),
        ("fp4", "LoraConfig", False, None, "QLoRA (FP4)"),
        ("bitnet", "LoraConfig", None, None, "QLoRA + BitNet"),
        ("int8", "IA3Config", None, None, "IA3 on 8-bit"),
        ("nf4", "PromptEncoderConfig", True, None, "P-tuning on NF4 + DQ"),
        ("none", "LoraConfig+dora", None, None, "DoRA"),
        (None, None, None, None, None),
    ],
)
def test_technique_names_what_a_run_did(quantization, adapter, double_quant, dtype, name):
    assert technique(quantization, adapter, double_quant, dtype) == name


def test_describe_config_reads_a_cells_config():
    config = {
        "model": {
            "init_args": {
                "pretrained": "qlit-tiny/qwen2",
                "quantization": {"mode": "nf4"},
                "adapter": {"class_path": "peft.AdaLoraConfig", "init_args": {"r": 8, "target_r": 4}},
            }
        },
        "data": {
            "class_path": "qlit.data.JSONLDataModule",
            "init_args": {"path": "json", "data_files": {"train": "a"}},
        },
    }
    assert describe_config(config) == {
        "task": "JSONL (a)",
        "pretrained": "qlit-tiny/qwen2",
        "quantization": "nf4",
        "double_quant": True,  # QLoRA's default for 4-bit
        "compute_dtype": None,
        "adapter": "AdaLoraConfig",
        "rank": 4,
    }


def test_the_report_groups_by_task_and_says_what_failed(study, tmp_path):
    pytest.importorskip("matplotlib")
    runs = {run.name: run for run in collect_runs([study])}
    failed_config = {
        "model": {"init_args": {"quantization": {"mode": "nf4"}, "adapter": {"class_path": "peft.LoHaConfig"}}},
        "data": {"class_path": "qlit.data.SST2DataModule", "init_args": {"path": "qlit-samples/sst2"}},
    }
    entries = [
        Entry("full", run=runs["full/version_0"]),
        Entry("qlora", label="QLoRA, r=8", run=runs["qlora/version_0"]),
        Entry("dora", run=runs["squad/version_1"]),
        Entry("loha", status="failed", reason="LoHaConfig cannot train on a nf4 base.", config=failed_config),
    ]
    written = write_report(entries, tmp_path / "report", "Study: t", "What it shows.")
    md, csv_path = written[0], written[1]
    text = md.read_text()
    assert text.startswith("# Study: t\n\nWhat it shows.\n\n4 runs: 3 done, 1 failed.")
    # The failed cell is in its own task's group, with its reason, and in the CSV.
    assert "## SST2 (qlit-samples/sst2)" in text and "## runs" in text
    assert "- **LoHa on NF4 + DQ** (`loha`): failed: LoHaConfig cannot train on a nf4 base." in text
    runs_table = text.split("## runs")[1]
    header = runs_table.splitlines()[2]
    for column in ("technique", "peak memory GiB ↓", "tokens/s ↑", "accuracy ↑", "latency ms ↓", "f1 (%) ↑"):
        assert column in header, header
    assert "| QLoRA, r=8 | `qlora` |" in runs_table and "| 1.23 % |" in runs_table  # the trainable share
    with csv_path.open(newline="") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert rows["loha"]["status"] == "failed" and rows["loha"]["technique"] == "LoHa on NF4 + DQ"
    assert float(rows["qlora"]["val/latency_ms_mean"]) == 12.5 and rows["qlora"]["label"] == "QLoRA, r=8"
    for png in written[2:]:
        assert f"]({png.relative_to(tmp_path / 'report').as_posix()})" in text


def test_no_plot_has_a_degenerate_axis(tmp_path):
    pytest.importorskip("matplotlib")
    one = tb_run(
        tmp_path / "logs",
        "one",
        {"quantization": "nf4", "adapter": "LoraConfig"},
        {"val/loss": [(5, 1.0)], "val/accuracy": [(5, 0.5)], "cpu/peak_rss_gib": [(5, 1.0)]},
    )
    entries = [Entry("one", run=read_run(one))]
    # One run with one validation: no curve, no scatter, no rank axis; nothing to speak of speed.
    assert plot_report(entries, report_rows(entries), tmp_path / "plots") == []
    ranks = []
    for r in (4, 8):
        run = read_run(one)
        run.hparams["rank"] = r
        ranks.append(Entry(f"r{r}", run=run))
    names = {p.name for p in plot_report(ranks, report_rows(ranks), tmp_path / "plots")}
    assert names == {"val_accuracy_vs_rank-runs.png"}  # a constant metric is drawn; two runs on one spot are not
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(names)  # stale plots removed


def test_eval_results_are_columns(tmp_path):
    scores = {"eval/hellaswag/acc_norm": [(1, 0.25)], "eval/hellaswag/acc_norm_stderr": [(1, 0.01)]}
    run = tb_run(tmp_path, "ev", {}, {"train/loss": [(1, 1.0)], **scores})
    (row,) = table(collect_runs([run]))
    assert row["eval/hellaswag/acc_norm"] == 0.25 and "eval/hellaswag/acc_norm_stderr" not in row


def test_generations_read_back_from_the_text_the_task_logs():
    from qlit.tasks import format_samples

    samples = [("Q: 1+1?", "2\nand more", "2"), ("Q: 2+2?", "", "4")]
    assert parse_samples(format_samples(samples)) == [("Q: 1+1?", "2\nand more", "2"), ("Q: 2+2?", "", "4")]


def test_a_run_known_only_by_its_saved_adapter_is_named_by_it(tmp_path):
    # No HPARAMS record and no config.yaml (an adapter scored by `qlit eval` outside a fit): the technique comes from
    # qlit_base.json (base, quantization) and the adapter's own adapter_config.json (peft_type).
    run_dir = tmp_path / "scored" / "version_0"
    with SummaryWriter(str(run_dir)) as writer:
        writer.add_scalar("eval/mc/acc", 0.5, 3)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "qlit_base.json").write_text(
        json.dumps({"pretrained": "qlit-tiny/qwen2", "quantization": {"mode": "nf4", "double_quant": False}})
    )
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (row,) = table(collect_runs([tmp_path]))
    assert (row["quantization"], row["adapter"], row["technique"]) == ("nf4", "IA3Config", "IA3 on NF4")
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (row,) = table(collect_runs([tmp_path]))
    assert row["technique"] == "QLoRA (NF4)"
    (run_dir / "adapter" / "adapter_config.json").write_text("{not json")
    (row,) = table(collect_runs([tmp_path]))
    assert row["technique"] == "? on NF4"  # a damaged file names no method, and breaks nothing


def test_standard_errors_are_compare_columns_and_report_cells_with_a_verdict(tmp_path):
    logs = tmp_path / "logs"
    for name, f1, stderr in (("qlora", 62.5, 8.125), ("lora", 55.0, 7.5), ("bitnet", 20.0, 5.0)):
        tb_run(
            logs,
            name,
            {"pretrained": "tiny", "quantization": "nf4", "adapter": "LoraConfig"},
            {"val/loss": [(9, 1.0)], "val/f1": [(9, f1)], "val/f1_stderr": [(9, stderr)]},
        )
    runs = {run.name: run for run in collect_runs([logs])}
    rows = by_run(table(list(runs.values())))
    assert rows["qlora/version_0"]["val/f1_stderr"] == 8.125  # its own column, beside val/f1
    columns = list(rows["qlora/version_0"])
    assert columns.index("val/f1_stderr") == columns.index("val/f1") + 1
    entries = [Entry(name, label=name, run=runs[f"{name}/version_0"]) for name in ("qlora", "lora", "bitnet")]
    text = write_report(entries, tmp_path / "report", "Study")[0].read_text()
    # In the report the standard error sits in its metric's cell; the line under the table says which runs the best
    # cannot be told apart from: 62.5 − 55 = 7.5 is within 2 √(8.125² + 7.5²) ≈ 22, 62.5 − 20 is not.
    assert "| 62.5 ± 8.125 |" in text and "f1_stderr" not in text.split("## Columns")[0]
    assert "f1: lora cannot be told apart from the best run, qlora" in text
