"""The hqq backend: its options refused by name, its base quantized after loading (deterministically), LoRA trained
through peft's HQQ layer from configs/demo_hqq.yaml, the adapter reloaded, exported, its weights counted, named."""

from __future__ import annotations

import json
import logging
import sys
import warnings

import peft
import pytest
import torch
from helpers import ROOT, cli_args, run_cli, run_main, scalars
from hqq.core.quantize import HQQLinear
from transformers import AutoModelForCausalLM

from qlit.errors import QlitError
from qlit.models.adapters import load_adapter
from qlit.models.loading import load_causal_lm
from qlit.models.quant import backend_class
from qlit.models.quantization import Quantization
from qlit.paths import QLIT_BASE_FILE

CPU = torch.device("cpu")
DEMO_HQQ = str(ROOT / "configs/demo_hqq.yaml")
# configs/demo_hqq.yaml overfitting 8 rows: 4 batches of 2, 10 epochs (40 optimizer steps), validated at the end.
OVERFIT = (
    *("fit", "--config", DEMO_HQQ, "--trainer.max_epochs", "10", "--trainer.check_val_every_n_epoch", "10"),
    *("--trainer.log_every_n_steps", "1", "--data.init_args.limit_train_samples", "8"),
    *("--data.init_args.limit_val_samples", "8", "--latency.probe_samples", "1", "--latency.probe_new_tokens", "2"),
)


def hqq(**options) -> Quantization:
    return Quantization(mode="hqq", compute_dtype="float32", **options)


def load(spec: Quantization) -> torch.nn.Module:
    return load_causal_lm("qlit-tiny/qwen2", quantization=spec, dtype="auto", device=CPU)


# ----- the spec, read with the config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "sentence"),
    [
        ({"bits": 5}, "quantization.bits is 5, but mode hqq stores 1, 2, 3, 4 or 8 bits."),
        ({"bits": 0}, "quantization.bits is 0, but mode hqq stores 1, 2, 3, 4 or 8 bits."),
        ({"group_size": 12}, "quantization.group_size is 12, but mode hqq needs a multiple of 8 (e.g. 64)."),
        ({"group_size": 0}, "quantization.group_size is 0, but mode hqq needs a multiple of 8 (e.g. 64)."),
        ({"axis": 2}, "quantization.axis is 2, but mode hqq groups along axis 0 or 1."),
        ({"axis": True}, "quantization.axis is True, but mode hqq groups along axis 0 or 1."),
    ],
)
def test_a_bad_option_value_is_one_sentence_naming_the_field(options, sentence):
    with pytest.raises(QlitError) as err:
        hqq(**options)
    assert str(err.value) == sentence


@pytest.mark.parametrize("options", [{}, {"bits": 1}, {"bits": 3, "group_size": 32, "axis": 0}, {"bits": 8}])
def test_good_options_are_taken_and_the_defaults_are_hqqs(options):
    backend = hqq(**options).backend
    assert (backend.bits, backend.group_size, backend.axis) == (
        options.get("bits", 4),
        options.get("group_size", 64),
        options.get("axis", 1),
    )


def test_the_options_on_a_cli_config_are_refused_before_any_run_directory(tmp_path, capsys):
    code = run_main(*cli_args(tmp_path, "fit", "--config", DEMO_HQQ, "--model.init_args.quantization.bits", "6"))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "quantization.bits is 6, but mode hqq stores 1, 2, 3, 4 or 8 bits." in err
    assert not (tmp_path / "logs").exists()


def test_without_the_hqq_package_the_config_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "hqq", None)  # what `import hqq` finds when it is not installed
    with pytest.raises(QlitError) as err:
        hqq()
    assert str(err.value) == (
        "quantization.mode hqq needs the hqq package, which is not installed: pip install 'qlit[hqq]'."
    )
    assert run_main(*cli_args(tmp_path, "fit", "--config", DEMO_HQQ)) == 1
    assert "pip install 'qlit[hqq]'" in capsys.readouterr().err


