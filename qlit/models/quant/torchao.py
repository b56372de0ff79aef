"""``torchao``: a base quantized by torchao while transformers loads it (``transformers.TorchAoConfig``).

``scheme`` picks torchao's configuration: ``int8_weight_only`` (int8 weights, one scale per output row, any device),
``float8_weight_only`` (float8 e4m3 weights, one scale per row, any device), ``int4_weight_only`` (int4 weights in
groups of ``group_size``, tinygemm's layout: CUDA GPUs) and ``float8`` (float8 weights and dynamically quantized
float8 activations, multiplied by ``torch._scaled_mm``: GPUs of compute capability 8.9 or more). The weights are
frozen, so an adapter is required; peft trains on the weight-only schemes, whose layers back-propagate to their
inputs. Export de-quantizes them to the very weights the adapter trained against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qlit.errors import QlitError
from qlit.models.quant._torchao_common import (
    dequantize_weights,
    is_torchao_tensor,
    quantized_layers,
    require_linear_layers,
    require_torchao,
)
from qlit.models.quant.base import QuantBackend

#: Where a scheme's kernels run: anywhere, on a CUDA GPU, or on a GPU with float8 matmuls (compute capability 8.9+).
_ANY, _CUDA, _FP8_GPU = "any", "cuda", "fp8"
#: torchao's int4 tinygemm kernel takes these group sizes.
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class _Scheme:
    #: How a study names the base (after ``torchao``).
    label: str
    #: Where its kernels run.
    device: str
    #: Why no adapter can train on it (``None``: peft trains on it).
    untrainable: str | None = None


SCHEMES = {
    "int8_weight_only": _Scheme("int8", _ANY),
    "float8_weight_only": _Scheme("float8 weight-only", _ANY),
    "int4_weight_only": _Scheme(
        "int4",
        _CUDA,
        # peft 0.22's TorchaoLoraLinear refuses int4 weights, and transformers marks a torchao int4 model untrainable.
        untrainable="peft has no trainable layer over torchao's int4 weights (its torchao LoRA layer takes 8-bit "
        "weights only)",
    ),
    "float8": _Scheme(
        "float8",
        _FP8_GPU,
        # Checked on the layer itself: backward() fails with "derivative for aten::_scaled_mm is not implemented".
        untrainable="its layers quantize their inputs to float8 and multiply with torch._scaled_mm, which has no "
        "backward pass, so no gradient reaches the layers below",
    ),
}
DEFAULT_SCHEME = "int8_weight_only"


def _fp8_capable(device: torch.device | None = None) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


class TorchAO(QuantBackend):
    """A base whose ``nn.Linear`` weights torchao turns into its quantized tensor subclasses at load time."""

    modes: ClassVar[tuple[str, ...]] = ("torchao",)
    needs_adapter: ClassVar[bool] = True
    # No fast path: torchao's layers are neither recorded as CUDA graphs here nor read by the fused LoRA.
    options: ClassVar[tuple[str, ...]] = ("scheme", "group_size")
    strategies: ClassVar[dict[str, dict[str, Any]]] = {
        "lora-torchao-int8": {"mode": "torchao", "scheme": "int8_weight_only", "double_quant": None, "lora": True},
        "lora-torchao-fp8": {"mode": "torchao", "scheme": "float8_weight_only", "double_quant": None, "lora": True},
    }

    @property
    def scheme(self) -> str:
        """The spec's scheme, or the default one."""
        return self.spec.scheme or DEFAULT_SCHEME

    # ----- how a study names it ---------------------------------------------------------------------------------------
    @classmethod
    def base_label(cls, mode: str, *, scheme: str | None = None, **kwargs: Any) -> str:
        known = SCHEMES.get(scheme or DEFAULT_SCHEME)
        return f"torchao {known.label}" if known is not None else f"torchao {scheme}"

    @classmethod
    def technique_label(cls, mode: str, adapter: str | None, *, scheme: str | None = None, **kwargs: Any) -> str | None:
        if adapter == "LoraConfig":
            return f"{cls.base_label(mode, scheme=scheme)} + LoRA"
        return super().technique_label(mode, adapter, **kwargs)

    # ----- before any weight is loaded --------------------------------------------------------------------------------
    def check_options(self) -> None:
        require_torchao(self.spec.mode)
        scheme, group_size = self.spec.scheme, self.spec.group_size
        if scheme is not None and scheme not in SCHEMES:
            raise QlitError(
                f"Unknown quantization.scheme '{scheme}' for mode torchao: use one of {', '.join(SCHEMES)}."
            )
        if group_size is not None and self.scheme != "int4_weight_only":
            raise QlitError(
                f"quantization.group_size applies to scheme int4_weight_only only, but scheme is '{self.scheme}' "
                "(int8 and float8 weights have one scale per row)."
            )
        if group_size is not None and group_size not in INT4_GROUP_SIZES:
            raise QlitError(
                f"quantization.group_size {group_size} is not one torchao's int4 kernel takes: use one of "
                f"{', '.join(map(str, INT4_GROUP_SIZES))}."
            )
        # Where the model will run is not known yet (config time): refused here where no GPU could run it.
        self._check_where(None)

    def _check_where(self, device: torch.device | None) -> None:
        """Refuse a scheme whose kernels cannot run on ``device`` (``None``: on any device this machine has)."""
        need = SCHEMES[self.scheme].device
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if need == _CUDA and not cuda:
            raise QlitError(
                f"quantization.scheme {self.scheme} needs a CUDA GPU (torchao's int4 kernels run there only), but "
                f"{_where(device)}: use scheme int8_weight_only."
            )
        if need == _FP8_GPU and not (cuda and _fp8_capable(device)):
            raise QlitError(
                f"quantization.scheme float8 needs a GPU of compute capability 8.9 or more (Ada, Hopper) for its "
                f"float8 matmuls, but {_where(device)}: use scheme float8_weight_only or int8_weight_only."
            )

    def check_device(self, device: torch.device) -> None:
        super().check_device(device)
        self._check_where(device)

    def check_full_fine_tuning(self) -> None:
        untrainable = SCHEMES[self.scheme].untrainable
        if untrainable is not None:
            raise QlitError(f"quantization.scheme {self.scheme} cannot train, because {untrainable}: {_instead()}")
        super().check_full_fine_tuning()

    def adapter_refusal(self, adapter: Any) -> str | None:
        from peft import LoraConfig

        name = type(adapter).__name__
        untrainable = SCHEMES[self.scheme].untrainable
        if untrainable is not None:
            return f"{name} cannot train on a torchao {self.scheme} base, because {untrainable}: {_instead()}"
        if isinstance(adapter, LoraConfig) and getattr(adapter, "lora_bias", False):
            return (
                "LoraConfig.lora_bias cannot train on a torchao base, because peft's torchao LoRA layer does not "
                "support it: set lora_bias to false."
            )
        return super().adapter_refusal(adapter)

    # ----- loading ----------------------------------------------------------------------------------------------------
    def torchao_config(self) -> Any:
        """torchao's configuration object (``AOBaseConfig``) for this spec."""
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int4WeightOnlyConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )

        if self.scheme == "int8_weight_only":
            return Int8WeightOnlyConfig()
        if self.scheme == "float8_weight_only":
            return Float8WeightOnlyConfig()
        if self.scheme == "int4_weight_only":
            # The tinygemm layout runs on PyTorch's own CUDA kernel; torchao's plain layout needs another package.
            return Int4WeightOnlyConfig(group_size=self.spec.group_size or 128, int4_packing_format="tile_packed_to_4d")
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())

    def load_kwargs(self, device: torch.device) -> dict[str, Any]:
        from transformers import TorchAoConfig

        config = TorchAoConfig(self.torchao_config(), modules_to_not_convert=self.spec.skip_modules)
        # The whole model goes onto the one device Lightning assigned to this process.
        return {"quantization_config": config, "device_map": {"": device}}

    def after_load(self, model: Any, device: torch.device) -> Any:
        # device_map already placed it.
        require_linear_layers(quantized_layers(model), model, self.spec.mode)
        return model

    # ----- fidelity and export ----------------------------------------------------------------------------------------
    def dequantized_weight(self, module: torch.nn.Module) -> torch.Tensor | None:
        weight = getattr(module, "weight", None)
        return weight.dequantize() if is_torchao_tensor(weight) else None

    def check_export(self, adapter: str, *, dequantize: bool) -> None:
        if dequantize and self.scheme == "float8":
            raise QlitError(
                f"Adapter '{adapter}' was recorded on a torchao float8 base, whose layers also quantize their "
                "activations, which a plain transformers model cannot compute: pass --dequantize false to merge into "
                "the original full-precision weights instead."
            )

    def dequantize(self, model: Any) -> Any:
        return dequantize_weights(model)


def _where(device: torch.device | None) -> str:
    if device is None:
        return "this machine has none" if not torch.cuda.is_available() else "its GPU has compute capability below 8.9"
    if device.type != "cuda":
        return f"the model runs on {device.type.upper()}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} has compute capability {major}.{minor}"


def _instead() -> str:
    return "use scheme int8_weight_only or float8_weight_only, or quantization.mode qat."
