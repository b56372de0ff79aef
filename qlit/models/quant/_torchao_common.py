"""What the ``torchao`` and ``qat`` backends share: the package they need, the weights torchao's tensor subclasses
store, and a quantized model written the way transformers reloads it.

No backend lives here (the package imports this module like the others; it declares no mode), and torchao is
imported only inside the functions: transformers imports it anyway wherever it is installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from qlit.errors import QlitError

#: How the package that serves these modes is installed.
EXTRA = "pip install 'qlit[torchao]'"


def require_torchao(mode: str) -> None:
    """Refuse ``mode`` when the config is read if torchao is not installed, in one sentence naming the extra."""
    if importlib.util.find_spec("torchao") is None:
        raise QlitError(f"quantization.mode {mode} needs the torchao package, which is not installed: {EXTRA}.")


def is_torchao_tensor(tensor: Any) -> bool:
    """Whether ``tensor`` is one of torchao's quantized tensor subclasses (``Int8Tensor``, ``Float8Tensor``, ...)."""
    if not isinstance(tensor, torch.Tensor) or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(tensor, TorchAOBaseTensor)


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """The qualified names of ``model``'s modules whose weight is a torchao tensor subclass."""
    return [name for name, m in model.named_modules() if is_torchao_tensor(getattr(m, "weight", None))]


def require_linear_layers(names: list[str], model: torch.nn.Module, mode: str) -> None:
    """Refuse a model in which ``mode`` found no layer to quantize (torchao quantizes ``nn.Linear`` layers only), in
    one sentence, rather than training it unquantized."""
    if names:
        return
    raise QlitError(
        f"quantization.mode {mode} found no nn.Linear projection to quantize in {type(model).__name__} (torchao "
        "quantizes nn.Linear layers only; GPT-2's projections are Conv1D): use a Qwen2- or Llama-style model, or "
        "quantization.mode int8, nf4 or bitnet."
    )


def dequantize_weights(model: Any) -> Any:
    """``model`` with every torchao weight replaced by the plain tensor it computes with (its ``dequantize()``), frozen
    as it was, and without transformers' record of the quantization: a plain model ``save_pretrained`` can write."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if is_torchao_tensor(weight):
            module.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


def save_quantized(model: Any, config: Any, directory: Path) -> Path:
    """Write ``model``, whose layers torchao quantized with ``config`` (an ``AOBaseConfig``), as a transformers
    checkpoint: safetensors of the tensor subclasses' parts plus the ``quantization_config`` that makes
    ``AutoModelForCausalLM.from_pretrained(directory)`` rebuild them."""
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    quantization_config = TorchAoConfig(config)
    model.config.quantization_config = quantization_config
    # transformers writes a torchao model through its quantizer, which flattens each tensor subclass to plain tensors.
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config)
    try:
        model.save_pretrained(str(directory))
    finally:
        model.hf_quantizer.remove_quantization_config(model)
    return directory