def test_a_group_size_that_does_not_divide_a_layer_is_one_sentence_naming_it(tmp_path, capsys):
    # A multiple of 8 (the spec takes it), but the tiny model's layers have 64 or 128 input features.
    with pytest.raises(QlitError) as err:
        load(hqq(group_size=48))
    assert str(err.value) == (
        "quantization.group_size 48 does not divide the 64 input features of layer 'model.layers.0.self_attn.q_proj': "
        "use a group size that divides every layer's (e.g. 32)."
    )
    args = cli_args(tmp_path, "fit", "--config", DEMO_HQQ, "--model.init_args.quantization.group_size", "48")
    assert run_main(*args) == 1
    err_text = capsys.readouterr().err
    assert "Traceback" not in err_text and "does not divide the 64 input features of layer" in err_text


def test_a_model_without_linear_layers_to_quantize_is_refused():
    with pytest.raises(QlitError, match=r"^quantization\.mode hqq found no nn\.Linear layer .* \(GPT-2's"):
        load_causal_lm("qlit-tiny/gpt2", quantization=hqq(), dtype="auto", device=CPU)


# ----- what the backend declares --------------------------------------------------------------------------------------
def test_labels_fast_paths_and_recipe():
    cls = backend_class("hqq")
    assert cls.base_label("hqq") == "HQQ 4-bit" and cls.base_label("hqq", bits=2) == "HQQ 2-bit"
    assert cls.technique_label("hqq", "LoraConfig") == "HQQ 4-bit + LoRA"
    assert cls.technique_label("hqq", "LoraConfig", bits=3) == "HQQ 3-bit + LoRA"
    from qlit.study.techniques import describe_config, technique

    assert technique("hqq", "LoraConfig+dora", bits=8) == "DoRA on HQQ 8-bit"
    import yaml

    described = describe_config(yaml.safe_load(open(DEMO_HQQ)))
    assert described["bits"] == 4 and technique(**{k: described[k] for k in ("quantization", "adapter", "bits")}) == (
        "HQQ 4-bit + LoRA"
    )
    backend = hqq().backend
    assert backend.needs_adapter and not backend.kbit_training
    assert not backend.allows_cuda_graphs and not backend.allows_fused_lora
    with pytest.raises(QlitError, match="quantization mode 'hqq' stores frozen k-bit weights"):
        backend.check_full_fine_tuning()


def test_peft_k_bit_recipe_breaks_this_base_so_it_is_not_taken():
    # What kbit_training False stands for: prepare_model_for_kbit_training casts the norms to fp32, and the HQQ
    # layers, de-quantizing to the bf16 compute dtype, then multiply fp32 inputs by bf16 weights.
    model = load(Quantization(mode="hqq", compute_dtype="bfloat16"))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()
    prepared = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with pytest.raises(RuntimeError, match="same dtype"):
        prepared(ids)


@pytest.mark.parametrize(
    "adapter",
    [
        peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
        peft.LoHaConfig(r=4, target_modules=["q_proj"]),
        peft.AdaLoraConfig(target_modules=["q_proj"], total_step=10),
    ],
)
def test_adapters_without_an_hqq_layer_in_peft_are_refused_and_peft_agrees(adapter):
    name = type(adapter).__name__
    assert hqq().backend.adapter_refusal(adapter) == (
        f"{name} cannot train on an hqq base, because peft wraps HQQ layers for LoRA only: use peft.LoraConfig (DoRA "
        "and rsLoRA included), a prompt-learning method, or quantization.mode nf4."
    )
    with pytest.raises((ValueError, TypeError), match="not supported"):
        peft.get_peft_model(load(hqq()), adapter)


def test_lora_dora_and_prompt_learning_are_taken():
    backend = hqq().backend
    for adapter in (peft.LoraConfig(), peft.LoraConfig(use_dora=True), peft.PromptTuningConfig(num_virtual_tokens=4)):
        assert backend.adapter_refusal(adapter) is None


# ----- the base -------------------------------------------------------------------------------------------------------
def test_quantization_is_deterministic_and_leaves_the_head_and_skipped_layers():
    spec = hqq(bits=2, group_size=32, skip_modules=["down_proj"])
    first, second = load(spec), load(spec)
    layer = first.model.layers[0].self_attn.q_proj
    assert isinstance(layer, HQQLinear) and layer.meta["nbits"] == 2 and layer.meta["group_size"] == 32
    assert type(first.model.layers[0].mlp.down_proj) is torch.nn.Linear and type(first.lm_head) is torch.nn.Linear
    for a, b in zip(first.modules(), second.modules(), strict=True):
        if isinstance(a, HQQLinear):
            assert torch.equal(a.W_q, b.W_q)
            assert torch.equal(a.meta["scale"], b.meta["scale"]) and torch.equal(a.meta["zero"], b.meta["zero"])
    # The layers are what the fidelity callback compares with the original weights.
    assert torch.equal(spec.backend.dequantized_weight(layer), layer.dequantize())


