"""The qat backend: torchao's fake int4 quantization put into the decoder projections after loading, LoRA (or the whole
model) trained through it via the CLI, the model converted to real int4 weights at the end of fit and its validation
loss stated against the fake-quantized one; the converted base saved where the adapter loads onto it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli, scalars
from peft import LoraConfig, PeftModel
from torchao.quantization import IntxUnpackedToInt8Tensor
from torchao.quantization.qat import FakeQuantizedLinear
from transformers import AutoModelForCausalLM

from qlit.errors import QlitError
from qlit.export import export_merged
from qlit.models.loading import load_causal_lm
from qlit.models.quant import backend_class
from qlit.models.quantization import Quantization
from qlit.module import QLitModule
from qlit.study.techniques import technique

CPU = torch.device("cpu")
# 12 optimizer steps on the same 4 rows (one batch), validated at the end on 8 rows.
SHORT_FIT = [
    *("fit", "--config", str(ROOT / "configs/demo_qat.yaml"), "--trainer.max_steps", "12"),
    *("--trainer.max_epochs", "-1", "--trainer.val_check_interval", "12", "--trainer.log_every_n_steps", "1"),
    *("--trainer.check_val_every_n_epoch", "null"),
    *("--data.init_args.limit_train_samples", "4", "--data.init_args.batch_size", "4"),
    *("--data.init_args.limit_val_samples", "8", "--latency.probe_samples", "1", "--latency.probe_new_tokens", "2"),
]


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits.float()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(0))


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def fit(tmp: Path, *extra: str) -> tuple[object, Path, list[str]]:
    """A short ``qlit fit`` of the QAT demo; its CLI, its run directory and the qlit lines it printed."""
    lines = _Lines()
    console = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    console.addHandler(lines)
    try:
        cli = run_cli(tmp, *SHORT_FIT, *extra)
    finally:
        console.removeHandler(lines)
    return cli, Path(cli.trainer.log_dir), lines.lines


@pytest.fixture(scope="module")
def qat_lora(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("qat_lora"))


def test_qat_lora_trains_beside_the_fake_quantized_base_through_the_cli(qat_lora):
    _, run, _ = qat_lora
    loss = [v for _, v in scalars(run)["train/loss"]]
    assert len(loss) == 12 and loss[-1] < 0.7 * loss[0], loss
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_the_end_of_fit_converts_to_int4_and_states_both_validation_losses(qat_lora):
    cli, run, lines = qat_lora
    layer = cli.model.model.base_model.model.model.layers[0].mlp.down_proj
    weight = layer.base_layer.weight  # converted in place: real int4 values, under the adapter still
    assert isinstance(weight, IntxUnpackedToInt8Tensor) and weight.target_dtype == torch.int4
    assert int(weight.qdata.min()) >= -8 and int(weight.qdata.max()) <= 7
    logged = scalars(run)
    fake, converted = logged["qat/fake_quant_val_loss"][-1], logged["qat/converted_val_loss"][-1]
    assert fake[0] == converted[0] == 12  # at the last step
    # torchao's fake quantization simulates the convert step's numerics: the two losses agree.
    assert converted[1] == pytest.approx(fake[1], abs=1e-4)
    assert converted[1] == pytest.approx(logged["val/loss"][-1][1], abs=1e-4)
    stated = [line for line in lines if line.startswith("QAT: ")]
    assert stated == [
        f"QAT: validation loss {converted[1]:.4f} converted to int4 weights and int8 per-token activations, groups of "
        f"32, against {fake[1]:.4f} fake-quantized as trained (+0.0000); base saved to {run / 'qat'} (the adapter "
        "loads onto it)."
    ]
    assert cli.model.saved_to == run / "adapter"  # the adapter is what the fit trained


def test_the_converted_base_reloads_and_takes_the_adapter(qat_lora, input_ids):
    cli, run, _ = qat_lora
    base = AutoModelForCausalLM.from_pretrained(run / "qat")
    assert isinstance(base.model.layers[1].self_attn.k_proj.weight, IntxUnpackedToInt8Tensor)
    assert not isinstance(base.lm_head.weight, IntxUnpackedToInt8Tensor)  # the head and embeddings stay
    assert (run / "qat" / "tokenizer_config.json").is_file()
    deployed = PeftModel.from_pretrained(base, str(run / "adapter"))
    torch.testing.assert_close(logits(deployed, input_ids), logits(cli.model.model, input_ids), rtol=1e-5, atol=1e-5)


def test_the_saved_adapter_reloads_onto_the_fake_quantized_base_with_the_same_logits(qat_lora, input_ids):
    cli, run, _ = qat_lora
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        quantization=Quantization(mode="qat", compute_dtype="float32", group_size=32),
        adapter_path=str(run / "adapter"),
    )
    module.configure_model()
    assert isinstance(module.model.base_model.model.model.layers[0].mlp.up_proj.base_layer, FakeQuantizedLinear)
    expected = logits(cli.model.model, input_ids)  # the converted model: the same numbers as the fake quantization
    torch.testing.assert_close(logits(module.model, input_ids), expected, rtol=1e-4, atol=1e-4)
    with module.model.disable_adapter():
        assert (logits(module.model, input_ids) - expected).abs().max() > 1e-3


def test_qat_without_an_adapter_trains_the_whole_model_and_saves_it_converted(tmp_path, input_ids):
    cli, run, lines = fit(
        tmp_path, "--model.init_args.adapter", "null", "--model.init_args.optimizer.init_args.lr", "0.001"
    )
    loss = [v for _, v in scalars(run)["train/loss"]]
    assert loss[-1] < 0.7 * loss[0], loss
    assert cli.model.saved_to == run / "qat" and not (run / "adapter").exists()
    assert any(line.startswith("QAT: validation loss") and f"saved to {run / 'qat'}." in line for line in lines)
    saved = AutoModelForCausalLM.from_pretrained(run / "qat")
    assert isinstance(saved.model.layers[0].mlp.gate_proj.weight, IntxUnpackedToInt8Tensor)
    torch.testing.assert_close(logits(saved, input_ids), logits(cli.model.model, input_ids), rtol=1e-5, atol=1e-5)


# ----- the layers, fidelity and export --------------------------------------------------------------------------------
def qat_model(scheme: str | None = None, group_size: int | None = None):
    spec = Quantization(mode="qat", compute_dtype="float32", scheme=scheme, group_size=group_size)
    model = load_causal_lm("qlit-tiny/qwen2", quantization=spec, dtype="float32", device=CPU)
    spec.backend.convert(model, has_adapter=False)
    return spec.backend, model


@pytest.mark.parametrize(("scheme", "activations"), [(None, True), ("int4_weight_only", False)])
def test_the_decoder_projections_are_fake_quantized_and_nothing_else(scheme, activations):
    backend, model = qat_model(scheme, group_size=64)
    layers = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    assert len(layers) == 14 and type(model.lm_head) is torch.nn.Linear  # 7 projections x 2 layers
    for layer in layers:
        assert (layer.activation_fake_quantizer is not None) is activations
        assert layer.weight_fake_quantizer.config.granularity.group_size == 64
        weight = backend.dequantized_weight(layer)
        # int4 in groups of 64: at most 16 distinct values in each group of a row
        groups = weight.reshape(weight.shape[0], -1, 64)
        assert max(len(torch.unique(g)) for row in groups for g in row) <= 16
        assert (weight - layer.weight).abs().max() > 0  # rounded, not the latent weight
    assert backend.dequantized_weight(model.lm_head) is None


def test_export_merges_into_the_fake_quantized_weights_or_refuses_quantized_activations(tmp_path, input_ids):
    torch.manual_seed(0)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        quantization=Quantization(mode="qat", scheme="int4_weight_only", compute_dtype="float32"),
        adapter=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    module.configure_model()
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    module.save_adapter_to(tmp_path / "adapter")
    expected = logits(module.model, input_ids)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(tmp_path / "adapter", tmp_path / "merged"))
    assert all(type(m) is not FakeQuantizedLinear for m in merged.modules())
    error = (logits(merged, input_ids) - expected).abs().max()
    assert error < 5e-5, error  # max |Δlogit| 1e-5: the one float32 merge of fq(W) + BA
    original = AutoModelForCausalLM.from_pretrained(
        export_merged(tmp_path / "adapter", tmp_path / "original", dequantize=False)
    )
    assert (logits(original, input_ids) - expected).abs().max() > 10 * error  # int4 rounding is gone there
    with pytest.raises(QlitError, match=r"^Adapter 'a' trained on a QAT base whose layers also quantize their "):
        Quantization(mode="qat").backend.check_export("a", dequantize=True)
    Quantization(mode="qat").backend.check_export("a", dequantize=False)


# ----- refusals and labels --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "sentence"),
    [
        (
            {"scheme": "int2_weight_only"},
            "Unknown quantization.scheme 'int2_weight_only' for mode qat: use one of int8_dynamic_act_int4_weight, "
            "int4_weight_only.",
        ),
        ({"group_size": 0}, "quantization.group_size must be a positive number of weights, got 0."),
        ({"axis": 0}, "quantization.axis applies to mode"),
    ],
)
def test_a_bad_scheme_or_group_size_is_one_sentence_when_the_config_is_read(fields, sentence):
    with pytest.raises(QlitError) as err:
        Quantization(mode="qat", **fields)
    assert str(err.value).startswith(sentence)


def test_a_group_size_that_does_not_divide_a_projection_is_one_sentence_before_training():
    with pytest.raises(QlitError) as err:
        qat_model(group_size=48)
    assert str(err.value) == (
        "quantization.group_size 48 does not divide the 64 inputs of 'model.layers.0.self_attn.q_proj': use a "
        "divisor of every projection's input size (e.g. 32)."
    )


def test_a_gpt2_base_with_no_linear_projection_is_refused():
    spec = Quantization(mode="qat", compute_dtype="float32")
    model = load_causal_lm("qlit-tiny/gpt2", quantization=spec, dtype="float32", device=CPU)
    with pytest.raises(QlitError, match="^quantization.mode qat found no nn.Linear projection to quantize in GPT2"):
        spec.backend.convert(model, has_adapter=False)


def test_a_study_names_qat_with_and_without_lora():
    cls = backend_class("qat")
    assert cls.base_label("qat") == "QAT int4"
    assert technique("qat", "LoraConfig") == "QAT int4 + LoRA"
    assert technique("qat", "full", dtype="float32") == "QAT int4"
    assert technique("qat", "IA3Config") == "IA3 on QAT int4"
    Quantization(mode="qat").backend.check_full_fine_tuning()  # trains without an adapter
