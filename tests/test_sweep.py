"""qlit sweep: a study file becomes its cells, checked before any runs; cells run as `qlit fit` processes, failures
and interruptions are recorded, a second run redoes only what is unfinished, and the report holds the logged values."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, run_main, write_study

from qlit.errors import QlitError
from qlit.study.sweep import builtin_strategies, load_study, merge


def adapter(cell):
    return cell.config["model"]["init_args"]["adapter"]


def quantization(cell):
    return cell.config["model"]["init_args"]["quantization"]


# ----- the study file -------------------------------------------------------------------------------------------------
def test_strategies_cross_their_own_and_the_study_axes(tmp_path):
    study = load_study(
        write_study(
            tmp_path,
            {
                "set": {"trainer.max_steps": 5, "model": {"init_args": {"quantization": {"compute_dtype": "float32"}}}},
                "strategies": {
                    "full": None,
                    "qlora": {"axes": {"model.init_args.adapter.init_args.r": [4, 8]}},
                    "ia3": {"set": {"model.init_args.optimizer.init_args.lr": 0.1}},
                },
                "axes": {"seed_everything": {"a": 1, "b": 2}},
            },
        )
    )
    names = [cell.name for cell in study.cells]
    assert names == ["full-a", "full-b", "qlora-r4-a", "qlora-r8-a", "qlora-r4-b", "qlora-r8-b", "ia3-a", "ia3-b"]
    cells = {cell.name: cell for cell in study.cells}
    assert study.output == Path("logs/studies/study")

    full = cells["full-a"]
    assert adapter(full) is None and quantization(full) == {
        "mode": "none",
        "double_quant": None,
        "compute_dtype": "float32",
    }
    assert full.config["trainer"]["max_steps"] == 5 and full.config["seed_everything"] == 1
    assert full.label == "full fine-tuning, a"

    qlora = cells["qlora-r8-b"]
    assert quantization(qlora) == {"mode": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert adapter(qlora)["init_args"]["r"] == 8
    assert adapter(qlora)["init_args"]["lora_dropout"] == 0.0  # the base config's, kept under the same class
    assert (qlora.label, qlora.series) == ("QLoRA (NF4 + DQ), r=8, b", "QLoRA (NF4 + DQ)")

    ia3 = cells["ia3-a"]  # another class_path replaces the base's LoRA whole: none of LoRA's arguments remain
    assert adapter(ia3) == {"class_path": "peft.IA3Config", "init_args": {"task_type": "CAUSAL_LM"}}
    assert ia3.config["model"]["init_args"]["optimizer"]["init_args"] == {"lr": 0.1, "weight_decay": 0.0}
    assert quantization(ia3)["mode"] == "nf4"  # a peft method leaves the base's quantization
    assert ia3.label == "IA3 on NF4 + DQ, a"
    assert len({cell.fingerprint for cell in study.cells}) == len(study.cells)


def test_zipped_axes_and_a_quantization_axis_in_the_label(tmp_path):
    study = load_study(
        write_study(
            tmp_path,
            {
                "strategies": ["lora"],
                "combine": "zip",
                "axes": {
                    "model.init_args.adapter.init_args.r": [4, 16],
                    "model.init_args.adapter.init_args.lora_alpha": [8, 32],
                    "model.init_args.quantization.mode": ["none", "int8"],
                },
                "output": str(tmp_path / "out"),
            },
        )
    )
    assert [c.name for c in study.cells] == ["lora-r4-lora_alpha8-none", "lora-r16-lora_alpha32-int8"]
    last = study.cells[1]
    assert (adapter(last)["init_args"]["r"], adapter(last)["init_args"]["lora_alpha"]) == (16, 32)
    assert last.label == "8-bit + LoRA, r=16, lora_alpha=32"  # the technique says the quantization itself
    assert study.output == tmp_path / "out"


def test_merge_replaces_another_class_and_keeps_the_rest():
    base = {"a": {"class_path": "peft.LoraConfig", "init_args": {"r": 8, "lora_alpha": 16}}, "b": [1, 2]}
    assert merge(base, {"a": {"init_args": {"r": 4}}}) == {
        "a": {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "lora_alpha": 16}},
        "b": [1, 2],
    }
    assert merge(base, {"a": {"class_path": "IA3Config"}})["a"] == {"class_path": "IA3Config"}
    assert merge(base, {"a": {"class_path": "LoraConfig", "init_args": {"r": 2}}})["a"]["init_args"]["lora_alpha"] == 16
    assert merge(base, {"b": [3]})["b"] == [3] and base["b"] == [1, 2]


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"strategies": ["full"], "sweep": 1}, "unknown key 'sweep': the keys are name, description, base"),
        ({"axes": {"trainer.max_steps": []}}, "'trainer.max_steps' has no values"),
        ({"axes": {"trainer.max_steps": 5}}, "'trainer.max_steps' must list its values"),
        ({"strategies": ["qlora", "nope"]}, "strategy 'nope' is no built-in strategy and has no 'set'"),
        ({"strategies": {"x": {"from": "qlorra"}}}, "'from: qlorra' is no built-in strategy: use one of full, lora"),
        ({"strategies": {"x": {"sett": {}}}}, "strategy 'x': unknown key 'sett'"),
        ({"strategies": ["full"], "combine": "zip", "axes": {"a": [1], "b": [1, 2]}}, "axes of one length"),
        ({"strategies": ["full"], "combine": "both"}, "combine is 'both': use cross or zip"),
        ({"axes": {"trainer.max_steps": [1, 1]}}, "has a value twice"),
        (
            {
                "strategies": {
                    "qlora-r4": {"from": "qlora"},
                    "qlora": {"axes": {"model.init_args.adapter.init_args.r": [4]}},
                }
            },
            "two cells would be named 'qlora-r4'",
        ),
        ({"strategies": ["full"], "after": ["predict"]}, "'predict' is no stage: use validate or test"),
        ({"set": {"trainer.": 1}, "strategies": ["full"]}, "'trainer.' is not a config key"),
        ({}, "neither 'strategies' nor 'axes'"),
        ({"base": "missing.yaml", "strategies": ["full"]}, "base config '.*missing.yaml' does not exist"),
    ],
)
def test_a_bad_study_is_one_sentence(tmp_path, study, message):
    with pytest.raises(QlitError, match=message):
        load_study(write_study(tmp_path, study))


def test_eval_runs_when_qlit_has_the_subcommand(tmp_path, monkeypatch):
    from qlit.study import sweep
    from qlit.subcommands import SUBCOMMANDS

    path = write_study(tmp_path, {"strategies": ["qlora"], "eval": {"tasks": ["hellaswag"], "limit": 20}})
    monkeypatch.delitem(SUBCOMMANDS, "eval", raising=False)
    with pytest.raises(QlitError, match="'eval': this qlit has no `qlit eval` subcommand"):
        load_study(path)
    monkeypatch.setitem(SUBCOMMANDS, "eval", "benchmarks")
    study = load_study(path)
    assert study.eval == {"tasks": ["hellaswag"], "limit": 20}
    fit = tmp_path / "fit"
    ckpt = str(fit / "checkpoints" / "last.ckpt")  # full fine-tuning: no adapter, the checkpoint and its config
    assert sweep._eval_argv(study.eval, fit) == ["eval", "--adapter", ckpt, "--tasks", "hellaswag", "--limit", "20"]
    (fit / "adapter").mkdir(parents=True)
    (fit / "adapter" / "adapter_config.json").write_text("{}")
    argv = sweep._eval_argv(study.eval, fit)
    assert argv == ["eval", "--adapter", str(fit / "adapter"), "--tasks", "hellaswag", "--limit", "20"]
    with pytest.raises(QlitError, match="'limit' must be a whole number"):
        load_study(write_study(tmp_path, {"strategies": ["qlora"], "eval": {"tasks": ["x"], "limit": 0}}))


def test_every_built_in_strategy_parses(tmp_path):
    """Each built-in fragment is a valid `qlit fit` config (the model's own checks aside), checked as a sweep does."""
    from qlit.study.sweep import check_cells

    study = load_study(
        write_study(
            tmp_path,
            {
                "strategies": {name: None for name in builtin_strategies()},
                "set": {"model.init_args.quantization.compute_dtype": "float32"},
                "output": str(tmp_path / "out"),
                # Prefix tuning cannot train with recomputation, the default policy of a study's cells.
                "memory_policy": {"gradient_checkpointing": False},
            },
        )
    )
    refused = check_cells(study)
    # On the demo's NF4 base, as the docs' table says; AdaLoRA needs the run's length from the study.
    assert set(refused) == {"loha", "lokr", "adalora"}
    assert "LoHaConfig cannot train on a nf4 base" in refused["loha"]
    assert refused["adalora"] == "AdaLoRA does not work when `total_step` is None, supply a value > 0."
    assert not (tmp_path / "out").exists()


def test_a_key_the_parser_does_not_know_stops_the_sweep_before_any_cell(tmp_path, capsys):
    study = write_study(
        tmp_path,
        {
            "output": str(tmp_path / "out"),
            "strategies": {"full": None, "qlora": {"axes": {"model.init_args.adapter.init_args.rr": [4]}}},
        },
    )
    assert run_main("sweep", str(study)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"qlit sweep: error: study '{study}': cell 'qlora-rr4': model.adapter")
    assert "'rr'" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_cells_and_runs_nothing(tmp_path, capsys):
    study = write_study(
        tmp_path,
        {
            "output": str(tmp_path / "out"),
            "set": {"model.init_args.quantization.compute_dtype": "float32"},
            "strategies": {"full": None, "loha": None, "qlora": {"axes": {"model.init_args.adapter.init_args.r": [4]}}},
        },
    )
    assert run_main("sweep", str(study), "--dry-run") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"study: 3 cells, output {tmp_path / 'out'}"
    assert out[1].split() == ["1.", "full", "full", "fine-tuning", "[to", "run]"]
    assert "loha" in out[2] and "[will fail: LoHaConfig cannot train on a nf4 base" in out[2]
    assert out[3].split()[:2] == ["3.", "qlora-r4"] and "QLoRA (NF4 + DQ), r=4" in out[3]
    assert not (tmp_path / "out").exists()


# ----- the shipped studies -------------------------------------------------------------------------------------------
STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))


