"""``none``: the base keeps the module's dtype and trains like any model, with or without an adapter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from qlit.models.quant.base import QuantBackend


class NoQuantization(QuantBackend):
    """Full-precision (or half-precision) weights, loaded as the checkpoint stores them."""

    modes: ClassVar[tuple[str, ...]] = ("none",)
    quantized: ClassVar[bool] = False
    allows_cuda_graphs: ClassVar[bool] = True
    allows_sharding: ClassVar[bool] = True
    labels: ClassVar[dict[str, str]] = {"none": ""}
    # Full-precision weights: peft writes the residual of PiSSA, OLoRA and CorDA into them itself.
    lora_inits: ClassVar[tuple[str, ...]] = ("default", "pissa", "olora", "eva", "corda")

    def empty_layout(
        self, model: Any, placeholder: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        return {}  # every weight trains as the checkpoint stores it
