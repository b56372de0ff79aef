"""qlit export: a merged model computes what base + adapter computed, and loads without qlit, peft or bitsandbytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli, run_main
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qlit.errors import QlitError
from qlit.export import export_merged
from qlit.models.loading import load_causal_lm
from qlit.models.quantization import Quantization
from qlit.module import QLitModule

# Neither peft nor a quantization library is needed to load an exported model: these files must not be there.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "qlit_base.json")

# Both exports and references compute in float32 here; merging W + BA into one matrix only re-associates sums, which
# moves the logits (|max| ~7) of this model by up to 1.6e-5: a few float32 steps.
FLOAT_ERROR = {"rtol": 1e-5, "atol": 5e-5}


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits.float()


def trained_adapter(directory: Path, mode: str) -> QLitModule:
    """A LoRA adapter saved by qlit on the tiny Qwen2 base stored as ``mode``, with a B that is far from zero.

    peft initialises B to zero, which would make every merge a no-op; random B stands in for a trained one.
    """
    torch.manual_seed(0)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        quantization=Quantization(mode=mode, compute_dtype="float32"),
        adapter=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    module.configure_model()
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    module.save_adapter_to(directory)
    return module.eval()


def assert_plain(directory: Path) -> None:
    assert not [name for name in ADAPTER_FILES if (directory / name).exists()]
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer_config.json").is_file()


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, input_ids):
    """An adapter on the unquantized float32 base, the logits of base + adapter, and its export via the CLI."""
    tmp = tmp_path_factory.mktemp("fp32")
    module = trained_adapter(tmp / "adapter", "none")
    assert run_main("export", "--adapter", str(tmp / "adapter"), "--output", str(tmp / "merged")) == 0
    with module.model.disable_adapter():
        base = logits(module.model, input_ids)
    return tmp, logits(module.model, input_ids), base


def test_fp32_export_computes_base_plus_adapter(fp32_run, input_ids):
    tmp, expected, base = fp32_run
    assert (expected - base).abs().max() > 0.1, "the adapter must change the model, or the merge proves nothing"
    assert_plain(tmp / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged")
    assert merged.dtype == torch.float32  # the base's own dtype: it trained unquantized in float32
    torch.testing.assert_close(logits(merged, input_ids), expected, **FLOAT_ERROR)


def test_bf16_export_rounds_the_float32_merge_once(fp32_run, input_ids, tiny_qwen2):
    tmp, expected, base_logits = fp32_run
    out = export_merged(tmp / "adapter", tmp / "merged-bf16", dtype="bfloat16")
    # Merged in float32, then rounded: each weight is the bf16 nearest to the float32 merge, not a rounded sum of
    # rounded terms.
    fp32, bf16 = load_file(tmp / "merged" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(bf16) == set(fp32)
    for name, weight in bf16.items():
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, fp32[name].to(torch.bfloat16)), name
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    # Written through a private staging folder, but kept with the usual permissions (readable by others under the
    # usual umask), as a folder made by mkdir would be.
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    # bf16 keeps 8 significant bits, and this tiny random model amplifies rounding (~3 % of its largest logit). The
    # yardstick is what bf16 costs the base alone: the export must be within twice that of base + adapter, and the
    # adapter must move the logits by far more, so that the tolerance cannot hide a missing merge.
    base_bf16 = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.bfloat16)
    bf16_noise = (logits(base_bf16, input_ids) - base_logits).abs().max()
    error = (logits(merged, input_ids) - expected).abs().max()
    assert error <= 2 * bf16_noise, (error, bf16_noise)
    assert (expected - base_logits).abs().max() > 4 * bf16_noise


@pytest.fixture(scope="module")
def kbit_run(tmp_path_factory, input_ids):
    """``kbit_run(mode)``: an adapter trained on the ``mode`` base, qlit's own logits for it, and its export."""
    runs = {}

    def run(mode: str) -> tuple[Path, torch.Tensor, Path]:
        if mode not in runs:
            tmp = tmp_path_factory.mktemp(mode)
            module = trained_adapter(tmp / "adapter", mode)
            runs[mode] = tmp, logits(module.model, input_ids), export_merged(tmp / "adapter", tmp / "merged")
        return runs[mode]

    return run


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_4bit_export_merges_into_the_dequantized_weights_the_adapter_trained_on(kbit_run, input_ids, mode):
    tmp, expected, out = kbit_run(mode)  # expected: qlit's own forward, 4-bit base + LoRA
    assert_plain(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32  # the compute dtype the adapter trained in
    torch.testing.assert_close(logits(merged, input_ids), expected, **FLOAT_ERROR)
    if mode != "nf4":
        return
    # dequantize=False merges into the checkpoint's original weights instead: the full-precision base + adapter,
    # which is a different model from the one the adapter was trained in.
    original = export_merged(tmp / "adapter", tmp / "original", dequantize=False)
    base = load_causal_lm("qlit-tiny/qwen2", quantization=Quantization(), dtype="float32", device=torch.device("cpu"))
    full_precision = logits(PeftModel.from_pretrained(base, str(tmp / "adapter")), input_ids)
    got = logits(AutoModelForCausalLM.from_pretrained(original), input_ids)
    torch.testing.assert_close(got, full_precision, **FLOAT_ERROR)
    assert (got - expected).abs().max() > 1e-2


def test_exported_model_loads_where_qlit_peft_and_bitsandbytes_are_not_installed(kbit_run, tmp_path, input_ids):
    _, _, out = kbit_run("nf4")
    torch.save(input_ids, tmp_path / "ids.pt")
    script = (
        "import importlib.util, sys\n"
        # A None entry makes `import` raise ImportError and find_spec answer None: transformers sees no such package.
        "for name in ('qlit', 'peft', 'bitsandbytes'):\n"
        "    sys.modules[name] = None\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "assert importlib.util.find_spec('peft') is None\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        check=True,
        cwd=tmp_path,
    )
    expected = logits(AutoModelForCausalLM.from_pretrained(out), input_ids)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


def test_a_checkpoint_exports_like_the_adapter_its_run_saved(tmp_path):
    cli = run_cli(
        tmp_path, "fit", "--config", str(ROOT / "configs/demo.yaml"),
        "--trainer.max_steps", "3", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "1",
    )  # fmt: skip
    run_dir = Path(cli.trainer.log_dir)
    from_adapter = export_merged(run_dir / "adapter", tmp_path / "from-adapter")
    from_ckpt = export_merged(run_dir / "checkpoints" / "last.ckpt", tmp_path / "from-ckpt")
    expected, got = load_file(from_adapter / "model.safetensors"), load_file(from_ckpt / "model.safetensors")
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_an_adapter_saved_by_peft_alone_merges_into_its_recorded_base(tmp_path, tiny_qwen2, input_ids):
    # No qlit_base.json: the base comes from peft's base_model_name_or_path, unquantized.
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_qwen2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(tmp_path / "adapter")
    out = export_merged(tmp_path / "adapter", tmp_path / "merged")
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(out), input_ids), logits(model, input_ids), **FLOAT_ERROR
    )


