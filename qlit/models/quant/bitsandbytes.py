"""``int8``, ``nf4``, ``fp4``: bitsandbytes k-bit weights, quantized by transformers while it loads the base.

``int8`` is LLM.int8() (Dettmers et al. 2022); ``nf4`` / ``fp4`` are the 4-bit data types of QLoRA (Dettmers et al.
2023). The k-bit weights are frozen, so an adapter is required; export de-quantizes them with transformers' own
``model.dequantize()``, to the very weights the adapter trained against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from qlit.errors import QlitError
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
    lora_inits: ClassVar[tuple[str, ...]] = ("default", "olora", "eva")  # peft de- and re-quantizes for OLoRA
    strategies: ClassVar[dict[str, dict[str, Any]]] = {
        "lora-int8": {"mode": "int8", "double_quant": None, "lora": True}
    }

    @classmethod
    def technique_label(cls, mode: str, adapter: str | None, **label_args: Any) -> str | None:
        if adapter == "LoraConfig":
            return "8-bit + LoRA"
        return super().technique_label(mode, adapter, **label_args)

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
    allows_sharding: ClassVar[bool] = True
    labels: ClassVar[dict[str, str]] = {"nf4": "NF4", "fp4": "FP4"}
    lora_inits: ClassVar[tuple[str, ...]] = ("default", "pissa", "olora", "eva", "loftq")
    # peft's PiSSA needs full-precision weights, and its LoftQ quantizes them itself: on a 4-bit base both run as peft's
    # replacements, which read the unquantized weights from the checkpoint (OLoRA de- and re-quantizes in peft).
    own_lora_inits: ClassVar[tuple[str, ...]] = ("pissa", "loftq")
    strategies: ClassVar[dict[str, dict[str, Any]]] = {
        "qlora": {"mode": "nf4", "double_quant": True, "lora": True},
        "qlora-nf4": {"mode": "nf4", "double_quant": False, "lora": True},
        "qlora-fp4": {"mode": "fp4", "double_quant": False, "lora": True},
    }

    @classmethod
    def technique_label(cls, mode: str, adapter: str | None, **label_args: Any) -> str | None:
        if adapter == "LoraConfig":
            return f"QLoRA ({cls.base_label(mode, double_quant=label_args.get('double_quant'))})"
        return super().technique_label(mode, adapter, **label_args)

    def init_lora(self, model: Any, init: str, weights: Path) -> None:
        import bitsandbytes as bnb
        from peft.tuners.lora import LoraLayer
        from peft.utils.loftq_utils import replace_lora_weights_loftq, replace_lora_weights_pissa
        from transformers.pytorch_utils import Conv1D

        layers = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit)
        }
        for name, layer in layers.items():
            # transformers quantized GPT-2's Conv1D weights transposed; peft's replacements read them as stored.
            if issubclass(getattr(layer.get_base_layer(), "source_cls", object), Conv1D):
                raise QlitError(
                    f"init_lora_weights '{init}' cannot start on layer '{name.removeprefix('base_model.model.')}', "
                    "whose checkpoint stores a Conv1D weight (in, out) that peft reads without transposing it: set "
                    "init_lora_weights to true, or use quantization.mode none."
                )
        if init == "loftq":
            replace_lora_weights_loftq(model, model_path=str(weights))
            # peft's factors are the rank-r SVD of the quantization error, set without the adapter's scaling (peft
            # issue 1982), so the adapter would add scaling x that error: each factor takes 1/sqrt(scaling).
            for layer in layers.values():
                for adapter, scaling in layer.scaling.items():
                    layer.lora_A[adapter].weight.data /= scaling**0.5
                    layer.lora_B[adapter].weight.data /= scaling**0.5
        else:
            replace_lora_weights_pissa(model, model_path=str(weights), init_lora_weights=init)

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

    def empty_layout(
        self, model: Any, placeholder: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        import bitsandbytes as bnb
        from transformers.quantizers import AutoHfQuantizer

        # transformers' own choice of the layers to quantize (not lm_head, nor skip_modules), as from_pretrained makes.
        quantizer = AutoHfQuantizer.from_config(self.bnb_config(), pre_quantized=False)
        quantizer.preprocess_model(model, device_map={"": "cpu"})
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer
        model.config.quantization_config = quantizer.quantization_config
        storage = to_dtype(self.spec.quant_storage)
        made: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for name, module in model.named_modules():
            if not isinstance(module, bnb.nn.Linear4bit):
                continue
            meta = module.weight
            kwargs = dict(
                blocksize=meta.blocksize,
                compress_statistics=meta.compress_statistics,
                quant_type=meta.quant_type,
                quant_storage=storage,
            )
            packed = meta.numel() // (2 * storage.itemsize)  # two 4-bit weights to a byte
            module.weight = bnb.nn.Params4bit(
                placeholder((packed, 1), storage), requires_grad=False, module=module, bnb_quantized=True, **kwargs
            )
            made[f"{name}.weight"] = functools.partial(_quantize, module, kwargs)
        _keep_cpu_4bit_trainable(model)  # no effect on a GPU
        return made


def _quantize(module: Any, kwargs: dict[str, Any], weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (whole, on its device) quantized as transformers quantizes it for ``module``, whose quantization
    state it sets; the packed weight."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(weight, requires_grad=False, module=module, **kwargs).to(weight.device).data


def _keep_cpu_4bit_trainable(model: Any) -> None:
    # bitsandbytes (0.50) repacks a 4-bit weight into an AVX512-BF16 inference layout the first time a CPU
    # Linear4bit runs in eval mode, and never repacks it back: training after a validation pass then fails
    # ("a view of a leaf Variable ... in-place"). Fine-tuning alternates the two, so keep the trainable layout.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
