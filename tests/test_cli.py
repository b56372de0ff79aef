"""The qlit command: help, every config parses, --print_config round-trips, bad input gets one clear sentence."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, cli_args, run_main, scalars

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["validate", "--help"], ["predict", "--help"]])
def test_help(args, capsys):
    assert run_main(*args) == 0
    out = capsys.readouterr().out
    assert "--config" in out
    if args[0] == "fit":
        assert "--ckpt_path" in out and "--checkpoint" in out


def test_top_level_help_lists_every_subcommand_without_loading_torch():
    # `qlit --help` must answer at once: the entry module imports neither PyTorch nor Lightning.
    code = (
        "import sys; from qlit.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip().endswith("[]"), done.stdout
    for name in ("fit", "validate", "test", "predict", "export", "compare"):
        assert f"\n  {name} " in done.stdout, name
    assert "Lightning Trainer command line tool" not in done.stdout


def test_no_subcommand_shows_the_help_and_fails(capsys):
    assert run_main() == 2
    assert "subcommands:" in capsys.readouterr().out


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "qwen_qlora.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses_and_opens_with_its_command(config, capsys):
    first = config.read_text().splitlines()[0]
    assert first == f"# qlit fit --config configs/{config.name}", first
    assert run_main("fit", "--config", str(config), "--print_config") == 0
    printed = capsys.readouterr().out
    assert "class_path: qlit." in printed


def test_printed_config_runs(tmp_path, capsys):
    assert run_main("fit", "--config", str(ROOT / "configs/demo.yaml"), "--print_config") == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    code = run_main(
        *cli_args(
            tmp_path,
            "fit",
            "--config",
            str(printed),
            "--trainer.max_steps",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.limit_val_batches",
            "1",
        )
    )
    assert code == 0
    assert "train/loss" in scalars(tmp_path / "logs")


def error_of(capsys, *args: str) -> tuple[int, str]:
    code = run_main(*args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlit: error:")]
    assert len(err) == 1, err
    return code, err[0]


DEMO = str(ROOT / "configs/demo.yaml")


def test_misspelled_config_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    quantisation:\n      mode: nf4\n")
    code, err = error_of(capsys, "fit", "--config", DEMO, "--config", str(bad))
    assert code != 0
    assert "quantisation" in err


@pytest.mark.parametrize("abbreviation", ["--trainer.max_step", "--trainer.max_e"])
def test_an_option_prefix_is_no_abbreviation(capsys, abbreviation):
    # argparse would take a unique prefix for the whole name: a misspelling must never silently mean something else.
    code, err = error_of(capsys, "fit", "--config", DEMO, abbreviation, "5")
    assert code == 2
    assert f"unrecognized arguments: {abbreviation} 5" in err


@pytest.mark.parametrize(
    "option,value",
    [
        ("--data.init_args.batch_size", "0"),
        ("--data.init_args.eval_batch_size", "0"),
        ("--data.init_args.max_tokens", "-5"),
        ("--model.init_args.max_new_tokens", "0"),
    ],
)
def test_a_count_below_one_is_one_sentence(tmp_path, capsys, option, value):
    code, err = error_of(capsys, "fit", "--config", DEMO, option, value)
    assert code == 1
    name = option.split(".", 1)[0].removeprefix("--") + "." + option.rsplit(".", 1)[1]
    assert f"{name} must be 1 or more, got {value}." in err
    assert not (tmp_path / "logs").exists()


def test_unknown_quantization_mode(capsys):
    code, err = error_of(capsys, "fit", "--config", DEMO, "--model.init_args.quantization.mode", "nf5")
    assert code != 0
    assert "quantization.mode" in err and "'nf5'" in err and "nf4" in err


def test_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "train.jsonl"
    code, err = error_of(
        capsys,
        *cli_args(
            tmp_path,
            "fit",
            "--config",
            DEMO,
            "--data.init_args.path",
            "json",
            "--data.init_args.data_files",
            str(missing),
        ),
    )
    assert code != 0
    assert str(missing) in err and "does not exist" in err


def test_unreachable_model_id_fails_fast(tmp_path, capsys):
    start = time.monotonic()
    code, err = error_of(
        capsys,
        *cli_args(tmp_path, "fit", "--config", DEMO, "--model.init_args.pretrained", "Qwen/Qwen2.5-0.5B-Instruct"),
    )
    assert code != 0
    assert "'Qwen/Qwen2.5-0.5B-Instruct'" in err and "local" in err.lower() or "DIR" in err
    assert time.monotonic() - start < 30


def test_unreachable_dataset_id_names_it(tmp_path, capsys):
    code, err = error_of(capsys, *cli_args(tmp_path, "fit", "--config", DEMO, "--data.init_args.path", "nobody/sst2"))
    assert code != 0
    assert "'nobody/sst2'" in err and "data_files" in err


def test_missing_model_directory(tmp_path, capsys):
    code, err = error_of(
        capsys,
        *cli_args(tmp_path, "fit", "--config", DEMO, "--model.init_args.pretrained", str(Path(tmp_path) / "no-model")),
    )
    assert code != 0 and "no-model" in err


def test_missing_config_file(tmp_path, capsys):
    code, err = error_of(capsys, "fit", "--config", str(tmp_path / "nope.yaml"))
    assert code != 0
    assert "nope.yaml" in err and "does not exist" in err and "Parser key" not in err


def test_misspelled_class_path(capsys):
    code, err = error_of(capsys, "fit", "--config", DEMO, "--model.init_args.adapter", "peft.LoraConfg")
    assert code != 0
    assert "LoraConfg" in err
