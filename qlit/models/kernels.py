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
    _to_instance_only(model, lambda: _apply_liger_kernel_to_instance(model=model, **in_layers))
    return "liger"


def _to_instance_only(model: Any, patch: Any) -> None:
    """Run ``patch`` (Liger's instance patching) so that it changes ``model`` alone.

    Liger patches an instance's modules, but also the modeling module's globals (its norm and MLP classes, its rotary
    function) and at times ``torch.nn``'s: every model built later in the process would get Liger's modules, on a
    device it may not run on and under ``kernels: none`` too. What ``patch`` changed there is put back; a function
    the instance calls at run time (the rotary embedding) is swapped in around the forward passes of this model's
    modules.
    """
    import sys

    defining = (sys.modules.get(type(m).__module__) for m in model.modules())
    watched = {module for module in defining if module is not None} | {torch.nn, torch.nn.functional}
    before = {module: dict(vars(module)) for module in watched}
    patch()
    swaps = []
    for module, saved in before.items():
        for name, value in list(vars(module).items()):
            if name in saved and saved[name] is not value and callable(saved[name]) and callable(value):
                setattr(module, name, saved[name])
                if not isinstance(value, type):  # a class only matters when a module is built: this one's are
                    swaps.append((module, name, value))
    if not swaps:
        return
    # The swapped functions are called from the classes of the modules they were swapped in: around the forward of
    # each such submodule (a checkpointed layer's recomputation in the backward pass calls them again), and the
    # model's.
    where = {module.__name__ for module, _, _ in swaps}
    for target in [m for m in model.modules() if m is model or type(m).__module__ in where]:
        target.forward = _with_globals(target.forward, swaps)


def _with_globals(forward: Any, swaps: list[tuple[Any, str, Any]]) -> Any:
    import functools

    @functools.wraps(forward)  # the signature stays the forward's (generation reads it)
    def call(*args: Any, **kwargs: Any) -> Any:
        kept = [getattr(module, name) for module, name, _ in swaps]
        for module, name, value in swaps:
            setattr(module, name, value)
        try:
            return forward(*args, **kwargs)
        finally:
            for (module, name, _), value in zip(swaps, kept, strict=True):
                setattr(module, name, value)

    return call
