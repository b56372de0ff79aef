"""Checkpoints stored quantized (GPTQ / AWQ through compressed-tensors, bitsandbytes 4-bit): found in their config,
loaded as stored and kept packed, LoRA trained on them through the CLI, merged faithfully, and each mistake one
sentence."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli, scalars
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from qlit.callbacks.params import weight_bytes
from qlit.errors import QlitError
from qlit.export import export_merged
from qlit.models.loading import checkpoint_quantization, load_causal_lm
from qlit.models.quant import backend_class
from qlit.models.quant.prequantized import PackedLinear, _awq_scale, _calibration, quantize_checkpoint
from qlit.models.quantization import Quantization
from qlit.models.tiny import resolve_tiny
from qlit.module import QLitModule

CPU = torch.device("cpu")
FP32 = Quantization(compute_dtype="float32")
SHORT = [
    "--trainer.max_steps",
    "24",
    "--trainer.max_epochs",
    "-1",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.val_check_interval",
    "24",
    "--model.init_args.lr_scheduler.init_args.warmup_steps",
    "4",
]


def _tool():
    spec = importlib.util.spec_from_file_location("make_quantized", ROOT / "tools" / "make_quantized.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2 quantized with GPTQ (4 bits, groups of 32) by tools/make_quantized.py."""
    return _tool().main(["qlit-tiny/qwen2", str(tmp_path_factory.mktemp("gptq") / "model")])


@pytest.fixture(scope="module")
def sentences() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    return _calibration(AutoTokenizer.from_pretrained(resolve_tiny("qlit-tiny/qwen2")), 16, 32)


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


