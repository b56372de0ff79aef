"""A truncated, empty or foreign checkpoint, an empty or broken adapter directory, an adapter of another model:
`qlit export`, `qlit eval` and `qlit predict` each answer in one sentence that names the file, exit non-zero and write
nothing (no output folder, no run directory)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, cli_args, run_main
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qlit.models.tiny import resolve_tiny
from qlit.module import QLitModule

TASKS = ROOT / "tests" / "eval_tasks"
ROW = {"question": "Which word is a colour?", "choices": [" red", " run", " ten"], "answer": 0}

#: The tiny base every good adapter here trained on, and what its run config says.
MODEL = {
    "class_path": "qlit.module.QLitModule",
    "init_args": {
        "pretrained": "qlit-tiny/qwen2",
        "dtype": "float32",
        "adapter": {
            "class_path": "peft.LoraConfig",
            "init_args": {"r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"},
        },
    },
}


def _peft_only(model, directory: Path, target_modules: list[str], trained_on: Path) -> Path:
    """A LoRA adapter saved by peft alone (no qlit record), naming as its base a folder of another machine."""
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=target_modules))
    peft_model.peft_config["default"].base_model_name_or_path = str(trained_on)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    """Every bad input, by name, beside one good adapter and one good checkpoint of it."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        dtype="float32",
        adapter=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    module.configure_model()
    good = root / "good"
    module.save_adapter_to(good)

    run = root / "run"  # a run folder as qlit fit leaves one: its config two levels above the checkpoints
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": MODEL}))
    checkpoints = run / "checkpoints"
    lightning = {"pytorch-lightning_version": "2.6.6", "global_step": 3, "epoch": 0}  # what Lightning writes
    torch.save({"state_dict": module.state_dict(), **lightning}, checkpoints / "whole.ckpt")
    whole = (checkpoints / "whole.ckpt").read_bytes()
    (checkpoints / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (checkpoints / "empty.ckpt").write_bytes(b"")
    (checkpoints / "text.ckpt").write_text("epoch 3, loss 0.41\n")
    torch.save({"weights": torch.zeros(4)}, checkpoints / "foreign_dict.ckpt")
    # A Lightning checkpoint, but of another model: none of this run's adapter weights are in it.
    torch.save({"state_dict": {"net.weight": torch.zeros(2, 2)}, **lightning}, checkpoints / "other_model.ckpt")
    # Written by torch.save, but not by Lightning: a bare KeyError in Lightning's loader, were it let through.
    torch.save({"state_dict": module.state_dict()}, checkpoints / "not_lightning.ckpt")

    (root / "empty_dir").mkdir()
    no_config = shutil.copytree(good, root / "no_config")
    (no_config / "adapter_config.json").unlink()
    corrupt = shutil.copytree(good, root / "corrupt_weights")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    elsewhere = root / "machine-it-trained-on" / "model"
    tiny = Qwen2Config.from_pretrained(resolve_tiny("qlit-tiny/qwen2")).to_dict()
    tiny.pop("layer_types", None)
    deeper = Qwen2ForCausalLM(Qwen2Config(**{**tiny, "num_hidden_layers": 4}))  # the tiny base has 2
    gpt2 = AutoModelForCausalLM.from_pretrained(resolve_tiny("qlit-tiny/gpt2"))
    return {
        "truncated checkpoint": checkpoints / "truncated.ckpt",
        "empty checkpoint": checkpoints / "empty.ckpt",
        "text file": checkpoints / "text.ckpt",
        "foreign torch.save": checkpoints / "foreign_dict.ckpt",
        "checkpoint of another model": checkpoints / "other_model.ckpt",
        "checkpoint not written by Lightning": checkpoints / "not_lightning.ckpt",
        "empty directory": root / "empty_dir",
        "no adapter_config.json": no_config,
        "corrupt safetensors": corrupt,
        "adapter of a deeper model": _peft_only(deeper, root / "deeper", ["q_proj", "v_proj"], elsewhere),
        "adapter of another architecture": _peft_only(gpt2, root / "gpt2", ["c_attn"], elsewhere),
    }


#: What each sentence must say besides the file's name.
SAYS = {
    "truncated checkpoint": "truncated or corrupt",
    "empty checkpoint": "empty (0 bytes)",
    "text file": "not a file written by torch.save",
    "foreign torch.save": "not a Lightning checkpoint",
    "checkpoint of another model": "does not hold this adapter's weights",
    "checkpoint not written by Lightning": "records no pytorch-lightning_version",
    "empty directory": "empty",
    "no adapter_config.json": "adapter_config.json",
    "corrupt safetensors": "truncated or not a safetensors file",
    "adapter of a deeper model": "modules the base lacks",
    "adapter of another architecture": "c_attn",
}
#: Adapters trained elsewhere name a base that is not on this machine: they are given the tiny one.
FOREIGN = ("adapter of a deeper model", "adapter of another architecture")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working folder holding the data of the local task qlit_mc, as a user's would."""
    tmp = tmp_path_factory.mktemp("work")
    (tmp / "qlit_mc.jsonl").write_text(json.dumps(ROW) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        yield tmp


def one_sentence(capfd, code: int, named: Path, says: str) -> str:
    """The single error line of a failed command: exit non-zero, no traceback, the file and the fault named."""
    out, err = capfd.readouterr()
    console = out + err
    errors = [line for line in console.splitlines() if re.search(r"\berror\b", line, re.IGNORECASE)]
    assert code != 0
    assert "Traceback" not in console
    assert len(errors) == 1, errors
    assert str(named) in errors[0], errors[0]
    assert says in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", list(SAYS))
def test_export(bad, tmp_path, capfd, case):
    out = tmp_path / "merged"
    base = ["--base", "qlit-tiny/qwen2"] if case in FOREIGN else []
    code = run_main("export", "--adapter", str(bad[case]), "--output", str(out), *base)
    line = one_sentence(capfd, code, bad[case], SAYS[case])
    assert line.startswith("qlit: error: ")
    assert not out.exists()


@pytest.mark.parametrize("case", list(SAYS))
def test_eval(bad, workdir, tmp_path, capfd, case):
    out = tmp_path / "scores"
    base = ["--base", "qlit-tiny/qwen2"] if case in FOREIGN else []
    args = ["--tasks", "qlit_mc", "--include_path", str(TASKS), "--output_path", str(out), "--device", "cpu", *base]
    code = run_main("eval", "--adapter", str(bad[case]), *args)
    line = one_sentence(capfd, code, bad[case], SAYS[case])
    assert line.startswith("qlit eval: error: ")
    assert not out.exists()
    # Nor beside the input: lm-eval's results go to the run's eval/ folder when no --output_path is given.
    assert not list(bad[case].parent.rglob("eval"))


#: `qlit predict` takes a checkpoint as --ckpt_path and an adapter as model.init_args.adapter_path.
PREDICT = {
    "truncated checkpoint": "--ckpt_path",
    "empty checkpoint": "--ckpt_path",
    "text file": "--ckpt_path",
    "foreign torch.save": "--ckpt_path",
    "checkpoint of another model": "--ckpt_path",
    "checkpoint not written by Lightning": "--ckpt_path",
    "empty directory": "--model.init_args.adapter_path",
    "no adapter_config.json": "--model.init_args.adapter_path",
    "corrupt safetensors": "--model.init_args.adapter_path",
    "adapter of a deeper model": "--model.init_args.adapter_path",
    "adapter of another architecture": "--model.init_args.adapter_path",
}


@pytest.mark.parametrize("case", list(PREDICT))
def test_predict(bad, tmp_path, capfd, case):
    config = tmp_path / "predict.yaml"
    model = MODEL if PREDICT[case] == "--ckpt_path" else {**MODEL, "init_args": {**MODEL["init_args"], "adapter": None}}
    data = {"class_path": "qlit.data.SST2DataModule", "init_args": {"path": "qlit-samples/sst2", "batch_size": 4}}
    config.write_text(yaml.safe_dump({"trainer": {"accelerator": "cpu", "devices": 1}, "model": model, "data": data}))
    small = ["--data.init_args.limit_test_samples", "4", "--model.init_args.max_new_tokens", "2"]
    args = cli_args(tmp_path, "predict", "--config", str(config), PREDICT[case], str(bad[case]), *small)
    code = run_main(*args)
    line = one_sentence(capfd, code, bad[case], SAYS[case])
    assert line.startswith("qlit: error: ")
    assert not (tmp_path / "logs").exists()  # no run directory, so no predictions.jsonl either
    assert not list(tmp_path.rglob("predictions*"))


def test_eval_of_a_plain_model_with_truncated_weights_or_of_an_adapter_as_a_model(bad, workdir, tmp_path, capfd):
    model = shutil.copytree(resolve_tiny("qlit-tiny/qwen2"), tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "scores"
    args = ["--tasks", "qlit_mc", "--include_path", str(TASKS), "--output_path", str(out), "--device", "cpu"]
    code = run_main("eval", "--model", str(model), *args)
    one_sentence(capfd, code, model, "Could not load the weights")
    code = run_main("eval", "--model", str(bad["corrupt safetensors"].parent / "good"), *args)
    line = one_sentence(capfd, code, bad["corrupt safetensors"].parent / "good", "holds an adapter")
    assert "--adapter" in line
    assert not out.exists()


def test_a_validation_interval_longer_than_the_epoch_is_one_sentence(tmp_path, capfd):
    # The sample's 320 rows in batches of 16 are 20 batches an epoch; the GPU config validates every 500.
    code = run_main(
        *cli_args(tmp_path, "fit", "--config", str(ROOT / "configs/demo.yaml")),
        *("--trainer.val_check_interval", "500", "--data.init_args.batch_size", "16"),
    )
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("qlit: error:")]
    assert lines == [
        "qlit: error: trainer.val_check_interval (500) is more than the 20 training batches of an epoch: lower it, "
        "give a fraction of the epoch (0.5), or set trainer.check_val_every_n_epoch: null to count batches across "
        "epochs."
    ]
