"""Model surgery: replacing the projection layers of a Hugging Face decoder by BitNet b1.58 layers, in place."""

from __future__ import annotations

from typing import Literal

from torch import nn

from qlit.errors import QlitError
from qlit.models.bitnet.layers import BitLinear, PackedBitLinear, _is_linear_like


def _decoder_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's repeated Transformer blocks (decoder layers), outermost only.

    Transformers names its block classes in ``_no_split_modules`` (``Qwen2DecoderLayer``, ``GPT2Block``...); a
    model without it falls back to the elements of its ``nn.ModuleList``s.
    """
    block_classes = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    names = [name for name, m in model.named_modules() if name and type(m).__name__ in block_classes]
    if not names:
        names = [
            f"{name}.{child}" if name else child
            for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList)
            for child, _ in m.named_children()
        ]
    names.sort(key=len)
    outermost: list[str] = []
    for name in names:
        if not any(name.startswith(outer + ".") for outer in outermost):
            outermost.append(name)
    return outermost


def apply_bitnet(model: nn.Module, *, mode: Literal["latent", "frozen"]) -> list[str]:
    """Replace the projection layers of a Hugging Face decoder by BitNet b1.58 layers, in place.

    Only ``nn.Linear`` and GPT-2 ``Conv1D`` layers inside the decoder layers are candidates: embeddings, ``lm_head``
    and classification heads are never replaced, and nothing else in the model changes. Layers that already are
    :class:`BitLinear` are packed in ``"frozen"`` mode (QAT, then pack for deployment) and kept in ``"latent"`` mode;
    :class:`PackedBitLinear` layers are kept.

    A packed model saved with ``model.state_dict()`` is restored by building the same architecture, calling
    ``apply_bitnet(model, mode="frozen")`` and then ``model.load_state_dict(state)``.

    Args:
        model: The model, e.g. from ``AutoModelForCausalLM``; apply before wrapping it with peft.
        mode: ``"latent"`` for :class:`BitLinear` (trainable latent weights, keeping their ``requires_grad``) or
            ``"frozen"`` for :class:`PackedBitLinear` (packed, nothing trainable).

    Returns:
        The qualified names of the layers replaced, in model order.

    Raises:
        QlitError: For an unknown mode or a model without decoder layers.
    """
    if mode not in ("latent", "frozen"):
        raise QlitError(f"BitNet mode must be 'qat' or 'frozen', got '{mode}'.")
    layers = _decoder_layer_names(model)
    if not layers:
        raise QlitError(f"Found no decoder layers in {type(model).__name__} to apply BitNet to.")
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if _is_linear_like(module) and any(name.startswith(layer + ".") for layer in layers)
    ]
    replaced: list[str] = []
    for name, module in candidates:
        if isinstance(module, PackedBitLinear) or (mode == "latent" and isinstance(module, BitLinear)):
            continue
        new = BitLinear.from_module(module) if mode == "latent" else PackedBitLinear.from_module(module)
        new.train(module.training)
        model.set_submodule(name, new)
        replaced.append(name)
    return replaced