# ----- the checkpoint on disk -----------------------------------------------------------------------------------------
def test_the_gptq_checkpoint_stores_4bit_integers_in_groups_of_32(gptq_dir):
    config = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"], weights["type"]) == (4, 32, True, "int")
    assert "GPTQModifier" in (gptq_dir / "recipe.yaml").read_text()
    with safe_open(str(gptq_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.0.mlp.down_proj."  # 64 outputs, 128 inputs
        assert prefix + "weight" not in keys  # no full-precision copy beside the integers
        packed, scale = f.get_tensor(prefix + "weight_packed"), f.get_tensor(prefix + "weight_scale")
        assert packed.dtype == torch.int32 and packed.shape == (64, 128 * 4 // 32)  # eight weights to an int32
        assert scale.shape == (64, 128 // 32)
        assert "lm_head.weight" in keys and "lm_head.weight_packed" not in keys  # the head stays unquantized
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], -1).flatten()
    assert len(nibbles.unique()) == 16  # every one of the 16 levels is used: 4 bits, not 8 stored in 4


def test_gptq_error_feedback_beats_round_to_nearest_on_held_out_text(gptq_dir, sentences):
    from qlit.models.quant.prequantized import _fake_quantize, _qparams

    original = AutoModelForCausalLM.from_pretrained(resolve_tiny("qlit-tiny/qwen2"), dtype=torch.float32)
    reference = logits(original, sentences)
    with torch.no_grad():
        for module in original.model.modules():
            if isinstance(module, torch.nn.Linear):
                scale, zero = _qparams(module.weight, 4, 32, symmetric=True)
                module.weight.copy_(_fake_quantize(module.weight, scale, zero, 4, 32))
    rtn = (logits(original, sentences) - reference).abs().mean()
    gptq = load_causal_lm(str(gptq_dir), quantization=FP32, dtype="auto", device=CPU)
    error = (logits(gptq, sentences) - reference).abs().mean()
    assert error < 0.9 * rtn, (float(error), float(rtn))


def test_awq_scales_leave_the_float_model_unchanged_and_its_tiny_model_loads(sentences, tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    before = logits(model, sentences)
    with torch.no_grad():
        _awq_scale(model, model.model.layers[0], sentences, bits=4, group_size=32)
    # The scales move into the norms and layers before: only the rounding, later, sees them.
    torch.testing.assert_close(logits(model, sentences), before, rtol=1e-4, atol=1e-4)
    awq = resolve_tiny("qlit-tiny/qwen2-awq")
    assert "AWQModifier" in (Path(awq) / "recipe.yaml").read_text()
    assert checkpoint_quantization("qlit-tiny/qwen2-awq", FP32) == Quantization(
        mode="awq", bits=4, compute_dtype="float32"
    )
    loaded = load_causal_lm("qlit-tiny/qwen2-awq", quantization=FP32, dtype="auto", device=CPU)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, PackedLinear)


# ----- detection and refusals --------------------------------------------------------------------------------------
def test_the_mode_is_the_checkpoints_unless_named_and_bits_come_from_its_config(gptq_dir, tmp_path):
    expected = Quantization(mode="gptq", bits=4, compute_dtype="float32")
    for given in (FP32, Quantization(mode="prequantized", compute_dtype="float32"), expected):
        assert checkpoint_quantization(str(gptq_dir), given) == expected
    # Without llm-compressor's recipe the algorithm is unknown: the weights are named by their scheme.
    copy = shutil.copytree(gptq_dir, tmp_path / "no-recipe")
    (copy / "recipe.yaml").unlink()
    assert checkpoint_quantization(str(copy), FP32).mode == "compressed-tensors"


@pytest.mark.parametrize(
    ("given", "sentence"),
    [
        (
            Quantization(mode="nf4"),
            "quantization.mode nf4 conflicts with model '{d}', whose config.json stores it as mode gptq, bits 4 "
            "(quantization_config.quant_method compressed-tensors): leave the quantization block out to load it as "
            "stored, or set quantization.mode gptq, quantization.bits 4.",
        ),
        (Quantization(mode="gptq", bits=8), "quantization.bits 8 conflicts with model '{d}'"),
        (Quantization(mode="awq"), "quantization.mode awq conflicts with model '{d}'"),
    ],
)
def test_a_block_that_contradicts_the_checkpoint_is_one_sentence_naming_both(gptq_dir, given, sentence):
    with pytest.raises(QlitError) as err:
        checkpoint_quantization(str(gptq_dir), given)
    assert str(err.value).startswith(sentence.format(d=gptq_dir))


def test_the_conflict_fails_when_the_config_is_read_before_any_weight(gptq_dir, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(QlitError, match="quantization.mode nf4 conflicts with model"):
        QLitModule(pretrained=str(gptq_dir), quantization=Quantization(mode="nf4"), adapter=LoraConfig())
    with pytest.raises(QlitError, match="stores frozen k-bit weights that cannot be fully fine-tuned"):
        QLitModule(pretrained=str(gptq_dir))  # the default block, resolved to GPTQ: an adapter is needed


def test_a_stored_mode_on_an_unquantized_checkpoint_is_refused(tiny_qwen2):
    with pytest.raises(QlitError) as err:
        checkpoint_quantization(tiny_qwen2, Quantization(mode="gptq"))
    assert str(err.value) == (
        f"quantization.mode gptq loads a checkpoint stored quantized, but model '{tiny_qwen2}' is not (its "
        "config.json has no quantization_config): set quantization.mode to none or to a mode that quantizes it "
        "while loading (nf4)."
    )
    assert checkpoint_quantization(tiny_qwen2, Quantization(mode="nf4")).mode == "nf4"  # unchanged


def _with_config(gptq_dir: Path, tmp_path: Path, change) -> str:
    copy = shutil.copytree(gptq_dir, tmp_path / "changed")
    config = json.loads((copy / "config.json").read_text())
    change(config["quantization_config"])
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        (
            lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}),
            "is stored with quantized activations too",
        ),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3), "stores int weights of 3 bits"),
        (lambda q: (q.clear(), q.update(quant_method="gptq", bits=4)), "is stored in AutoGPTQ's format"),
        (lambda q: (q.clear(), q.update(quant_method="fp8")), "is stored quantized with quant_method 'fp8'"),
    ],
)
def test_checkpoints_qlit_cannot_train_as_stored_are_one_sentence(gptq_dir, tmp_path, change, sentence):
    name = _with_config(gptq_dir, tmp_path, change)
    with pytest.raises(QlitError, match=f"^(Model '{name}' )?{sentence}") as err:
        checkpoint_quantization(name, FP32)
    assert "\n" not in str(err.value)


