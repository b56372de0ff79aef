"""The decoder layers of a loaded model: where activation checkpointing and ``torch.compile`` apply.

Both work layer by layer, on transformers' ``GradientCheckpointingLayer`` blocks (every decoder layer of the
architectures transformers ships):

- **selective checkpointing**: recompute only the first ``n`` layers in the backward pass and keep the others'
  activations, spending memory the run has spare on skipping a third of their forward compute;
- **compile**: each layer through ``torch.compile`` (one graph, reused by every layer of the same shape), which
  fuses the adapters' element-wise work and cuts the kernel launches that bound small models. Attention stays
  outside the graph: packed batches change their sample bounds every step.
"""

from __future__ import annotations

from typing import Any

import torch


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers, in order (empty for an architecture without checkpointable layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_first(model: Any, n: int) -> int:
    """Keep checkpointing on the first ``n`` decoder layers only (after transformers enabled it on all); return how
    many layers are checkpointed."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = bool(getattr(layer, "gradient_checkpointing", False)) and i < n
    return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)


#: Bytes of saved activations per token in one decoder layer, per unit of (hidden + intermediate) size, for the
#: attention and gated-MLP paths with LoRA: with a bf16 residual stream (measured on Qwen2.5-0.5B, -1.5B and -7B:
#: 6.96, 6.4 and 7.29), and with the fp32 stream of peft's ``prepare_model_for_kbit_training``, whose fp32 norm
#: outputs are saved beside their bf16 casts (12.3 and 11.6 on 0.5B and 7B).
ACTIVATION_BYTES = 7.5
ACTIVATION_BYTES_FP32_STREAM = 12
#: Bytes per token and vocabulary entry that an unfused loss holds at its peak: the bf16 logits, their fp32 copy,
#: the fp32 log-probabilities and the gradient. Measured against the recipe's peak (every layer checkpointed,
#: transformers' loss): 11.8, 11.6 and 13.3 on Qwen2.5-0.5B, -1.5B and -7B.
LOGIT_BYTES = 12
#: A decoder layer replayed as a CUDA graph keeps three (tokens × hidden) buffers an eager one does not: the copy of
#: its input, and the fixed gradients of its output and input.
GRAPH_BUFFERS = 3


def auto_checkpointed(model: Any, fused_loss: bool, fp32_stream: bool = False, graphed: bool = False) -> int:
    """How many decoder layers ``gradient_checkpointing: auto`` recomputes.

    The fused linear + cross-entropy never holds the (tokens × vocabulary) logits; ``auto`` spends that memory on
    keeping whole layers' activations instead of recomputing them, so the peak stays at or below an unfused
    run's with every layer checkpointed. Both scale with the tokens of a batch, so the split does not depend on
    the batch. With a bf16 residual stream Qwen2.5-0.5B keeps all of its 24 layers, 1.5B 23 of 28 and 7B 10 of 28;
    with an fp32 stream (``fp32_stream``: peft's kbit preparation) all 24 of 0.5B and 6 of 7B's 28. Layers kept
    to be replayed as CUDA graphs (``graphed``) cost :data:`GRAPH_BUFFERS` more (tokens × hidden) buffers each: 1.5B
    then keeps 20, 7B 9. Without the fused loss every layer is checkpointed.
    """
    layers = len(decoder_layers(model))
    if not fused_loss:
        return layers
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inner = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if not hidden or not vocab:
        return layers
    per_layer = (ACTIVATION_BYTES_FP32_STREAM if fp32_stream else ACTIVATION_BYTES) * (hidden + inner)
    if graphed:
        per_layer += GRAPH_BUFFERS * (4 if fp32_stream else 2) * hidden
    kept = int(LOGIT_BYTES * vocab // per_layer)
    return max(0, layers - kept)


def compile_layers(model: Any) -> int:
    """``torch.compile`` every decoder layer in place; return how many were compiled."""
    import torch._dynamo

    layers = decoder_layers(model)
    # Every layer is its own module object: allow a graph (and its guards) per layer without hitting the limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(layers) + 8)
    for layer in layers:
        layer.compile(dynamic=None)
    return len(layers)
