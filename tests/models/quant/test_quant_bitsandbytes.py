"""The bitsandbytes backend (int8, nf4, fp4): its load config, dtypes, and the adapters it refuses and why."""

from __future__ import annotations

import peft
import pytest
import torch

from qlit.errors import QlitError
from qlit.models.quantization import Quantization

CPU = torch.device("cpu")


def test_the_4bit_config_is_the_qlora_recipe_and_int8_is_llm_int8():
    nf4 = Quantization(mode="nf4", quant_storage="bfloat16").backend.load_kwargs(CPU)
    assert nf4["device_map"] == {"": CPU}
    config = nf4["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant  # on by default for 4 bits
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and config.bnb_4bit_quant_storage == torch.bfloat16
    fp4 = Quantization(mode="fp4", double_quant=False).backend.load_kwargs(CPU)["quantization_config"]
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    int8 = Quantization(mode="int8", int8_threshold=4.0).backend.load_kwargs(CPU)["quantization_config"]
    assert int8.load_in_8bit and int8.llm_int8_threshold == 4.0


@pytest.mark.parametrize(
    ("dtype", "weights", "columns"),
    [("auto", torch.float32, ("float32", True)), ("bfloat16", torch.bfloat16, ("float32", True))],
)
def test_the_compute_dtype_is_the_training_dtype_whatever_the_module_dtype(dtype, weights, columns):
    spec = Quantization(mode="nf4", compute_dtype="float32")
    assert spec.weights_dtype(dtype) == weights  # the unquantized parts (norms, embeddings) keep an explicit dtype
    assert spec.training_dtype(dtype) == "float32"
    assert spec.study_columns(dtype) == {"quantization": "nf4", "compute_dtype": columns[0], "double_quant": columns[1]}
    assert Quantization(mode="int8").study_columns("auto")["double_quant"] is False


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4"])
def test_frozen_kbit_weights_need_an_adapter_and_the_kbit_recipe(mode):
    backend = Quantization(mode=mode).backend
    assert backend.kbit_training
    with pytest.raises(QlitError, match=f"quantization mode '{mode}' stores frozen k-bit weights"):
        backend.check_full_fine_tuning()


def test_float16_compute_is_refused_on_cpu_only():
    backend = Quantization(mode="nf4", compute_dtype="float16").backend
    with pytest.raises(QlitError, match="float16 is not supported on CPU"):
        backend.check_device(CPU)
    backend.check_device(torch.device("cuda"))


def test_storage_options_of_4bit_weights_are_refused_for_int8():
    with pytest.raises(QlitError, match="quant_storage applies to 4-bit quantization only, but mode is 'int8'"):
        Quantization(mode="int8", quant_storage="bfloat16")


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
@pytest.mark.parametrize("config", [peft.LoHaConfig, peft.LoKrConfig])
def test_lycoris_is_refused_on_packed_4bit_weights_but_not_on_int8(mode, config):
    reason = Quantization(mode=mode).backend.adapter_refusal(config(r=4))
    assert reason == (
        f"{config.__name__} cannot train on a {mode} base, because peft reshapes its update to the packed weight's "
        "shape: use quantization.mode int8 or none."
    )
    assert Quantization(mode="int8").backend.adapter_refusal(config(r=4)) is None


def test_dora_is_refused_on_int8_only_where_there_is_no_gpu(monkeypatch):
    dora = peft.LoraConfig(use_dora=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "DoRA (use_dora) cannot train on an int8 base on CPU" in Quantization(mode="int8").backend.adapter_refusal(
        dora
    )
    assert Quantization(mode="nf4").backend.adapter_refusal(dora) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Quantization(mode="int8").backend.adapter_refusal(dora) is None


def test_export_dequantizes_what_transformers_quantized(tiny_qwen2):
    from transformers import AutoModelForCausalLM

    backend = Quantization(mode="nf4", compute_dtype="float32").backend
    backend.check_export("adapter", dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32, **backend.load_kwargs(CPU))
    plain = backend.dequantize(model)
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert "quantization_config" not in plain.config.to_dict()
