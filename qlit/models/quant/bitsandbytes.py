"""``int8``, ``nf4``, ``fp4``: bitsandbytes k-bit weights, quantized by transformers while it loads the base.

``int8`` is LLM.int8() (Dettmers et al. 2022); ``nf4`` / ``fp4`` are the 4-bit data types of QLoRA (Dettmers et al.
2023). The k-bit weights are frozen, so an adapter is required; export de-quantizes them with transformers' own
``model.dequantize()``, to the very weights the adapter trained against.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from qlit.models.dtypes import to_dtype
from qlit.models.quant.base import QuantBackend


class BitsAndBytes(QuantBackend):
    """A base quantized by ``transformers.BitsAndBytesConfig`` at load time (its modes are its two subclasses')."""

    needs_adapter: ClassVar[bool] = True
    kbit_training: ClassVar[bool] = True

    def load_kwargs(self, device: torch.device) -> dict[str, Any]:
        # The whole model goes onto the one device Lightning assigned to this process.
        return {"quantization_config": self.bnb_config(), "device_map": {"": device}}

    def bnb_config(self) -> Any:
        """The ``BitsAndBytesConfig`` for this spec."""
        raise NotImplementedError

    def dequantized_weight(self, module: torch.nn.Module) -> torch.Tensor | None:
        import bitsandbytes as bnb

        weight = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit) and getattr(weight, "quant_state", None) is not None:
            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        if isinstance(module, bnb.nn.Linear8bitLt) and getattr(weight, "SCB", None) is not None:
            # LLM.int8()'s row-wise absmax: int8 codes times the row's scale over 127.
            return weight.data.float() * weight.SCB.float().unsqueeze(1) / 127
        return None

    def after_load(self, model: Any, device: torch.device) -> Any:
        # device_map already placed it.
        if device.type == "cpu":
            _keep_cpu_4bit_trainable(model)
        return model


class Int8(BitsAndBytes):
    """LLM.int8(): 8-bit weights, outlier activations through an fp16 path."""

    modes: ClassVar[tuple[str, ...]] = ("int8",)
    # LLM.int8()'s outlier split is not recorded as CUDA graphs here.
    labels: ClassVar[dict[str, str]] = {"int8": "8-bit"}
    strategies: ClassVar[dict[str, dict[str, Any]]] = {
        "lora-int8": {"mode": "int8", "double_quant": None, "lora": True}
    }

    @classmethod
    def technique_label(
        cls,
        mode: str,
        adapter: str | None,
        *,
        double_quant: bool | None = None,
        dtype: str | None = None,
        bits: int | None = None,
        scheme: str | None = None,
    ) -> str | None:
        if adapter == "LoraConfig":
            return "8-bit + LoRA"
        return super().technique_label(mode, adapter, double_quant=double_quant, dtype=dtype, bits=bits)

    def adapter_refusal(self, adapter: Any) -> str | None:
        from peft import LoraConfig

        # Where the model will train is not known yet (config time): the CPU, unless there is a GPU to train on.
        on_cpu = not torch.cuda.is_available()
        if isinstance(adapter, LoraConfig) and getattr(adapter, "use_dora", False) and on_cpu:
            # peft's DoRA de-quantizes the 8-bit weight and, on CPU only, re-creates bitsandbytes' Int8Params,
            # which drops its row scales (SCB): the next forward fails ("'NoneType' object has no attribute ...").
            return (
                "DoRA (use_dora) cannot train on an int8 base on CPU, because peft loses the 8-bit scales there: "
                "use quantization.mode nf4, fp4 or none, or train on a GPU."
            )
        return super().adapter_refusal(adapter)

    def bnb_config(self) -> Any:
        from transformers import BitsAndBytesConfig

        spec = self.spec
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=spec.int8_threshold, llm_int8_skip_modules=spec.skip_modules
        )


class FourBit(BitsAndBytes):
    """QLoRA's 4-bit weights: NormalFloat4 or FP4 in blocks, each block with its scale."""

    modes: ClassVar[tuple[str, ...]] = ("nf4", "fp4")
    is_4bit: ClassVar[bool] = True
    packs_weights: ClassVar[bool] = True  # two 4-bit weights to a byte
    allows_cuda_graphs: ClassVar[bool] = True
    allows_fused_lora: ClassVar[bool] = True
    labels: ClassVar[dict[str, str]] = {"nf4": "NF4", "fp4": "FP4"}
    strategies: ClassVar[dict[str, dict[str, Any]]] = {
        "qlora": {"mode": "nf4", "double_quant": True, "lora": True},
        "qlora-nf4": {"mode": "nf4", "double_quant": False, "lora": True},
        "qlora-fp4": {"mode": "fp4", "double_quant": False, "lora": True},
    }

    @classmethod
    def technique_label(
        cls,
        mode: str,
        adapter: str | None,
        *,
        double_quant: bool | None = None,
        dtype: str | None = None,
        bits: int | None = None,
        scheme: str | None = None,
    ) -> str | None:
        if adapter == "LoraConfig":
            return f"QLoRA ({cls.base_label(mode, double_quant=double_quant)})"
        return super().technique_label(mode, adapter, double_quant=double_quant, dtype=dtype, bits=bits)

    def bnb_config(self) -> Any:
        from transformers import BitsAndBytesConfig

        spec = self.spec
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.mode,
            bnb_4bit_use_double_quant=spec.uses_double_quant,
            bnb_4bit_compute_dtype=to_dtype(spec.compute_dtype),
            bnb_4bit_quant_storage=to_dtype(spec.quant_storage),
            llm_int8_skip_modules=spec.skip_modules,
        )


def _keep_cpu_4bit_trainable(model: Any) -> None:
    # bitsandbytes (0.50) repacks a 4-bit weight into an AVX512-BF16 inference layout the first time a CPU
    # Linear4bit runs in eval mode, and never repacks it back: training after a validation pass then fails
    # ("a view of a leaf Variable ... in-place"). Fine-tuning alternates the two, so keep the trainable layout.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
