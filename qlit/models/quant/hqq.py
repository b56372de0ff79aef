"""``hqq``: Half-Quadratic Quantization (Badri & Shaji 2023): weights in 1, 2, 3, 4 or 8 bits, in groups that each
have a scale and a zero point, fitted to the weights alone (no calibration data).

The base loads as its checkpoint stores it, and its linear layers become hqq's ``HQQLinear`` right after, on the
training device (hqq's PyTorch backend runs on the CPU too). transformers' ``HqqConfig`` is not used: transformers 5
refuses to quantize with it while loading ("HQQ is not available yet"), and hqq's own ``AutoHQQHFModel`` re-casts
every other layer and draws progress bars. The weights are frozen: LoRA trains through peft's ``HqqLoraLinear``.
Quantization is deterministic, so an adapter reloaded onto a freshly quantized base computes as it trained; export
de-quantizes each layer to the very weights it computed with.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from typing import Any, ClassVar

import torch

from qlit.errors import QlitError
from qlit.models.dtypes import to_dtype
from qlit.models.quant.base import PackedLayer, QuantBackend

BITS = (1, 2, 3, 4, 8)
#: hqq's and transformers' defaults: 4 bits in groups of 64 along the input features (axis 1, the axis hqq's faster
#: kernels take).
DEFAULT_BITS, DEFAULT_GROUP_SIZE, DEFAULT_AXIS = 4, 64, 1


class HQQ(QuantBackend):
    """A base whose linear layers (all but the output head and ``skip_modules``) are hqq's ``HQQLinear``."""

    modes: ClassVar[tuple[str, ...]] = ("hqq",)
    needs_adapter: ClassVar[bool] = True
    # peft's k-bit recipe is not this base's: it casts the norms and embeddings to fp32, and the HQQ layers, which
    # de-quantize to the compute dtype, then multiply fp32 inputs by bf16 weights and fail (a test shows it).
    kbit_training: ClassVar[bool] = False
    packs_weights: ClassVar[bool] = True  # two 4-bit, four 2-bit, eight 1-bit or ten 3-bit weights to an element
    # No fast path: neither was measured on it (CUDA graphs of its layers, the fused LoRA reads bitsandbytes' weights).
    options: ClassVar[tuple[str, ...]] = ("bits", "group_size", "axis")
    labels: ClassVar[dict[str, str]] = {"hqq": "HQQ"}
    strategies: ClassVar[dict[str, dict[str, Any]]] = {
        "lora-hqq4": {"mode": "hqq", "double_quant": None, "bits": 4, "lora": True}
    }

    @classmethod
    def base_label(
        cls, mode: str, *, double_quant: bool | None = None, bits: int | None = None, scheme: str | None = None
    ) -> str:
        return f"{cls.labels.get(mode, mode)} {bits or DEFAULT_BITS}-bit"

    @classmethod
    def technique_label(cls, mode: str, adapter: str | None, **label_args: Any) -> str | None:
        if adapter == "LoraConfig":
            return f"{cls.base_label(mode, bits=label_args.get('bits'))} + LoRA"
        return super().technique_label(mode, adapter, **label_args)

    # ----- the spec ---------------------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.spec.bits if self.spec.bits is not None else DEFAULT_BITS

    @property
    def group_size(self) -> int:
        return self.spec.group_size if self.spec.group_size is not None else DEFAULT_GROUP_SIZE

    @property
    def axis(self) -> int:
        return self.spec.axis if self.spec.axis is not None else DEFAULT_AXIS

    def check_options(self) -> None:
        if importlib.util.find_spec("hqq") is None:
            raise QlitError(
                "quantization.mode hqq needs the hqq package, which is not installed: pip install 'qlit[hqq]'."
            )
        spec = self.spec
        if spec.bits is not None and (isinstance(spec.bits, bool) or spec.bits not in BITS):
            raise QlitError(f"quantization.bits is {spec.bits!r}, but mode hqq stores 1, 2, 3, 4 or 8 bits.")
        if spec.group_size is not None and (
            isinstance(spec.group_size, bool) or spec.group_size < 8 or spec.group_size % 8
        ):
            # hqq asserts it when the layers are built, in a traceback.
            raise QlitError(
                f"quantization.group_size is {spec.group_size!r}, but mode hqq needs a multiple of 8 (e.g. 64)."
            )
        if spec.axis is not None and (isinstance(spec.axis, bool) or spec.axis not in (0, 1)):
            raise QlitError(f"quantization.axis is {spec.axis!r}, but mode hqq groups along axis 0 or 1.")

    def adapter_refusal(self, adapter: Any) -> str | None:
        from peft import PeftType

        if getattr(adapter, "is_prompt_learning", False) or getattr(adapter, "peft_type", None) == PeftType.LORA:
            return None  # virtual tokens leave the layers alone; LoRA (DoRA, rsLoRA) wraps them as HqqLoraLinear
        # peft has an HQQ layer for LoRA alone: IA3, AdaLoRA, LoHa and LoKr refuse HQQLinear as a target module.
        return (
            f"{type(adapter).__name__} cannot train on an hqq base, because peft wraps HQQ layers for LoRA only: use "
            "peft.LoraConfig (DoRA and rsLoRA included), a prompt-learning method, or quantization.mode nf4."
        )

    # ----- loading and training ---------------------------------------------------------------------------------------
    def after_load(self, model: Any, device: torch.device) -> Any:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        model = model.to(device)
        targets = self._targets(model)
        config = BaseQuantizeConfig(nbits=self.bits, group_size=self.group_size, axis=self.axis)
        dtype = to_dtype(self.spec.compute_dtype)
        for name, layer in targets.items():
            parent, _, child = name.rpartition(".")
            quantized = HQQLinear(layer, config, compute_dtype=dtype, device=str(device))
            setattr(model.get_submodule(parent), child, quantized)
        return model

    def _targets(self, model: Any) -> dict[str, torch.nn.Linear]:
        """The layers to quantize, by name; one sentence when there are none or a group would straddle rows."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip = self.spec.skip_modules or []
        targets = {
            name: module
            for name, module in model.named_modules()
            if type(module) is torch.nn.Linear
            and module is not head
            and not any(name == s or name.endswith("." + s) for s in skip)
        }
        if not targets:
            raise QlitError(
                "quantization.mode hqq found no nn.Linear layer to quantize in the model (GPT-2's projections are "
                "Conv1D): use quantization.mode nf4 or none."
            )
        size = self.group_size
        for name, layer in targets.items():
            if layer.in_features % size:
                common = math.gcd(*(m.in_features for m in targets.values()))
                fits = [g for g in range(8, min(common, size) + 1, 8) if common % g == 0]
                hint = f"e.g. {fits[-1]}" if fits else "or skip the layer in quantization.skip_modules"
                raise QlitError(
                    f"quantization.group_size {size} does not divide the {layer.in_features} input features of layer "
                    f"'{name}': use a group size that divides every layer's ({hint})."
                )
        return targets

    def adapter_config(self, adapter: Any, model: Any) -> Any:
        from hqq.core.quantize import HQQLinear

        targets = getattr(adapter, "target_modules", None)
        if not (isinstance(targets, str) and targets.lower() == "all-linear"):
            return adapter
        # peft's all-linear looks for nn.Linear only: named here, the HQQ layers and the linear layers left as they
        # are (skip_modules), but not the output head, as peft would.
        head = model.get_output_embeddings()
        spelled = copy.copy(adapter)
        spelled.target_modules = {
            name
            for name, module in model.named_modules()
            if isinstance(module, (HQQLinear, torch.nn.Linear)) and module is not head
        }
        return spelled

    # ----- what it stores ---------------------------------------------------------------------------------------------
    def packed_layers(self, model: Any) -> list[PackedLayer]:
        from hqq.core.quantize import HQQLinear

        layers = []
        for module in model.modules():
            if not isinstance(module, HQQLinear):
                continue
            # The scales and zero points live in the layer's meta dict and its bias in a plain attribute.
            hidden = [t for t in module.meta.values() if isinstance(t, torch.Tensor)]
            if isinstance(module.bias, torch.Tensor):
                hidden.append(module.bias)
            bias = module.bias.numel() if isinstance(module.bias, torch.Tensor) else 0
            numel = module.in_features * module.out_features + bias
            layers.append(PackedLayer(packed=(module.W_q,), numel=numel, hidden=tuple(hidden)))
        return layers

    def dequantized_weight(self, module: torch.nn.Module) -> torch.Tensor | None:
        from hqq.core.quantize import HQQLinear

        return module.dequantize() if isinstance(module, HQQLinear) else None

    # ----- after training ---------------------------------------------------------------------------------------------
    def dequantize(self, model: Any) -> Any:
        from hqq.core.quantize import HQQLinear

        quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, HQQLinear)]
        for name, layer in quantized:
            weight = layer.dequantize()
            plain = torch.nn.Linear(
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            with torch.no_grad():
                plain.weight.copy_(weight)
                if layer.bias is not None:
                    plain.bias.copy_(layer.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
        return model
