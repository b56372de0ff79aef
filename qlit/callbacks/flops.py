"""Analytic model FLOPs per token of a decoder-only transformer, read off its Hugging Face config.

The counts are *model* FLOPs (what the maths of one training step needs), the numerator of MFU: recomputation from
activation checkpointing, dequantization of 4-bit weights, norms, activations, softmax and the optimizer are left out
on purpose, so that MFU compares set-ups by useful work. One multiply-add is 2 FLOPs.

Per trained token, with ``W`` the matmul weights of the model (:func:`matmul_params`):

* forward: ``2 W``;
* backward, gradient w.r.t. the inputs of every matmul: ``2 W``. A frozen base still pays it, because the adapters'
  gradients have to flow back through every frozen layer above them;
* backward, gradient w.r.t. the weights: ``2 W`` times the fraction of ``W`` that is trained (0 for a frozen base,
  1 for full fine-tuning);
* trainable adapter weights (LoRA's A and B) are matmul weights of their own, all trained: ``6`` per adapter
  parameter (included: the callers pass the adapters' parameter count; it is below 1 % for usual ranks);
* attention scores and weighted values, which have no weights: ``6 × seq × (heads × head_dim) × layers``; see
  :func:`attention_flops_per_token` for why.

So a frozen base with LoRA costs ``≈ 4 W + 6 × seq × hidden × layers`` and full fine-tuning
``≈ 6 W + 6 × seq × hidden × layers``, the forms of the reference note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Architectures whose MLP is two matrices (up, down) rather than the gated three (gate, up, down) of Llama/Qwen2.
_UNGATED_MLP_MODEL_TYPES = frozenset(
    {"gpt2", "gpt_neo", "gptj", "gpt_bigcode", "gpt_neox", "codegen", "opt", "bloom", "falcon", "phi", "starcoder2"}
)


@dataclass(frozen=True)
class TransformerShape:
    """The sizes that decide a decoder-only transformer's matmul FLOPs.

    Args:
        hidden_size: Width of the residual stream.
        num_layers: Number of decoder blocks.
        intermediate_size: Width of the MLP's hidden layer.
        num_heads: Number of query heads.
        num_kv_heads: Number of key/value heads (fewer than ``num_heads`` under grouped-query attention).
        head_dim: Width of one head.
        vocab_size: Rows of the output projection (lm_head).
        gated_mlp: Whether the MLP has three matrices (gate, up, down) instead of two (up, down).
        tie_word_embeddings: Whether lm_head shares the input embedding's weight; it saves parameters, not FLOPs.
    """

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool
    tie_word_embeddings: bool


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def transformer_shape(config: Any) -> TransformerShape:
    """Read a :class:`TransformerShape` from a Hugging Face config (Llama/Qwen2 names, or GPT-2's ``n_*`` names).

    Args:
        config: A ``transformers.PretrainedConfig`` (or any object with the same attributes). Composite configs
            (vision-language models) are reduced to their text decoder.

    Raises:
        ValueError: The config lacks the hidden size, layer count, head count or vocabulary size.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head")
    vocab = _first(config, "vocab_size")
    if None in (hidden, layers, heads, vocab):
        raise ValueError(
            f"Cannot count FLOPs of a {type(config).__name__}: it needs hidden_size/n_embd, num_hidden_layers/n_layer, "
            "num_attention_heads/n_head and vocab_size."
        )
    kv_heads = _first(config, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if getattr(config, "multi_query", False) else heads
    # GPT-2 leaves n_inner as None, meaning 4 × hidden.
    intermediate = _first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    model_type = getattr(config, "model_type", "")
    return TransformerShape(
        hidden_size=int(hidden),
        num_layers=int(layers),
        intermediate_size=int(intermediate),
        num_heads=int(heads),
        num_kv_heads=int(kv_heads),
        head_dim=int(_first(config, "head_dim") or hidden // heads),
        vocab_size=int(vocab),
        gated_mlp=model_type not in _UNGATED_MLP_MODEL_TYPES,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
    )


def _shape(config: Any) -> TransformerShape:
    return config if isinstance(config, TransformerShape) else transformer_shape(config)


def matmul_params(config: Any) -> int:
    """Number of weights that multiply activations once per token: attention q/k/v/o, the MLP, and lm_head.

    Embedding lookups are not matmuls; lm_head counts once whether or not it is tied to the embedding, because the
    output projection runs either way. Biases and norms are left out (they are element-wise).

    Args:
        config: A Hugging Face config or a :class:`TransformerShape`.
    """
    s = _shape(config)
    q_width = s.num_heads * s.head_dim
    kv_width = s.num_kv_heads * s.head_dim
    attention = s.hidden_size * q_width + 2 * s.hidden_size * kv_width + q_width * s.hidden_size
    mlp = (3 if s.gated_mlp else 2) * s.hidden_size * s.intermediate_size
    return s.num_layers * (attention + mlp) + s.hidden_size * s.vocab_size


def attention_flops_per_token(config: Any, seq_len: int) -> int:
    """FLOPs per token of the attention products (scores ``QKᵀ`` and weighted values ``AV``), forward and backward.

    Per layer and token, a full (non-causal) attention forward is ``2 × seq × d`` for ``QKᵀ`` plus the same for
    ``AV`` (``d`` = heads × head_dim, the hidden size for most models): ``4 × seq × d``. A causal mask lets a token
    attend to half the sequence on average, halving it to ``2 × seq × d``; the backward pass computes gradients for
    both operands of both products, twice the forward. Forward plus backward is ``6 × seq × d`` per layer, the
    reference note's ``6 × seq × hidden × layers``. Frozen or not, this is the same: these products have no weights,
    and a frozen base still back-propagates through them to the adapters below.

    Args:
        config: A Hugging Face config or a :class:`TransformerShape`.
        seq_len: Tokens in the sequence the token belongs to (its real, unpadded length where known).
    """
    s = _shape(config)
    return 6 * seq_len * s.num_heads * s.head_dim * s.num_layers


def weight_flops_per_token(
    config: Any,
    *,
    full_finetune: bool = False,
    trainable_matmul_params_fraction: float | None = None,
    adapter_params: int = 0,
) -> int:
    """The matmul-weight part of :func:`flops_per_token`, which does not depend on the sequence length.

    Args:
        config: A Hugging Face config or a :class:`TransformerShape`.
        full_finetune: Train every base weight (adds their weight gradients, ``2 W``).
        trainable_matmul_params_fraction: Fraction of the base matmul weights that is trained, between 0 and 1;
            overrides ``full_finetune`` when given.
        adapter_params: Parameters of trainable adapters outside the base weights (LoRA A and B), 6 FLOPs each.
    """
    fraction = trainable_matmul_params_fraction
    if fraction is None:
        fraction = 1.0 if full_finetune else 0.0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"trainable_matmul_params_fraction must lie in [0, 1], got {fraction}.")
    w = matmul_params(config)
    # forward 2W + input-gradient 2W always; weight-gradient 2W only for the trained share.
    return round((4 + 2 * fraction) * w) + 6 * adapter_params


def flops_per_token(
    config: Any,
    seq_len: int,
    *,
    full_finetune: bool = False,
    trainable_matmul_params_fraction: float | None = None,
    adapter_params: int = 0,
) -> int:
    """Model FLOPs of one training step per trained token: forward and backward through matmuls and attention.

    A frozen (quantized) base with LoRA gives ``4 W + 6 × adapter_params + 6 × seq × d × layers``, full fine-tuning
    ``6 W + 6 × seq × d × layers`` (``W`` = :func:`matmul_params`, ``d`` = heads × head_dim).

    Args:
        config: A Hugging Face config or a :class:`TransformerShape`.
        seq_len: Tokens per sequence.
        full_finetune: Train every base weight (adds their weight gradients, ``2 W``).
        trainable_matmul_params_fraction: Fraction of the base matmul weights that is trained, between 0 and 1;
            overrides ``full_finetune`` when given.
        adapter_params: Parameters of trainable adapters outside the base weights (LoRA A and B), 6 FLOPs each.
    """
    s = _shape(config)
    return weight_flops_per_token(
        s,
        full_finetune=full_finetune,
        trainable_matmul_params_fraction=trainable_matmul_params_fraction,
        adapter_params=adapter_params,
    ) + attention_flops_per_token(s, seq_len)