# ----- a fit from the demo config ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hqq")
    cli = run_cli(tmp, *OVERFIT)
    run = next((tmp / "logs" / "demo_hqq").glob("version_*"))
    return cli, run


def test_lora_on_the_hqq_base_overfits_through_peft_hqq_layer(overfit):
    cli, run = overfit
    layer = cli.model.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "HqqLoraLinear" and isinstance(layer.base_layer, HQQLinear)
    losses = [value for _, value in sorted(scalars(run)["train/loss"])]
    assert len(losses) == 40
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses


def test_the_console_holds_qlits_lines_only(tmp_path, capfd, caplog, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlit"])  # as the shell runs it (not pytest's arguments beside the CLI's)
    short = ("--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "1")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        assert run_main(*cli_args(tmp_path, *OVERFIT, *short)) == 0
    out, err = capfd.readouterr()
    lines = [*(out + err).splitlines(), *(r.getMessage() for r in caplog.records), *(str(w.message) for w in caught)]
    assert any(line.startswith("demo_hqq: ") for line in lines), lines  # the fit's last line
    # hqq prints its notes as "Warning: ..." lines; qlit's lines name the run (logs/demo_hqq/...).
    noise = [line for line in lines if "warn" in line.lower() or ("hqq" in line.lower() and "demo_hqq" not in line)]
    assert noise == [], noise


def test_the_record_beside_the_adapter_holds_the_options_and_reloads_to_the_same_logits(overfit):
    cli, run = overfit
    adapter = run / "adapter"
    recorded = json.loads((adapter / QLIT_BASE_FILE).read_text())["quantization"]
    assert {k: recorded[k] for k in ("mode", "bits", "group_size", "axis")} == {
        "mode": "hqq",
        "bits": 4,
        "group_size": 64,
        "axis": 1,
    }
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    trained = cli.model.model.eval()
    reloaded = load_adapter(load(Quantization(**recorded)), adapter, "qlit-tiny/qwen2", is_trainable=False).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained(ids).logits)


def test_export_merges_into_the_dequantized_weights_within_float_rounding(overfit, tmp_path):
    from qlit.export import export_merged

    cli, run = overfit
    out = export_merged(run / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert "quantization_config" not in merged.config.to_dict()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        expected = cli.model.model.eval()(ids).logits
        delta = (merged(ids).logits - expected).abs().max().item()
    # fp32 merge of W + BA into the de-quantized 4-bit weights: max |Δlogit| 1.5e-5 on logits up to ~11 (the demo's
    # trained adapter); the original weights would be off by the 4-bit rounding, whole logits.
    assert delta < 1e-4, delta


def test_the_weights_count_hqqs_packed_bytes_scales_zeros_and_biases(overfit):
    _, run = overfit
    logged = {tag: series[-1][1] for tag, series in scalars(run).items() if tag.startswith("params/")}
    # The tiny Qwen2: 2 layers of q (64→64), k and v (64→32) with biases, o (64→64), gate and up (64→128),
    # down (128→64); 1024-token embedding and untied head of width 64; 5 norms of 64; RoPE's 8 inverse frequencies,
    # twice (inv_freq and original_inv_freq).
    weights, biases = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 128 * 64), 2 * (64 + 32 + 32)
    plain, lora = 2 * 1024 * 64 + 5 * 64, 16_384  # LoRA r=8 on the 14 layers
    packed = weights // 2  # 4 bits: two to a byte
    constants = 2 * (weights // 64) * 4  # one fp32 scale and one fp32 zero point per group of 64
    expected = packed + constants + 4 * (biases + plain + lora + 2 * 8)
    assert expected == 638_272
    assert logged["params/weight_gib"] == pytest.approx(expected / 2**30)
    assert logged["params/total"] == weights + biases + plain + lora == 221_760
    assert logged["params/trainable"] == lora


def test_the_run_is_named_by_its_technique(overfit):
    from qlit.study.runs import read_run, run_row

    _, run = overfit
    assert run_row(read_run(run))["technique"] == "HQQ 4-bit + LoRA"
