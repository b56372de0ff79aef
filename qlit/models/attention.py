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


def attention_dropout(config: Any) -> float:
    """The attention-probability dropout a model config trains with (``attention_dropout``; GPT-2's ``attn_pdrop``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        value = getattr(text, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


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


@torch.compiler.disable  # sample bounds change every step: the kernel call stays out of compiled layer graphs
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
    if cu_seq_lens is None or query.size(0) != 1:  # a padded batch: transformers' SDPA path and its mask
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # SDPA is on autocast's list of half-precision ops and the flash kernel computes in fp16/bf16 only: under
    # autocast take its dtype (rotary embeddings in the fp32 norms' dtype leave q and k in fp32), as SDPA would.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if not query.is_cuda or dtype not in (torch.float16, torch.bfloat16) or dropout:
        # fp32, off CUDA, or attention dropout (which the kernel lacks): SDPA, with the per-sample mask built here
        # (transformers built none for this name).
        mask = _per_sample_causal_mask(cu_seq_lens, query.size(2), query.device)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    kernel = _varlen_kernel()
    heads, kv_heads = query.size(1), key.size(1)
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (tokens, heads, dim)
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


def _per_sample_causal_mask(cu_seq_lens: torch.Tensor, tokens: int, device: torch.device) -> torch.Tensor:
    """``(1, 1, tokens, tokens)``: True where a token may attend, i.e. to itself and earlier tokens of its sample."""
    index = torch.arange(tokens, device=device)
    sample = torch.searchsorted(cu_seq_lens[1:].to(device), index, right=True)
    return ((sample[:, None] == sample[None, :]) & (index[:, None] >= index[None, :]))[None, None]


@functools.cache
def _kernel_params() -> frozenset[str]:
    return frozenset(inspect.signature(_varlen_kernel()).parameters)
