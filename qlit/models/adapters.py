"""Which peft methods qlit can train on which base: refused pairs fail before any weight is loaded.

Every peft method is passed by ``class_path`` and applied by peft itself. This module knows only the settings that
peft 0.21 + bitsandbytes 0.50 accept when the adapter is built and then break in the first training steps, or refuse
only after the weights have loaded; each was found by training the tiny models (``tests/test_adapters.py`` trains
every supported pair of the README's support matrix and checks that each refused pair still fails in peft). The
refusals that depend on how the base is stored are its quantization backend's (``QuantBackend.adapter_refusal``).
"""

from __future__ import annotations

from typing import Any

from qlit.errors import QlitError
from qlit.models.quantization import Quantization

_CAUSAL_LM = "CAUSAL_LM"


def check_adapter(adapter: Any, quantization: Quantization, *, gradient_checkpointing: bool = False) -> None:
    """Refuse an adapter/quantization pair that peft cannot train, in one sentence that says why.

    Args:
        adapter: a peft config (``peft.LoraConfig``, ``peft.PrefixTuningConfig``, ...).
        quantization: how the base weights will be stored.
        gradient_checkpointing: whether activations will be recomputed in the backward pass.
    """
    reason = _unsupported_reason(adapter, quantization, gradient_checkpointing=gradient_checkpointing)
    if reason is not None:
        raise QlitError(reason)


def _unsupported_reason(adapter: Any, quantization: Quantization, *, gradient_checkpointing: bool) -> str | None:
    """Why ``adapter`` cannot train on a base stored as ``quantization`` (one sentence), or ``None`` if it can."""
    from peft import PrefixTuningConfig, PromptLearningConfig

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
    return quantization.backend.adapter_refusal(adapter)