def test_each_shipped_study_opens_with_its_command_and_has_both_forms():
    names = {path.stem for path in STUDIES}
    offline = {name.removesuffix("_offline") for name in names if name.endswith("_offline")}
    assert len(offline) == 6 and {name for name in names if not name.endswith(("_offline", "_gpu_random"))} == offline
    assert {"gpt2_techniques_gpu_random", "qwen_sst2_ranks_gpu_random"} <= names
    for path in STUDIES:
        assert path.read_text().splitlines()[0] == f"# qlit sweep configs/studies/{path.name}"
        study = load_study(path)
        assert study.name == path.stem and study.output == Path("logs/studies") / path.stem
        models = {cell.config["model"]["init_args"]["pretrained"] for cell in study.cells}
        if path.stem.endswith("_offline"):  # nothing to download
            assert all(m.startswith("qlit-tiny/") for m in models), models
            assert all(cell.config["trainer"]["accelerator"] == "cpu" for cell in study.cells)
        elif path.stem.endswith("_gpu_random"):
            assert all(m.startswith("qlit-random/") for m in models), models
        else:
            assert not any(m.startswith("qlit-") for m in models), models


@pytest.mark.slow
@pytest.mark.parametrize("path", STUDIES, ids=lambda path: path.stem)  # one test each: spread over test workers
def test_each_shipped_study_parses(tmp_path, path):
    """Every cell of every shipped study is a valid `qlit fit` config; only the pairs peft cannot train are refused."""
    import torch

    from qlit.study.sweep import check_cells

    # The support matrix (docs/quantization.md): LoHa and LoKr have no 4-bit layer; DoRA loses the 8-bit scales on a
    # CPU and is normalised by the wrong weight under QAT; peft wraps HQQ layers for LoRA only.
    hqq_refused = {"adalora-hqq", "ia3-hqq", "loha-hqq", "lokr-hqq"}
    peft_refused = {"loha-nf4", "lokr-nf4", "dora-qat"} | hqq_refused
    peft_refused |= set() if torch.cuda.is_available() else {"dora-int8"}
    refused = check_cells(load_study(path, output=tmp_path / path.stem))
    if path.stem == "peft_quantization":
        assert set(refused) == peft_refused, refused
    elif path.stem == "peft_quantization_offline":  # five of the methods
        assert set(refused) == {"ia3-hqq"}, refused
    else:
        assert refused == {}, (path, refused)