def test_export_help(capsys):
    assert run_main("export", "--help") == 0
    out = capsys.readouterr().out
    assert "--adapter" in out and "--output" in out and "--dtype" in out


def error_of(capsys, *args: str) -> tuple[int, str]:
    code = run_main(*args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlit: error:")]
    assert len(err) == 1, err
    return code, err[0]


def test_a_missing_adapter_is_named_in_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-adapter"
    code, err = error_of(capsys, "export", "--adapter", str(missing), "--output", str(tmp_path / "out"))
    assert code == 1
    assert str(missing) in err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_is_refused_unless_overwrite(fp32_run, capsys):
    tmp, _, _ = fp32_run
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    code, err = error_of(capsys, "export", "--adapter", str(tmp / "adapter"), "--output", str(taken))
    assert code == 1 and str(taken) in err and "--overwrite" in err
    assert (taken / "notes.txt").read_text() == "keep me"
    with pytest.raises(QlitError, match="would overwrite"):
        export_merged(tmp / "adapter", tmp, overwrite=True)  # the run directory holds the adapter being read
    assert export_merged(tmp / "adapter", taken, overwrite=True) == taken
    assert not (taken / "notes.txt").exists()
    assert_plain(taken)


def test_prompt_learning_has_nothing_to_merge(tmp_path):
    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).save_pretrained(tmp_path / "adapter")
    with pytest.raises(QlitError, match="PROMPT_TUNING.*nothing to merge"):
        export_merged(tmp_path / "adapter", tmp_path / "out")


def test_a_bitnet_base_is_merged_only_into_its_original_weights(fp32_run, tmp_path):
    tmp, _, _ = fp32_run
    adapter = shutil.copytree(tmp / "adapter", tmp_path / "adapter")
    spec = json.loads((adapter / "qlit_base.json").read_text())
    spec["quantization"]["mode"] = "bitnet"
    (adapter / "qlit_base.json").write_text(json.dumps(spec))
    with pytest.raises(QlitError, match="BitNet.*--dequantize false"):
        export_merged(adapter, tmp_path / "out")
