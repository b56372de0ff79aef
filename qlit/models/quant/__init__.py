"""Quantization backends: one module per family of modes, each a :class:`QuantBackend` declaring the modes it serves.

The package imports every module in it, so a new backend (a faster 4-bit path, FP8) is one new file here; the
``Quantization`` spec accepts its modes from then on. ``none`` is listed first, the rest in file-name order.
"""

from __future__ import annotations

import importlib
import pkgutil

from qlit.models.quant.base import (
    QuantBackend,
    QuantSpec,
    backend_class,
    backend_modes,
    backend_strategies,
    described_backend,
)

__all__ = ["QuantBackend", "QuantSpec", "backend_class", "backend_modes", "backend_strategies", "described_backend"]


def _import_backends() -> None:
    names = sorted((m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"), key=lambda n: n != "none")
    for name in names:
        importlib.import_module(f"{__name__}.{name}")


_import_backends()
