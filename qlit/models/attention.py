"""Attention over packed batches: PyTorch's variable-length flash kernel behind transformers' attention interface.

A packed batch is one row holding several samples back to back, with ``position_ids`` restarting at every sample
and ``cu_seq_lens`` marking where each starts. SDPA can only honour such a row through a (tokens × tokens)
block-diagonal mask, which takes it off its fast kernels; ``torch.nn.attention.varlen.varlen_attn`` (PyTorch ≥ 2.9,
CUDA) attends within each sample directly, as flash-attn's ``flash_attn_varlen_func`` does, with no mask and no
padding. Registered under :data:`VARLEN` in transformers' ``AttentionInterface``; any call without sample bounds
(validation and generation batches, padded) goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

#: The ``attn_implementation`` name qlit registers.
VARLEN = "qlit_varlen"


@functools.cache
def _varlen_kernel() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # PyTorch < 2.9
        return None
    return varlen_attn


def varlen_available(device: torch.device | str) -> bool:
    """Whether packed batches can use the variable-length kernel on ``device`` (CUDA with PyTorch ≥ 2.9)."""
    return torch.device(device).type == "cuda" and _varlen_kernel() is not None


def register() -> str:
    """Register :data:`VARLEN` with transformers (idempotent) and return the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, _mask)
    return VARLEN


def _mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    # A padded batch (validation, generation) needs SDPA's mask; a packed one needs none (the kernel reads the
    # sample bounds), and an unpadded single sequence is plainly causal.
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``(1, heads, tokens, dim)``, key/value with KV heads.

    Sample bounds come as ``cu_seq_lens_q`` / ``max_length_q`` (transformers' flash-attention keyword names).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.size(0) != 1 or not query.is_cuda:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError("qlit's variable-length attention has no dropout: set the model's attention_dropout to 0.")
    kernel = _varlen_kernel()
    heads, kv_heads = query.size(1), key.size(1)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    extra: dict[str, Any] = {}
    params = _kernel_params()
    if kv_heads != heads:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # PyTorch 2.9-2.12: no grouped-query support in the kernel
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    if "is_causal" in params:
        extra["is_causal"] = True
    else:
        extra["window_size"] = (-1, 0)  # (left, right) = (unbounded, 0): causal
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    longest = int(kwargs.get("max_length_q") or 0)
    if not longest:
        raise ValueError("a packed batch needs max_length_q (its longest sample) beside cu_seq_lens_q.")
    out = kernel(q, k, v, cu, cu, longest, longest, scale=scaling, **extra)
    return out.unsqueeze(0), None  # (1, tokens, heads, dim), as transformers' attention functions return


@functools.cache
def _kernel_params() -> frozenset[str]:
    return frozenset(inspect.signature(_varlen_kernel()).parameters)
