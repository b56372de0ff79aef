"""Model shapes qlit builds from: the tiny offline decoders, and the Qwen2.5 sizes that benchmarks and FLOPs checks use.

Plain dicts of Hugging Face config arguments, so a test or a tool builds the same model as qlit without repeating
its numbers.
"""

from __future__ import annotations

from typing import Any

#: The tiny Llama-style decoder of ``qlit-tiny/qwen2`` and ``qlit-tiny/llama``: the smallest shapes that keep every
#: architectural feature: grouped-query attention (4 heads, 2 KV heads), a gated MLP, and weight sizes that are
#: multiples of bitsandbytes' 64-element quantization block. initializer_range 0.2 instead of 0.02: with a 64-wide
#: hidden state behind a frozen RMSNorm, 0.02 caps every logit near 1.3, so an adapter could never make the model
#: confident; real models' trained heads have no cap.
TINY_DECODER: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    initializer_range=0.2,
)

#: The tiny GPT-2 of ``qlit-tiny/gpt2`` (learned positions, no gated MLP, no GQA).
TINY_GPT2: dict[str, Any] = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.2)

#: GPT-2 124M (``GPT2Config`` arguments): the smallest of the GPT-2 family.
GPT2_124M: dict[str, Any] = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)

#: Qwen2.5 sizes (``Qwen2Config`` arguments) by name.
QWEN25: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
