"""Fused training kernels: Liger's fused linear + cross-entropy, RMSNorm, RoPE and SwiGLU, where they are installed.

The fused loss never materialises the (tokens × vocabulary) logits — 2.5 GB of fp32 for 4,096 tokens of Qwen2.5's
152k vocabulary — and the fused norm, rotary and gated-MLP kernels save a pass over the activations each. Liger is
an optional extra (``pip install 'qlit[gpu]'``): Triton kernels, CUDA only.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch

from qlit.errors import QlitError

KernelChoice = Literal["auto", "liger", "none"]

_INSTALL = "pip install 'qlit[gpu]' (liger-kernel)"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def check_kernels(choice: str) -> None:
    """Refuse, when the config is read, an explicit request that this environment cannot honour."""
    if choice == "liger" and not liger_installed():
        raise QlitError(f"model.kernels liger needs the liger-kernel package: {_INSTALL}, or set kernels: auto.")


def apply_kernels(model: Any, choice: str, device: torch.device, layer_kernels: bool = True) -> str:
    """Patch ``model`` (before peft wraps it) with the fused kernels ``choice`` asks for; return what was applied.

    ``auto`` applies Liger on CUDA when it is installed and supports the architecture, and nothing otherwise;
    ``liger`` insists (one sentence when it cannot); ``none`` keeps transformers' own modules. Without
    ``layer_kernels`` (decoder layers that ``torch.compile`` fuses itself) only the fused loss is applied: the
    compiler cannot trace Liger's RMSNorm, RoPE and SwiGLU autograd functions (PyTorch 2.11 fails with an
    AssertionError inside the layer).
    """
    if choice == "none":
        return "none"
    check_kernels(choice)
    if device.type != "cuda" or not liger_installed():
        if choice == "liger":
            raise QlitError("model.kernels liger runs on CUDA GPUs only: set kernels: auto or none on this device.")
        return "none"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if choice == "liger":
            raise QlitError(f"liger-kernel has no kernels for model type '{model_type}': set kernels: auto or none.")
        return "none"
    in_layers = {} if layer_kernels else dict(rms_norm=False, rope=False, swiglu=False, geglu=False)
    _apply_liger_kernel_to_instance(model=model, **in_layers)
    return "liger"
