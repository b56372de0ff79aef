"""BitNet b1.58 layers: the ternary weight and 8-bit activation quantisers, 2-bit packing, and the two layers.

:class:`BitLinear` trains full-precision latent weights through the quantisers (QAT); :class:`PackedBitLinear` holds
only the packed ternary weights and is frozen. Both compute bit for bit the same forward pass from the same latent
weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qlit.errors import QlitError

EPS = 1e-5
"""Keeps the weight and activation scales finite for all-zero tensors (the paper's epsilon)."""

ACTIVATION_QMAX = 127
"""Q_b = 2^(b-1) - 1 for b = 8 bits: activations are scaled into [-Q_b, Q_b] and clipped to the int8 range."""

_VALUES_PER_BYTE = 4  # a ternary value takes 2 bits


def weight_quant(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantisation of a weight tensor (BitNet b1.58, eq. 1-3).

    ``gamma = mean(|W|)`` and ``W_q = RoundClip(W / (gamma + eps), -1, 1)`` with
    ``RoundClip(x, a, b) = max(a, min(b, round(x)))``; the dequantised weight is ``W_q * gamma``.

    Computed in float32 whatever the dtype of ``w``, so that bf16 weights round the same way as float32 ones.

    Args:
        w: The full-precision (latent) weight, any shape.
        eps: Added to ``gamma`` before dividing, so an all-zero tensor quantises to zeros.

    Returns:
        The ternary weight as an ``int8`` tensor of ``w``'s shape with values in ``{-1, 0, 1}``, and the float32
        scalar scale ``gamma`` (a 0-dim tensor).
    """
    w32 = w.detach().float()
    gamma = w32.abs().mean()
    # int8 rather than float: no negative zeros, and the exact values that pack_ternary stores.
    w_q = (w32 / (gamma + eps)).round().clamp(-1, 1).to(torch.int8)
    return w_q, gamma


def weight_dequant(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The quantised weight in ``w``'s dtype: ``W_q * gamma``, i.e. every entry is ``-gamma``, ``0`` or ``+gamma``.

    Args:
        w: The full-precision (latent) weight.
        eps: See :func:`weight_quant`.

    Returns:
        A tensor of ``w``'s shape and dtype holding at most three distinct values. Not differentiable: training goes
        through the straight-through estimator of :class:`BitLinear`.
    """
    w_q, gamma = weight_quant(w, eps)
    return _dequant(w_q, gamma.to(w.dtype), w.dtype)


def activation_quant(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantisation of activations (BitNet, eq. 4; BitNet b1.58, section 2).

    ``s = Q_b / max(|x|, eps)`` over the last dimension with ``Q_b = 127``, and
    ``x_q = Clip(round(x * s), -128, 127) / s``.

    Computed in float32 and returned in ``x``'s dtype: rounding ``x * s`` in bf16 (8 significant bits) would already
    move values of up to 127 before ``round`` sees them.

    Args:
        x: Activations, the last dimension being the features of one token.
        eps: Lower bound of the per-token absmax, so all-zero tokens stay zero.

    Returns:
        The fake-quantised activations, shape and dtype of ``x``. Not differentiable: the layers train through a
        straight-through estimator.
    """
    x32 = x.detach().float()
    scale = ACTIVATION_QMAX / x32.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    x_q = (x32 * scale).round().clamp(-ACTIVATION_QMAX - 1, ACTIVATION_QMAX) / scale
    return x_q.to(x.dtype)


def _dequant(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The one dequantisation both layers use: +-1 and 0 times a scale of the same dtype is exact in any float dtype,
    # so BitLinear and PackedBitLinear get identical weight tensors whenever their scales are equal in that dtype.
    return w_q.to(dtype) * scale.to(dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``quantized``; backward passes the gradient unchanged to ``latent`` (the STE).

    Same gradient as the usual ``latent + (quantized - latent).detach()``, but the forward value is exactly
    ``quantized`` (that sum rounds), which is what lets :class:`BitLinear` match :class:`PackedBitLinear` bit for bit.
    """

    @staticmethod
    def forward(ctx, latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


def _ste(latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(latent, quantized)


class BitLinear(nn.Linear):
    """A linear layer with ternary weights and 8-bit activations, trained through latent full-precision weights.

    ``y = x_q W_q^T + b`` with ``W_q = weight_dequant(W)`` and ``x_q = activation_quant(x)``; both quantisers use a
    straight-through estimator, so the latent ``weight`` receives the gradient of the quantised weight and the input
    receives that of the quantised input. The bias, as in common BitNet fine-tuning code, stays full precision.

    Being an ``nn.Linear``, peft's LoRA and every ``isinstance(m, nn.Linear)`` check accept it. Merging a LoRA into
    it adds to the latent weights, which are then re-quantised: the merged layer is not the unmerged one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised forward pass.

        Args:
            x: Input of shape ``(..., in_features)``.

        Returns:
            Output of shape ``(..., out_features)``.
        """
        # No norm before the activation quantiser, unlike the paper's BitLinear: as in transformers' BitNet
        # integration (use_rms_norm=False by default), HF decoders already normalise the inputs of the attention and
        # MLP blocks, and an extra norm would change the function the pretrained weights compute.
        w = _ste(self.weight, weight_dequant(self.weight))
        x = _ste(x, activation_quant(x))
        return F.linear(x, w, self.bias)

    @classmethod
    def from_module(cls, module: nn.Module) -> BitLinear:
        """A ``BitLinear`` computing the quantised version of ``module`` (an ``nn.Linear`` or GPT-2 ``Conv1D``).

        An ``nn.Linear``'s weight and bias parameters are shared, not copied, so an optimiser or a tied reference
        that holds them keeps working; a ``Conv1D`` weight is transposed into a new parameter.

        Args:
            module: The layer to replace.

        Returns:
            The new layer, on the device and dtype of ``module``.
        """
        weight, bias, shared = _linear_weight(module)
        out_features, in_features = weight.shape
        new = cls(in_features, out_features, bias=bias is not None, device="meta")
        new.weight = weight if shared else nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        if bias is not None:
            new.bias = bias
        return new


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack ternary values four to a byte, two bits each.

    The flattened values ``v`` are stored as codes ``v + 1`` in ``{0, 1, 2}``; byte ``i`` holds values ``4i`` to
    ``4i + 3`` in bits 0-1, 2-3, 4-5 and 6-7. A tail shorter than four values is padded with the code of 0.

    Args:
        t: An integer tensor of any shape whose values are in ``{-1, 0, 1}``.

    Returns:
        A 1-D ``uint8`` tensor of ``ceil(t.numel() / 4)`` bytes on ``t``'s device.

    Raises:
        ValueError: If ``t`` is not an integer tensor or holds a value outside ``{-1, 0, 1}``.
    """
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"pack_ternary needs an integer tensor of -1, 0 and 1, got dtype {t.dtype}.")
    flat = t.reshape(-1)
    if flat.numel() and bool(((flat < -1) | (flat > 1)).any()):
        raise ValueError("pack_ternary needs values in {-1, 0, 1}; quantise the weight with weight_quant first.")
    codes = (flat.to(torch.int16) + 1).to(torch.uint8)
    codes = F.pad(codes, (0, -codes.numel() % _VALUES_PER_BYTE), value=1).view(-1, _VALUES_PER_BYTE)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: int | Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`.

    Args:
        packed: The 1-D ``uint8`` tensor :func:`pack_ternary` returned.
        shape: The shape of the packed tensor, or just its number of elements (then the result is 1-D).

    Returns:
        An ``int8`` tensor of ``shape`` with values in ``{-1, 0, 1}``, on ``packed``'s device.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != -(-numel // _VALUES_PER_BYTE):
        raise ValueError(
            f"unpack_ternary got {packed.numel()} {packed.dtype} values for shape {shape}; expected "
            f"{-(-numel // _VALUES_PER_BYTE)} uint8 values."
        )
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
    codes = (packed.reshape(-1, 1) >> shifts) & 3
    return (codes.reshape(-1)[:numel].to(torch.int8) - 1).view(shape)


class PackedBitLinear(nn.Linear):
    """A frozen BitNet b1.58 linear layer whose ternary weights are packed four to a byte.

    Buffers ``packed_weight`` (``uint8``, ``ceil(out * in / 4)`` bytes) and ``weight_scale`` (the per-tensor
    ``gamma``, shape ``(1,)``, in the layer's compute dtype) and the frozen parameter ``bias`` are its whole state, so
    ``state_dict``/``load_state_dict`` save and restore the packed model. The forward pass unpacks the weight to the
    input's dtype and computes exactly what :class:`BitLinear` computes from the latent weights it was packed from.

    It subclasses ``nn.Linear`` (without its ``weight`` parameter) because peft wraps a layer in ``lora.Linear`` only
    when ``isinstance(layer, nn.Linear)``; peft then reads ``in_features``/``out_features``, places the adapter on
    ``weight.device`` and casts it to ``compute_dtype`` (as for bitsandbytes' 4-bit layers), so ``weight`` is the
    packed buffer and ``compute_dtype`` the scale's dtype, which follows ``model.to(dtype)``. Merging an adapter into
    a packed layer is not possible (the weight is ternary) and fails in peft.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """An all-zero packed layer, to be filled by :meth:`from_module` or ``load_state_dict``.

        Args:
            in_features: Size of each input sample.
            out_features: Size of each output sample.
            bias: Whether the layer has a (frozen, full-precision) bias.
            device: Where to allocate the buffers.
            dtype: The compute dtype (of the scale and the bias); the default dtype when ``None``.
        """
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full-precision weight
        dtype = dtype or torch.get_default_dtype()
        self.in_features = in_features
        self.out_features = out_features
        numel = in_features * out_features
        self.register_buffer(
            "packed_weight",
            torch.full((-(-numel // _VALUES_PER_BYTE),), 0b01010101, dtype=torch.uint8, device=device),
        )
        self.register_buffer("weight_scale", torch.zeros(1, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        """The packed ``uint8`` buffer: what peft and device look-ups find under ``weight``."""
        return self.packed_weight

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the scale and bias (peft casts a LoRA adapter on this layer to it)."""
        return self.weight_scale.dtype

    def reset_parameters(self) -> None:
        """Does nothing: the packed weights come from a trained model, never from a random init."""

    def ternary_weight(self) -> torch.Tensor:
        """The unpacked ternary weight, ``int8`` of shape ``(out_features, in_features)``."""
        return unpack_ternary(self.packed_weight, (self.out_features, self.in_features))

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_q * gamma`` in ``dtype`` (the compute dtype when ``None``), shape ``(out_features, in_features)``.

        Args:
            dtype: The dtype of the result.

        Returns:
            The dequantised weight, bit for bit what :func:`weight_dequant` gives for the latent weight.
        """
        return _dequant(self.ternary_weight(), self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised forward pass; the weight is unpacked for this call only.

        Args:
            x: Input of shape ``(..., in_features)``.

        Returns:
            Output of shape ``(..., out_features)``.
        """
        w = self.dequantized_weight(x.dtype)
        # The STE on the input lets gradients reach the layers (and LoRA adapters) below this frozen one.
        x = _ste(x, activation_quant(x))
        return F.linear(x, w, self.bias)

    @classmethod
    def from_module(cls, module: nn.Module) -> PackedBitLinear:
        """Quantise and pack ``module`` (``nn.Linear``, :class:`BitLinear` or GPT-2 ``Conv1D``) into a frozen layer.

        Args:
            module: The layer to replace; its (latent) weight is read, not modified.

        Returns:
            The packed layer, on ``module``'s device, with the compute dtype of its weight and ``requires_grad``
            False everywhere.
        """
        weight, bias, _ = _linear_weight(module)
        out_features, in_features = weight.shape
        new = cls(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            w_q, gamma = weight_quant(weight)
            new.packed_weight.copy_(pack_ternary(w_q))
            # Rounded to the weight's dtype exactly as weight_dequant rounds it, hence identical dequantised weights.
            new.weight_scale.copy_(gamma.to(weight.dtype))
            if bias is not None:
                new.bias.copy_(bias)
        return new


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the layers themselves do not need it
        return None
    return Conv1D


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(weight as (out, in), bias, whether weight is module's own parameter)`` of a linear-like layer."""
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        # Conv1D computes x @ W + b with W stored (in, out): the nn.Linear weight is its transpose.
        return module.weight.detach().t().contiguous(), module.bias, False
    if isinstance(module, PackedBitLinear):
        raise QlitError("A PackedBitLinear layer has no latent weights left to re-quantise; load the model again.")
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, True
    raise QlitError(f"BitNet can replace nn.Linear and Conv1D layers, not {type(module).__name__}.")


def _is_linear_like(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def bitnet_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Memory of the weights of the model's BitNet layers, for memory reports.

    Args:
        model: A model after :func:`apply_bitnet` (peft-wrapped or not).

    Returns:
        ``layers``: number of BitNet layers; ``params``: their weight entries (biases excluded); ``resident_bytes``:
        what their weights occupy now (packed bytes and scale for frozen layers, latent weights for QAT ones);
        ``packed_bytes``: what they occupy packed; ``bf16_bytes``: what the same weights take in bf16.
    """
    layers = params = resident = packed = 0
    for module in model.modules():
        if isinstance(module, PackedBitLinear):
            scale_bytes = module.weight_scale.element_size()
            resident += module.packed_weight.numel() * module.packed_weight.element_size() + scale_bytes
        elif isinstance(module, BitLinear):
            scale_bytes = module.weight.element_size()
            resident += module.weight.numel() * module.weight.element_size()
        else:
            continue
        numel = module.in_features * module.out_features
        layers += 1
        params += numel
        packed += -(-numel // _VALUES_PER_BYTE) + scale_bytes
    return {
        "layers": layers,
        "params": params,
        "resident_bytes": resident,
        "packed_bytes": packed,
        "bf16_bytes": 2 * params,
    }