# ----- one memory policy for every cell -------------------------------------------------------------------------------
def _memory(cell):
    init = cell.config["model"]["init_args"]
    return init.get("gradient_checkpointing"), init.get("memory_budget")


def test_every_cell_runs_under_one_memory_policy_unless_the_study_says_otherwise(tmp_path):
    strategies = {
        "full": {"set": {"model.init_args.gradient_checkpointing": False}},
        "qlora": {"set": {"model.init_args.gradient_checkpointing": "auto"}},
    }
    default = load_study(write_study(tmp_path, {"strategies": strategies}))
    assert {_memory(cell) for cell in default.cells} == {(True, "auto")}  # the strategies' own choices overridden
    assert "every cell ran with `gradient_checkpointing: true`" in default.memory_policy_note()

    budget = load_study(
        write_study(tmp_path, {"strategies": strategies, "memory_policy": {"memory_budget": 6}}, "b.yaml")
    )
    assert {_memory(cell) for cell in budget.cells} == {("auto", 6)}
    assert "`gradient_checkpointing: auto`, `memory_budget: 6`" in budget.memory_policy_note()

    own = load_study(write_study(tmp_path, {"strategies": strategies, "memory_policy": "as_configured"}, "c.yaml"))
    assert [_memory(cell)[0] for cell in own.cells] == [False, "auto"]
    assert "as_configured" in own.memory_policy_note()

    for bad, words in [("recompute", "as_configured or a mapping"), ({"compile": True}, "unknown key 'compile'")]:
        with pytest.raises(QlitError, match=words):
            load_study(write_study(tmp_path, {"strategies": strategies, "memory_policy": bad}, "d.yaml"))
