"""BitNet b1.58: ternary weights and 8-bit activations for the projection layers of Hugging Face decoders.

BitNet (Wang et al. 2023, "BitNet: Scaling 1-bit Transformers for Large Language Models") replaces the linear layers
of a Transformer with ``BitLinear``; BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models
are in 1.58 Bits") makes its weights ternary, ``{-1, 0, +1}`` times one per-tensor scale, and quantises its input
activations per token to 8 bits. Two modes are offered:

* ``"latent"``: :class:`BitLinear` keeps full-precision latent weights, quantises weights and activations on the fly in
  the forward pass and trains the latent weights through a straight-through estimator (quantisation-aware training).
* ``"frozen"``: :class:`PackedBitLinear` stores only the ternary weights, four to a byte, plus the scale and the bias;
  it is frozen and serves as the base of a LoRA adapter (peft wraps it like any ``nn.Linear``).

Both layers compute bit for bit the same forward pass from the same latent weights, so a model trained with QAT,
packed with ``apply_bitnet(model, mode="frozen")`` and saved with ``state_dict`` reproduces its logits exactly.

The package holds three parts: ``layers`` (the quantisers, the 2-bit packing and the two layers), ``surgery``
(:func:`apply_bitnet`, which puts them into a model) and ``packed`` (the packed file format, :func:`save_packed` and
:func:`load_packed`).
"""

from qlit.models.bitnet.layers import (
    ACTIVATION_QMAX,
    EPS,
    BitLinear,
    PackedBitLinear,
    activation_quant,
    bitnet_weight_bytes,
    pack_ternary,
    unpack_ternary,
    weight_dequant,
    weight_quant,
)
from qlit.models.bitnet.packed import PACKED_WEIGHTS_FILE, load_packed, save_packed
from qlit.models.bitnet.surgery import apply_bitnet

__all__ = [
    "ACTIVATION_QMAX",
    "EPS",
    "PACKED_WEIGHTS_FILE",
    "BitLinear",
    "PackedBitLinear",
    "activation_quant",
    "apply_bitnet",
    "bitnet_weight_bytes",
    "load_packed",
    "pack_ternary",
    "save_packed",
    "unpack_ternary",
    "weight_dequant",
    "weight_quant",
]
