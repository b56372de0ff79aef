"""Which peft methods qlit can train on which base: refused pairs fail before any weight is loaded.

Every peft method is passed by ``class_path`` and applied by peft itself. This module knows only the settings that
peft 0.21 + bitsandbytes 0.50 accept when the adapter is built and then break in the first training steps, or refuse
only after the weights have loaded; each was found by training the tiny models (``tests/test_adapters.py`` trains
every supported pair of the README's support matrix and checks that each refused pair still fails in peft).
"""

from __future__ import annotations

from typing import Any

import torch

from qlit.errors import QlitError
from qlit.models.quantization import Quantization

_CAUSAL_LM = "CAUSAL_LM"


def check_adapter(
    adapter: Any,
    quantization: Quantization,
    *,
    device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
) -> None:
    """Refuse an adapter/quantization pair that peft cannot train, in one sentence that says why.

    Args:
        adapter: a peft config (``peft.LoraConfig``, ``peft.PrefixTuningConfig``, ...).
        quantization: how the base weights will be stored.
        device: where the model will train; ``None`` (not known yet, as when the config is parsed) means the GPU
            when there is one, else the CPU.
        gradient_checkpointing: whether activations will be recomputed in the backward pass.
    """
    reason = _unsupported_reason(adapter, quantization, device=device, gradient_checkpointing=gradient_checkpointing)
    if reason is not None:
        raise QlitError(reason)


def _unsupported_reason(
    adapter: Any,
    quantization: Quantization,
    *,
    device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
) -> str | None:
    """Why ``adapter`` cannot train on a base stored as ``quantization`` (one sentence), or ``None`` if it can."""
    from peft import LoraConfig, PrefixTuningConfig, PromptLearningConfig
    from peft.tuners.lycoris_utils import LycorisConfig

    name = type(adapter).__name__
    task_type = getattr(adapter, "task_type", None)
    if task_type is not None and task_type != _CAUSAL_LM:
        return f"{name}.task_type is '{task_type}', but qlit trains causal LMs: set task_type to CAUSAL_LM."
    if isinstance(adapter, PromptLearningConfig) and task_type is None:
        # Only PeftModelForCausalLM prepends the virtual tokens; the generic PeftModel fails with a bare KeyError.
        return f"{name} needs task_type CAUSAL_LM so that peft prepends its virtual tokens: set task_type: CAUSAL_LM."
    if isinstance(adapter, PrefixTuningConfig) and gradient_checkpointing:
        # peft refuses this pair itself, but only in get_peft_model, after the weights have loaded.
        return "PrefixTuningConfig does not work with gradient checkpointing: set gradient_checkpointing to false."
    mode = quantization.mode
    if isinstance(adapter, LycorisConfig) and (quantization.is_4bit or mode == "bitnet"):
        # peft has no quantized layer for LoHa/LoKr: it wraps a packed layer (bitsandbytes' Linear4bit, BitNet's
        # PackedBitLinear) as a plain nn.Linear and reshapes its update to the packed weight's shape, which fails.
        return (
            f"{name} cannot train on a {mode} base, because peft reshapes its update to the packed weight's shape: "
            "use quantization.mode int8 or none."
        )
    if isinstance(adapter, LoraConfig) and getattr(adapter, "use_dora", False):
        if mode == "bitnet":
            # DoRA normalises by the base weight's column norms, and peft cannot de-quantize a PackedBitLinear.
            return (
                "DoRA (use_dora) cannot train on a bitnet base, because peft cannot de-quantize its packed ternary "
                "weights: set use_dora to false or use quantization.mode nf4."
            )
        if device is None:  # not known yet (config time): the CPU, unless there is a GPU to train on
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if mode == "int8" and torch.device(device).type == "cpu":
            # peft's DoRA de-quantizes the 8-bit weight and, on CPU only, re-creates bitsandbytes' Int8Params,
            # which drops its row scales (SCB): the next forward fails ("'NoneType' object has no attribute ...").
            return (
                "DoRA (use_dora) cannot train on an int8 base on CPU, because peft loses the 8-bit scales there: "
                "use quantization.mode nf4, fp4 or none, or train on a GPU."
            )
    return None
