"""How a base model's weights are stored while it is fine-tuned: one small typed spec.

The spec maps onto ``transformers.BitsAndBytesConfig`` for the bitsandbytes modes; invalid combinations are
refused when the spec is built, in one sentence, before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qlit.errors import QlitError

DTypeName = Literal["float32", "bfloat16", "float16"]
QuantMode = Literal["none", "int8", "nf4", "fp4", "bitnet"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE = {**_DTYPES, "uint8": torch.uint8}


def to_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``; the names are the ones YAML configs use."""
    if name not in _STORAGE:
        raise QlitError(f"Unknown dtype '{name}': use one of {', '.join(_STORAGE)}.")
    return _STORAGE[name]


@dataclass
class Quantization:
    """How the frozen base weights are stored.

    Args:
        mode: ``none`` keeps the weights in ``QLitModule.dtype``; ``int8`` is LLM.int8() (Dettmers et al. 2022);
            ``nf4`` / ``fp4`` are the 4-bit data types of QLoRA (Dettmers et al. 2023); ``bitnet`` is BitNet b1.58
            (Ma et al. 2024): ternary projection weights — trained through them (QAT) without an adapter, or frozen
            and packed 2 bits per weight under an adapter (QLoRA + BitNet).
        compute_dtype: dtype that the 4-bit (and BitNet) layers de-quantize to for their matmuls.
        double_quant: quantize the 4-bit quantization constants too (QLoRA's double quantization,
            ~0.37 bit/parameter saved). ``None`` means on for 4-bit modes; ``True`` with a non-4-bit mode is an error.
        quant_storage: dtype that packed 4-bit weights are stored in; FSDP needs it equal to the dtype of the
            other parameters (e.g. ``bfloat16``) so that it can flatten them together.
        int8_threshold: LLM.int8() outlier threshold: activations above it take the fp16 path.
        skip_modules: module names left unquantized (``lm_head`` is always left unquantized by transformers).
    """

    mode: QuantMode = "none"
    compute_dtype: DTypeName = "bfloat16"
    double_quant: bool | None = None
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    int8_threshold: float = 6.0
    skip_modules: list[str] | None = None

    def __post_init__(self) -> None:
        modes = QuantMode.__args__  # type: ignore[attr-defined]
        if self.mode not in modes:
            raise QlitError(f"Unknown quantization mode '{self.mode}': use one of {', '.join(modes)}.")
        if self.compute_dtype not in _DTYPES:
            raise QlitError(
                f"Unknown quantization compute_dtype '{self.compute_dtype}': use one of {', '.join(_DTYPES)}."
            )
        if self.double_quant and not self.is_4bit:
            raise QlitError(f"double_quant applies to 4-bit quantization only, but mode is '{self.mode}'.")
        if self.quant_storage != "uint8" and not self.is_4bit:
            raise QlitError(f"quant_storage applies to 4-bit quantization only, but mode is '{self.mode}'.")

    @property
    def is_4bit(self) -> bool:
        return self.mode in ("nf4", "fp4")

    @property
    def is_bitsandbytes(self) -> bool:
        return self.mode in ("int8", "nf4", "fp4")

    @property
    def is_quantized(self) -> bool:
        """True when the base weights are stored or computed in a low-bit format."""
        return self.mode != "none"

    @property
    def needs_adapter(self) -> bool:
        """bitsandbytes k-bit weights cannot be trained directly; BitNet trains its latent weights (QAT)."""
        return self.is_bitsandbytes

    def check_device(self, device: torch.device) -> None:
        """Refuse what the device cannot run, before any weight is loaded."""
        if device.type == "cpu" and self.is_quantized and self.compute_dtype == "float16":
            raise QlitError("quantization.compute_dtype float16 is not supported on CPU: use bfloat16 or float32.")

    def to_bnb_config(self):
        """The ``BitsAndBytesConfig`` for this spec, or ``None`` when the weights are not quantized."""
        if not self.is_bitsandbytes:
            return None
        from transformers import BitsAndBytesConfig

        if self.mode == "int8":
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=self.int8_threshold,
                llm_int8_skip_modules=self.skip_modules,
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.mode,
            bnb_4bit_use_double_quant=bool(self.double_quant if self.double_quant is not None else True),
            bnb_4bit_compute_dtype=_DTYPES[self.compute_dtype],
            bnb_4bit_quant_storage=_STORAGE[self.quant_storage],
            llm_int8_skip_modules=self.skip_modules,
        )
