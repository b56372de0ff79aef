"""``bitnet``: BitNet b1.58 (Ma et al. 2024), ternary projection weights and 8-bit activations.

transformers loads the base as it is stored; the projections are converted after loading. Without an adapter they
train through their latent weights (QAT) and the model is saved packed at the end of ``fit``; under an adapter they
are frozen and packed 2 bits per weight (QLoRA + BitNet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from qlit.errors import QlitError
from qlit.models.bitnet import apply_bitnet, save_packed
from qlit.models.quant.base import QuantBackend

PACKED_DIR = "bitnet"


class BitNet(QuantBackend):
    """BitNet b1.58 layers put into the loaded base by :func:`qlit.models.bitnet.apply_bitnet`."""

    modes: ClassVar[tuple[str, ...]] = ("bitnet",)
    packs_weights: ClassVar[bool] = True  # under an adapter, the only case adapter_refusal is asked about
    # No fast path: its layers are not recorded as CUDA graphs, and the fused LoRA reads bitsandbytes' 4-bit weights.
    labels: ClassVar[dict[str, str]] = {"bitnet": "BitNet"}
    lora_inits: ClassVar[tuple[str, ...]] = ("default", "eva")  # peft cannot write a packed base weight
    strategies: ClassVar[dict[str, dict[str, Any]]] = {
        "bitnet": {"mode": "bitnet", "double_quant": None},  # trained through its ternary weights (QAT)
        "qlora-bitnet": {"mode": "bitnet", "double_quant": None, "lora": True},
    }

    @classmethod
    def technique_label(cls, mode: str, adapter: str | None, **label_args: Any) -> str | None:
        if adapter == "full":
            return "BitNet b1.58"  # trained through its ternary weights (QAT)
        if adapter == "LoraConfig":
            return "QLoRA + BitNet"
        return super().technique_label(mode, adapter, **label_args)

    def adapter_refusal(self, adapter: Any) -> str | None:
        from peft import LoraConfig

        if isinstance(adapter, LoraConfig) and getattr(adapter, "use_dora", False):
            # DoRA normalises by the base weight's column norms, and peft cannot de-quantize a PackedBitLinear.
            return (
                "DoRA (use_dora) cannot train on a bitnet base, because peft cannot de-quantize its packed ternary "
                "weights: set use_dora to false or use quantization.mode nf4."
            )
        return super().adapter_refusal(adapter)

    def convert(self, model: Any, *, has_adapter: bool) -> None:
        # Under an adapter the ternary base is frozen and packed (QLoRA + BitNet); alone it trains (QAT).
        apply_bitnet(model, mode="frozen" if has_adapter else "latent")

    def dequantized_weight(self, module: Any) -> Any:
        from qlit.models.bitnet import BitLinear, PackedBitLinear, weight_dequant

        if isinstance(module, PackedBitLinear):
            return module.dequantized_weight()
        if isinstance(module, BitLinear):
            return weight_dequant(module.weight)
        return None

    def save_trained(self, model: Any, log_dir: Path) -> Path:
        target = log_dir / PACKED_DIR
        save_packed(model, target)
        return target

    def check_export(self, adapter: str, *, dequantize: bool) -> None:
        if dequantize:
            raise QlitError(
                f"Adapter '{adapter}' trained on a BitNet b1.58 base, whose layers also quantize activations to 8 "
                "bits, which a plain transformers model cannot compute: pass --dequantize false to merge into the "
                "original full-precision weights instead."
            )
