"""How a run's adapter is named in the hyperparameter table and in ``qlit compare``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def adapter_name(config_class: str | None, options: Mapping[str, Any], adapter_path: str | None) -> str:
    """``LoraConfig``, ``LoraConfig+dora``, ... for a new adapter; ``loaded`` or ``full`` without one.

    Args:
        config_class: the peft config's class name (``LoraConfig``); ``None`` when no adapter is created.
        options: the config's arguments (``use_dora``, ``use_rslora``, ...).
        adapter_path: the trained adapter loaded instead, if any.
    """
    if not config_class:
        return "loaded" if adapter_path else "full"
    # DoRA and rsLoRA are LoraConfig switches; a comparison table must tell them apart.
    return config_class + "".join(
        "+" + flag.removeprefix("use_") for flag in ("use_dora", "use_rslora") if options.get(flag)
    )
