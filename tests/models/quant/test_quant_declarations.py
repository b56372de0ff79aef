"""What each backend declares for the rest of qlit to ask: the fast paths its base may take and how a study names
it. The callers (the CUDA graphs' plan, the fused LoRA's check, ``qlit compare``'s labels) ask these, never a mode."""

from __future__ import annotations

import pytest

from qlit.errors import QlitError
from qlit.models.fused_lora import check_fused_lora
from qlit.models.quant import QuantBackend, backend_class, described_backend
from qlit.models.quantization import Quantization


@pytest.mark.parametrize(
    ("mode", "graphs", "fused"),
    [("none", True, False), ("int8", False, False), ("nf4", True, True), ("fp4", True, True), ("bitnet", False, False)],
)
def test_each_base_declares_the_fast_paths_it_allows(mode, graphs, fused):
    # LLM.int8()'s outlier split and BitNet's layers are not recorded as CUDA graphs; the fused LoRA computes over
    # bitsandbytes' 4-bit weights only.
    backend = Quantization(mode=mode).backend
    assert backend.allows_cuda_graphs is graphs
    assert backend.allows_fused_lora is fused


def test_a_new_backend_starts_without_fast_paths_and_names_its_mode_as_it_is():
    assert not QuantBackend.allows_cuda_graphs and not QuantBackend.allows_fused_lora
    assert described_backend("fp8-someday") is QuantBackend and described_backend(["nf4"]) is QuantBackend
    assert QuantBackend.base_label("fp8-someday", double_quant=True) == "fp8-someday"
    assert QuantBackend.technique_label("fp8-someday", "LoraConfig") is None
    assert QuantBackend.technique_label("fp8-someday", "full", dtype="bfloat16") == "full fine-tuning (bf16)"


@pytest.mark.parametrize(
    ("mode", "double_quant", "base", "lora"),
    [
        ("none", None, "", None),
        ("int8", None, "8-bit", "8-bit + LoRA"),
        ("nf4", True, "NF4 + DQ", "QLoRA (NF4 + DQ)"),
        ("fp4", False, "FP4", "QLoRA (FP4)"),
        ("bitnet", True, "BitNet", "QLoRA + BitNet"),  # double quantization is a 4-bit mode's only
    ],
)
def test_each_backend_names_its_base_and_its_lora_technique(mode, double_quant, base, lora):
    cls = backend_class(mode)
    assert described_backend(mode) is cls
    assert cls.base_label(mode, double_quant=double_quant) == base
    assert cls.technique_label(mode, "LoraConfig", double_quant=double_quant) == lora
    assert cls.technique_label(mode, "IA3Config", double_quant=double_quant) is None  # "IA3 on <base>"


def test_the_fused_lora_refusal_names_the_modes_that_allow_it():
    with pytest.raises(QlitError) as err:
        check_fused_lora(True, None, Quantization(mode="int8").backend.allows_fused_lora)
    assert str(err.value) == (
        "model.fused_lora: true needs a 4-bit base (quantization.mode nf4 or fp4): set it to auto."
    )


@pytest.mark.parametrize("option", ["bits", "group_size", "axis", "scheme"])
def test_a_mode_specific_option_on_a_mode_that_does_not_read_it_is_refused_by_name(option):
    # bitsandbytes' NF4 has one bit width and one block size: a `bits: 3` there would be silently ignored.
    with pytest.raises(QlitError, match=rf"^quantization\.{option} applies to .* but mode is 'nf4'\.$"):
        Quantization(mode="nf4", **{option: 3 if option != "scheme" else "int4"})