def test_without_compressed_tensors_the_sentence_names_the_extra(gptq_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails as if not installed
    with pytest.raises(QlitError) as err:
        checkpoint_quantization(str(gptq_dir), FP32)
    assert str(err.value) == (
        f"Model '{gptq_dir}' is stored in compressed-tensors' format, which needs the compressed-tensors package: "
        "pip install 'qlit[gptq]'."
    )


# ----- loaded as stored ----------------------------------------------------------------------------------------------
def test_the_base_stays_packed_and_computes_what_transformers_decompressed_computes(gptq_dir, sentences):
    spec = checkpoint_quantization(str(gptq_dir), FP32)
    model = load_causal_lm(str(gptq_dir), quantization=spec, dtype="auto", device=CPU)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 14  # q, k, v, o, gate, up, down of both layers
    out = logits(model, sentences)
    # transformers' own route: the whole model de-compressed to float32 at its first forward pass.
    dense = AutoModelForCausalLM.from_pretrained(str(gptq_dir), dtype=torch.float32)
    torch.testing.assert_close(out, logits(dense, sentences), rtol=0, atol=1e-5)
    # ... while these layers are still packed after forward passes: 4-bit integers and scales, no float weight.
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer) is PackedLinear and "weight" not in dict(layer.named_parameters())
    assert layer.weight_packed.dtype == torch.int32 and layer.weight.shape == (64, 128)
    linear_bytes = sum(m.in_features * m.out_features * 4 for m in packed)  # what they take in float32
    stored = sum(p.numel() * p.element_size() for m in packed for p in m.parameters())
    assert stored < linear_bytes / 6  # 4 bits a weight plus a float32 scale for 32 of them: 1/8 + 1/32
    assert weight_bytes(model) < weight_bytes(dense) - linear_bytes * 0.8


def test_labels_name_the_method_and_the_checkpoints_bits():
    cls = backend_class("gptq")
    assert cls.base_label("gptq", bits=4) == "GPTQ 4-bit"
    assert cls.technique_label("gptq", "LoraConfig", bits=4) == "GPTQ 4-bit + LoRA"
    assert cls.technique_label("awq", "LoraConfig", bits=8) == "AWQ 8-bit + LoRA"
    assert cls.base_label("compressed-tensors", bits=4) == "W4A16"
    assert cls.technique_label("gptq", "IA3Config", bits=4) is None  # "IA3 on GPTQ 4-bit"
    bnb = backend_class("bnb-nf4")
    assert bnb.technique_label("bnb-nf4", "LoraConfig") == "QLoRA (pre-quantized NF4)"


# ----- LoRA on it: fit, reload, export --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory, gptq_dir):
    tmp = tmp_path_factory.mktemp("gptq_run")
    config = str(ROOT / "configs/demo_gptq.yaml")
    cli = run_cli(tmp, "fit", "--config", config, "--model.init_args.pretrained", str(gptq_dir), *SHORT)
    return cli, Path(cli.trainer.log_dir) / "adapter"


def test_lora_trains_through_the_cli_on_the_packed_base(gptq_run):
    cli, adapter = gptq_run
    losses = [v for _, v in sorted(scalars(cli.trainer.log_dir)["train/loss"])]
    assert len(losses) == 24 and sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses  # batches of 2: noisy steps
    model = cli.model.model
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 14
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    record = json.loads((adapter / "qlit_base.json").read_text())["quantization"]
    assert (record["mode"], record["bits"]) == ("gptq", 4)  # the format the adapter trained against
    assert cli.model.study_hparams()["quantization"] == "gptq"


