"""The ``none`` backend: the base loads as stored, trains fully, and has nothing to refuse, save or dequantize."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from qlit.models.quantization import Quantization


@pytest.mark.parametrize(
    ("dtype", "weights", "training"),
    [("auto", "auto", None), ("float32", torch.float32, "float32"), ("bfloat16", torch.bfloat16, "bfloat16")],
)
def test_the_module_dtype_is_the_weights_and_the_training_dtype(dtype, weights, training):
    spec = Quantization(compute_dtype="float16")  # a compute dtype, ignored: nothing computes in low bits
    assert spec.weights_dtype(dtype) == weights
    assert spec.training_dtype(dtype) == training
    assert spec.study_columns(dtype) == {"quantization": "none", "compute_dtype": dtype, "double_quant": False}


def test_nothing_is_refused_and_nothing_of_its_own_is_saved(tmp_path):
    backend = Quantization(compute_dtype="float16").backend
    backend.check_full_fine_tuning()
    backend.check_device(torch.device("cpu"))  # float16 compute is the quantized layers' concern only
    assert backend.adapter_refusal(peft.LoHaConfig(r=4)) is None
    assert backend.load_kwargs(torch.device("cpu")) == {}
    assert not backend.kbit_training
    model = nn.Linear(2, 2)
    backend.convert(model, has_adapter=False)
    assert type(model) is nn.Linear
    assert backend.dequantize(model) is model
    assert backend.save_trained(model, tmp_path) is None and not any(tmp_path.iterdir())
    backend.check_export("adapter", dequantize=True)
