"""The qlit command: help, every config parses, --print_config round-trips, bad input gets one clear sentence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr
    err = [line for line in stderr.splitlines() if line.startswith("qlit: error:")]
    assert len(err) == 1, err
    return code, err[0]


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: relative path → (size, modification time)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def refused_and_untouched(capsys, tmp_path: Path, *args: str) -> tuple[int, str]:
    """The one-sentence error of a run that must fail, asserting it neither created nor changed a file under
    ``tmp_path`` (no run directory under logs/, the files it was given as they were)."""
    before = files_under(tmp_path)
    code, err = error_of(capsys, *args)
    assert code != 0
    assert files_under(tmp_path) == before
    return code, err


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


# ----- config files -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content,expected",
    [
        ("trainer:\n  max_steps: 2\n model: [\n", "is not valid YAML: "),
        ("", "is empty"),
        ("# nothing but a comment\n", "is empty"),
        ("- max_steps: 2\n", "holds a YAML list, not sections"),
    ],
    ids=["syntax", "empty", "comment-only", "list"],
)
def test_a_broken_config_file_is_named_with_the_reason(tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    code, err = refused_and_untouched(
        capsys, tmp_path, *cli_args(tmp_path, "fit", "--config", DEMO, "--config", str(bad))
    )
    assert code == 2
    assert f"config file '{bad}' {expected}" in err
    if expected.startswith("is not valid YAML"):
        assert err.endswith("at line 3, column 2."), err


def test_a_config_that_is_a_directory(tmp_path, capsys):
    code, err = refused_and_untouched(capsys, tmp_path, "fit", "--config", str(tmp_path))
    assert code == 2 and f"config file '{tmp_path}' is a directory" in err


def test_a_yaml_syntax_error_in_a_file_given_to_an_option_names_that_file(tmp_path, capsys):
    bad = tmp_path / "trainer.yaml"
    bad.write_text("max_steps: [2\n")
    code, err = refused_and_untouched(capsys, tmp_path, "fit", "--config", DEMO, "--trainer", str(bad))
    assert code == 2
    assert f"'{bad}' is not valid YAML" in err and "line 2" in err and "<unicode string>" not in err


# ----- option values ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option,value,expected",
    [
        ("--model.init_args.optimizer.init_args.lr", "abc", "model.optimizer.lr: got 'abc', expected a number"),
        ("--trainer.accumulate_grad_batches", "two", "trainer.accumulate_grad_batches: got 'two', expected an integer"),
        # A Union with a named value names it too.
        (
            "--model.init_args.prepare_kbit",
            "sometimes",
            "model.prepare_kbit: got 'sometimes', expected true or false or 'auto'",
        ),
    ],
)
def test_a_value_of_the_wrong_type_names_the_option_value_and_type(tmp_path, capsys, option, value, expected):
    code, err = refused_and_untouched(capsys, tmp_path, *cli_args(tmp_path, "fit", "--config", DEMO, option, value))
    assert code == 2
    assert expected in err and "import path" not in err


def test_an_optimizer_option_outside_the_model_says_where_it_belongs(tmp_path, capsys):
    code, err = refused_and_untouched(capsys, tmp_path, "fit", "--config", DEMO, "--optimizer.lr", "abc")
    assert code == 2
    assert "unrecognized arguments: --optimizer.lr abc" in err and "--model.init_args.optimizer" in err


@pytest.mark.parametrize(
    "option,value,expected",
    [
        ("--trainer.accumulate_grad_batches", "0", "trainer.accumulate_grad_batches must be 1 or more, got 0."),
        ("--trainer.accumulate_grad_batches", "-2", "trainer.accumulate_grad_batches must be 1 or more, got -2."),
        ("--trainer.gradient_clip_val", "-1.0", "trainer.gradient_clip_val must be 0 or more, got -1.0."),
        ("--trainer.check_val_every_n_epoch", "0", "trainer.check_val_every_n_epoch must be 1 or more, got 0."),
        ("--trainer.val_check_interval", "0", "trainer.val_check_interval must be above 0, got 0."),
        ("--model.init_args.optimizer.init_args.lr", "-0.001", "Invalid learning rate: -0.001"),
        ("--model.init_args.optimizer.init_args.betas", "[1.5, 0.9]", "Invalid beta parameter at index 0: 1.5"),
    ],
)
def test_a_value_out_of_range_is_refused_before_any_run_directory(tmp_path, capsys, option, value, expected):
    code, err = refused_and_untouched(capsys, tmp_path, *cli_args(tmp_path, "fit", "--config", DEMO, option, value))
    assert code == 1
    assert expected in err


# ----- checkpoints and adapters -------------------------------------------------------------------------------------
FAST = [
    "--config", DEMO,
    "--model.init_args.quantization.mode", "none", "--model.init_args.quantization.double_quant", "false",
    "--data.init_args.limit_train_samples", "8", "--data.init_args.limit_val_samples", "4",
    "--data.init_args.batch_size", "4", "--trainer.num_sanity_val_steps", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    """A run of one training step of LoRA on the tiny Llama: its last.ckpt and adapter/."""
    tmp = tmp_path_factory.mktemp("llama")
    args = ["--model.init_args.pretrained", "qlit-tiny/llama", "--trainer.max_steps", "1"]
    assert run_main(*cli_args(tmp, "fit", *FAST, *args, "--trainer.limit_val_batches", "0")) == 0
    (run,) = tmp.glob("logs/demo/version_0")
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    return run


def test_ckpt_path_that_is_missing_or_a_directory(tmp_path, capsys, llama_run):
    missing = tmp_path / "nowhere.ckpt"
    code, err = refused_and_untouched(capsys, tmp_path, *cli_args(tmp_path, "fit", *FAST, "--ckpt_path", str(missing)))
    assert code == 1 and f"ckpt_path '{missing}' does not exist." in err

    code, err = refused_and_untouched(
        capsys, tmp_path, *cli_args(tmp_path, "fit", *FAST, "--ckpt_path", str(llama_run))
    )
    last = llama_run / "checkpoints" / "last.ckpt"
    assert code == 1 and f"ckpt_path '{llama_run}' is a directory" in err and f"did you mean '{last}'?" in err


@pytest.mark.parametrize("damage", ["truncated", "not-a-checkpoint", "empty"])
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_an_unreadable_checkpoint_is_one_sentence(tmp_path, capsys, llama_run, damage, subcommand):
    whole = (llama_run / "checkpoints" / "last.ckpt").read_bytes()
    content = {"truncated": whole[: len(whole) // 2], "not-a-checkpoint": b"hello\n", "empty": b""}[damage]
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    code, err = refused_and_untouched(
        capsys,
        tmp_path,
        *cli_args(
            tmp_path, subcommand, *FAST, "--model.init_args.pretrained", "qlit-tiny/llama", "--ckpt_path", str(bad)
        ),
    )
    assert code == 1 and f"ckpt_path '{bad}' cannot be read as a checkpoint" in err


def test_a_checkpoint_without_training_state_cannot_resume(tmp_path, capsys, llama_run):
    state = torch.load(llama_run / "checkpoints" / "last.ckpt", weights_only=True)
    weights = tmp_path / "weights.ckpt"
    torch.save({k: v for k, v in state.items() if k not in ("optimizer_states", "lr_schedulers")}, weights)
    code, err = refused_and_untouched(
        capsys,
        tmp_path,
        *cli_args(
            tmp_path, "fit", *FAST, "--model.init_args.pretrained", "qlit-tiny/llama", "--ckpt_path", str(weights)
        ),
    )
    assert code == 1 and f"ckpt_path '{weights}' holds weights only" in err

    adapter = llama_run / "adapter" / "adapter_model.safetensors"
    code, err = refused_and_untouched(
        capsys, tmp_path, *cli_args(tmp_path, "validate", *FAST, "--ckpt_path", str(adapter))
    )
    assert code == 1 and f"ckpt_path '{adapter}' is not a Lightning checkpoint" in err and "adapter_path" in err


def test_a_checkpoint_or_adapter_of_another_base_is_refused_unless_allowed(tmp_path, capsys, llama_run):
    ckpt = llama_run / "checkpoints" / "last.ckpt"
    for subcommand in ("fit", "validate"):
        code, err = refused_and_untouched(
            capsys, tmp_path, *cli_args(tmp_path, subcommand, *FAST, "--ckpt_path", str(ckpt))
        )
        assert code == 1
        assert (
            f"checkpoint '{ckpt}' was trained on base 'qlit-tiny/llama', but model.pretrained is 'qlit-tiny/qwen2'"
            in err
        )
        assert "allow_base_mismatch" in err

    # A checkpoint written before checkpoints recorded their base: its run's config.yaml says which.
    state = torch.load(ckpt, weights_only=True)
    assert state.pop("qlit_base")["pretrained"] == "qlit-tiny/llama"
    older = llama_run / "checkpoints" / "older.ckpt"
    torch.save(state, older)
    code, err = refused_and_untouched(
        capsys, tmp_path, *cli_args(tmp_path, "validate", *FAST, "--ckpt_path", str(older))
    )
    assert code == 1 and "was trained on base 'qlit-tiny/llama'" in err
    older.unlink()

    adapter = llama_run / "adapter"
    code, err = refused_and_untouched(
        capsys, tmp_path, *cli_args(tmp_path, "validate", *FAST, "--model.init_args.adapter_path", str(adapter))
    )
    assert code == 1
    assert f"model.adapter_path '{adapter}' was trained on base 'qlit-tiny/llama', but model.pretrained" in err

    # Who means it says so: the same checkpoint then validates on the Qwen2 base.
    allow = ["--model.init_args.allow_base_mismatch", "true", "--trainer.limit_val_batches", "1"]
    assert run_main(*cli_args(tmp_path, "validate", *FAST, *allow, "--ckpt_path", str(ckpt))) == 0
    assert "val/loss" in scalars(tmp_path / "logs")


def test_a_checkpoint_or_adapter_that_does_not_fit_leaves_no_run_directory(tmp_path, capsys, llama_run):
    llama = ["--model.init_args.pretrained", "qlit-tiny/llama", "--trainer.limit_val_batches", "1"]
    # Another LoRA rank: the names match, the shapes do not; found once the model is built.
    ckpt = llama_run / "checkpoints" / "last.ckpt"
    code, err = refused_and_untouched(
        capsys,
        tmp_path,
        *cli_args(
            tmp_path, "validate", *FAST, *llama, "--model.init_args.adapter.init_args.r", "4", "--ckpt_path", str(ckpt)
        ),
    )
    assert code == 1 and f"checkpoint '{ckpt}' holds '" in err and "but this model's is" in err

    # An adapter whose saved config no longer matches its weights.
    adapter = tmp_path / "adapter"
    shutil.copytree(llama_run / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    code, err = refused_and_untouched(
        capsys, tmp_path, *cli_args(tmp_path, "validate", *FAST, *llama, "--model.init_args.adapter_path", str(adapter))
    )
    assert code == 1 and f"model.adapter_path '{adapter}' does not fit base 'qlit-tiny/llama': size mismatch" in err

    # Modules the base does not have: Llama's projections on GPT-2 (allowed onto another base, so peft decides).
    code, err = refused_and_untouched(
        capsys,
        tmp_path,
        *cli_args(
            tmp_path,
            "validate",
            *FAST,
            "--model.init_args.pretrained", "qlit-tiny/gpt2",
            "--model.init_args.allow_base_mismatch", "true",
            "--model.init_args.adapter_path", str(llama_run / "adapter"),
        ),
    )  # fmt: skip
    assert code == 1 and "does not fit base 'qlit-tiny/gpt2'" in err and "not found" in err