def test_the_saved_adapter_reloads_onto_the_checkpoint_with_the_same_logits(gptq_run, gptq_dir, sentences):
    cli, adapter = gptq_run
    trained = logits(cli.model.model, sentences)
    spec = checkpoint_quantization(str(gptq_dir), FP32)
    base = load_causal_lm(str(gptq_dir), quantization=spec, dtype="auto", device=CPU)
    reloaded = PeftModel.from_pretrained(base, str(adapter))
    torch.testing.assert_close(logits(reloaded, sentences), trained, rtol=0, atol=1e-6)


def test_export_merges_into_the_weights_it_trained_against(gptq_run, tmp_path, sentences):
    cli, adapter = gptq_run
    out = export_merged(adapter, tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    delta = (logits(merged, sentences) - logits(cli.model.model, sentences)).abs().max()
    assert delta < 5e-5, float(delta)  # W + BA in one matrix re-associates float32 sums: measured ~1e-5


def test_export_without_dequantizing_is_refused_in_one_sentence(gptq_run, tmp_path):
    _, adapter = gptq_run
    with pytest.raises(QlitError) as err:
        export_merged(adapter, tmp_path / "merged", dequantize=False)
    assert str(err.value) == (
        f"Adapter '{adapter}' trained on a checkpoint stored quantized (GPTQ), which holds no full-precision weights "
        "to merge into: leave --dequantize true (the weights it trained against), or pass --base with the "
        "unquantized original and --quantization.mode none."
    )


def test_an_adapter_trained_on_gptq_refuses_another_format(gptq_run, tmp_path, tiny_qwen2):
    _, adapter = gptq_run
    with pytest.raises(QlitError, match="quantization.mode gptq loads a checkpoint stored quantized, but model "):
        export_merged(adapter, tmp_path / "merged", base=tiny_qwen2)  # the unquantized original
    with pytest.raises(QlitError) as err:
        QLitModule(
            pretrained="qlit-tiny/qwen2-awq",
            quantization=FP32,
            adapter_path=str(adapter),
            allow_base_mismatch=True,
        )
    assert str(err.value) == (
        f"model.adapter_path '{adapter}' was trained on a checkpoint stored as quantization.mode gptq (bits 4), but "
        "this base is stored as mode awq (bits 4): load it onto the checkpoint it was trained on."
    )


# ----- bitsandbytes 4-bit saved by transformers -------------------------------------------------------------------
def test_a_saved_bitsandbytes_4bit_checkpoint_loads_as_stored_and_trains(tmp_path, tiny_qwen2):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(tiny_qwen2, quantization_config=config, device_map={"": CPU})
    saved.save_pretrained(tmp_path / "nf4")
    shutil.copy(Path(tiny_qwen2) / "tokenizer.json", tmp_path / "nf4")
    spec = checkpoint_quantization(str(tmp_path / "nf4"), FP32)
    assert spec.mode == "bnb-nf4"
    with pytest.raises(QlitError, match="quantization.mode fp4 conflicts with model"):
        checkpoint_quantization(str(tmp_path / "nf4"), Quantization(mode="fp4"))
    module = QLitModule(pretrained=str(tmp_path / "nf4"), quantization=FP32, adapter=LoraConfig(r=4))
    module.configure_model()
    import bitsandbytes as bnb

    assert isinstance(module.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    module.model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in module.model.named_parameters() if "lora_B" in n)


def test_quantize_checkpoint_refuses_a_group_size_that_does_not_divide_the_inputs(tmp_path, tiny_qwen2):
    with pytest.raises(QlitError, match="group_size 48 does not divide self_attn.q_proj's 64 inputs"):
        quantize_checkpoint(tiny_qwen2, tmp_path / "out", group_size=48)
