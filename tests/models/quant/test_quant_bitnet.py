"""The bitnet backend: converted after loading (QAT alone, packed under an adapter), saved packed, not dequantized."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from qlit.errors import QlitError
from qlit.models.bitnet import PACKED_WEIGHTS_FILE, BitLinear, PackedBitLinear, load_packed
from qlit.models.quant import QuantBackend
from qlit.models.quantization import Quantization


def test_bitnet_computes_in_the_compute_dtype_and_trains_without_an_adapter():
    spec = Quantization(mode="bitnet", compute_dtype="float32")
    assert spec.weights_dtype("auto") == torch.float32 and spec.training_dtype("bfloat16") == "float32"
    assert spec.study_columns("auto") == {"quantization": "bitnet", "compute_dtype": "float32", "double_quant": False}
    spec.backend.check_full_fine_tuning()
    assert not spec.backend.kbit_training
    with pytest.raises(QlitError, match="double_quant applies to 4-bit quantization only, but mode is 'bitnet'"):
        Quantization(mode="bitnet", double_quant=True)


@pytest.mark.parametrize(
    ("adapter", "reason"),
    [
        (peft.LoHaConfig(r=4), "LoHaConfig cannot train on a bitnet base, because peft reshapes its update"),
        (peft.LoKrConfig(r=4), "LoKrConfig cannot train on a bitnet base"),
        (peft.LoraConfig(use_dora=True), "DoRA (use_dora) cannot train on a bitnet base"),
        (peft.LoraConfig(), None),
    ],
)
def test_packed_ternary_weights_refuse_lycoris_and_dora(adapter, reason):
    got = Quantization(mode="bitnet").backend.adapter_refusal(adapter)
    assert got == reason if reason is None else got.startswith(reason)


@pytest.mark.parametrize(("has_adapter", "layer"), [(False, BitLinear), (True, PackedBitLinear)])
def test_the_base_converts_after_loading_and_saves_packed(tiny_qwen2, tmp_path, has_adapter, layer):
    backend = Quantization(mode="bitnet", compute_dtype="float32").backend
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    backend.convert(model, has_adapter=has_adapter)
    assert type(model.model.layers[0].mlp.down_proj) is layer
    target = backend.save_trained(model, tmp_path)
    assert target == tmp_path / "bitnet" and (target / PACKED_WEIGHTS_FILE).is_file()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(load_packed(target)(ids).logits, model.eval()(ids).logits)


def test_export_refuses_dequantizing_what_a_plain_model_cannot_compute():
    backend = Quantization(mode="bitnet").backend
    with pytest.raises(QlitError, match="Adapter 'run/adapter' trained on a BitNet b1.58 base.*--dequantize false"):
        backend.check_export("run/adapter", dequantize=True)
    backend.check_export("run/adapter", dequantize=False)


def test_a_mode_is_served_by_one_backend_only():
    with pytest.raises(TypeError, match="'bitnet' is served by both"):
        type("AnotherBitNet", (QuantBackend,), {"modes": ("bitnet",)})
