"""How a base model's weights are stored while it is fine-tuned: one small typed spec.

What a mode means (how the base loads, trains, saves and exports) is its backend's, in ``qlit.models.quant``; the
spec's modes are the ones the backends serve, and the spec sits above them: a backend reads it as a
:class:`~qlit.models.quant.base.QuantSpec`. Invalid combinations are refused when the spec is built, in one
sentence, before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qlit.errors import QlitError
from qlit.models.dtypes import DTYPES, to_dtype
from qlit.models.quant import QuantBackend, backend_class, backend_modes

DTypeName = Literal["float32", "bfloat16", "float16"]
QuantMode = Literal[backend_modes()]  # type: ignore[valid-type]  # a backend module adds its modes
#: The spec's fields that only some backends read (each declares which in ``QuantBackend.options``).
BACKEND_OPTIONS = ("bits", "group_size", "axis", "scheme")


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
        bits: bits per weight, for the modes that offer several (each backend says which it accepts).
        group_size: weights sharing one scale (and zero point), for the modes that quantize in groups.
        axis: the axis the groups run along, for the modes that offer a choice.
        scheme: the mode's named variant (e.g. a torchao configuration), for the modes that have several.
    """

    mode: QuantMode = "none"
    compute_dtype: DTypeName = "bfloat16"
    double_quant: bool | None = None
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    int8_threshold: float = 6.0
    skip_modules: list[str] | None = None
    bits: int | None = None
    group_size: int | None = None
    axis: int | None = None
    scheme: str | None = None

    def __post_init__(self) -> None:
        modes = QuantMode.__args__  # type: ignore[attr-defined]
        if self.mode not in modes:
            raise QlitError(f"Unknown quantization mode '{self.mode}': use one of {', '.join(modes)}.")
        if self.compute_dtype not in DTYPES:
            raise QlitError(
                f"Unknown quantization compute_dtype '{self.compute_dtype}': use one of {', '.join(DTYPES)}."
            )
        if self.double_quant and not self.is_4bit:
            raise QlitError(f"double_quant applies to 4-bit quantization only, but mode is '{self.mode}'.")
        if self.quant_storage != "uint8" and not self.is_4bit:
            raise QlitError(f"quant_storage applies to 4-bit quantization only, but mode is '{self.mode}'.")
        backend = self.backend
        for option in BACKEND_OPTIONS:
            if getattr(self, option) is not None and option not in backend.options:
                takers = [m for m in modes if option in backend_class(m).options]
                raise QlitError(
                    f"quantization.{option} applies to mode {' or '.join(takers) or '(none)'} only, "
                    f"but mode is '{self.mode}'."
                )
        backend.check_options()

    @property
    def backend(self) -> QuantBackend:
        """What this mode does to the base: load, convert, refuse adapters, save and export it."""
        return backend_class(self.mode)(self)

    @property
    def is_4bit(self) -> bool:
        """Whether the weights are stored in 4 bits with quantization constants (double_quant, quant_storage)."""
        return self.backend.is_4bit

    @property
    def is_quantized(self) -> bool:
        """Whether the base computes in ``compute_dtype`` rather than in the module's dtype."""
        return self.backend.quantized

    @property
    def uses_double_quant(self) -> bool:
        """Whether the quantization constants are quantized too (on by default where they exist, in 4 bits)."""
        return bool(self.double_quant if self.double_quant is not None else self.is_4bit)

    def weights_dtype(self, dtype: str) -> torch.dtype | str:
        """What ``from_pretrained`` gets as ``dtype`` for the module's ``dtype`` (``auto`` or a dtype name).

        ``auto`` keeps the checkpoint's own dtype, or takes the compute dtype when the base is quantized.
        """
        if dtype == "auto" and not self.is_quantized:
            return "auto"
        return to_dtype(self.compute_dtype if dtype == "auto" else dtype)

    def training_dtype(self, dtype: str) -> str | None:
        """The dtype the adapted layers compute in for the module's ``dtype`` (``None``: the checkpoint's own)."""
        if self.is_quantized:
            return self.compute_dtype
        return None if dtype == "auto" else dtype

    def study_columns(self, dtype: str) -> dict[str, object]:
        """How the base was stored, as the columns a quantization study compares runs by."""
        columns: dict[str, object] = {
            "quantization": self.mode,
            "compute_dtype": self.training_dtype(dtype) or dtype,
            "double_quant": self.uses_double_quant,
        }
        # The mode's own settings where it has them (HQQ's bits, torchao's scheme): the technique's name reads them.
        columns.update({o: getattr(self, o) for o in BACKEND_OPTIONS if getattr(self, o) is not None})
        return columns
