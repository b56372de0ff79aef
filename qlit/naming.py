"""How a run's adapter is named in the hyperparameter table and in ``qlit compare``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def adapter_name(config_class: str | None, options: Mapping[str, Any], adapter_path: str | None) -> str:
    """``LoraConfig``, ``LoraConfig+dora``, ``LoraConfig+loftq``, ... for a new adapter; ``loaded`` or ``full``
    without one.

    Args:
        config_class: the peft config's class name (``LoraConfig``); ``None`` when no adapter is created.
        options: the config's arguments (``use_dora``, ``use_rslora``, ``init_lora_weights``, ...).
        adapter_path: the trained adapter loaded instead, if any.
    """
    if not config_class:
        return "loaded" if adapter_path else "full"
    # DoRA and rsLoRA are LoraConfig switches, and how LoRA starts (PiSSA, LoftQ, ...) one of its options: a
    # comparison table must tell them apart.
    flags = "".join("+" + flag.removeprefix("use_") for flag in ("use_dora", "use_rslora") if options.get(flag))
    return config_class + flags + _init_suffix(options.get("init_lora_weights"))


def _init_suffix(value: Any) -> str:
    """``+pissa``, ``+loftq``, ... for a LoRA that does not start as peft's default (``+gaussian``: its Gaussian
    variant); PiSSA by fast SVD (``pissa_niter_<n>``) is PiSSA."""
    if value is None or value is True:
        return ""
    name = str(value).lower()
    return "+" + ("pissa" if name.startswith("pissa_niter_") else name)
