"""Per-layer cost of a frozen BitNet b1.58 projection against bf16 and NF4 layers, on one CUDA GPU.

Times forward + input-gradient backward (what a frozen base layer does under LoRA) of one projection for a batch of
tokens, and reports the bytes its weights occupy. ``packed`` unpacks the 2-bit weights in eager PyTorch on every
call; ``packed+compile`` fuses unpacking and scaling with ``torch.compile``. Prints one JSON line per layer kind.

    python tools/bench_bitnet.py            # Qwen2.5-7B MLP shape (3584 -> 18944), 8 x 1024 tokens
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

from qlit.models.bitnet import PackedBitLinear, activation_quant, unpack_ternary


def timed(layer: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    """Milliseconds of forward + backward to the input, median of ``repeats`` after 3 warm-up calls."""
    times = []
    for i in range(repeats + 3):
        x.grad = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        layer(x).sum().backward()
        torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def weight_bytes(layer: nn.Module) -> int:
    tensors = [*layer.parameters(), *layer.buffers()]
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if state is not None:
        tensors.append(state.absmax)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def main(in_features: int = 3584, out_features: int = 18944, tokens: int = 8192) -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    nf4 = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    nf4.weight = bnb.nn.Params4bit(dense.weight.data.cpu(), requires_grad=False, quant_type="nf4")
    nf4 = nf4.cuda()
    packed = PackedBitLinear.from_module(dense).cuda()

    @torch.compile(fullgraph=True)
    def fused_weight(p: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return unpack_ternary(p, (out_features, in_features)).to(dtype) * scale.to(dtype)

    class CompiledPacked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = fused_weight(packed.packed_weight, packed.weight_scale, x.dtype)
            return torch.nn.functional.linear(x + (activation_quant(x) - x).detach(), w)

    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for name, layer in [("bf16", dense), ("nf4", nf4), ("packed", packed), ("packed+compile", CompiledPacked())]:
        torch.cuda.reset_peak_memory_stats()
        ms = timed(layer, x)
        owner = packed if name.startswith("packed") else layer
        print(
            json.dumps(
                {
                    "layer": name,
                    "shape": [in_features, out_features],
                    "tokens": tokens,
                    "ms": round(ms, 3),
                    "weight_mib": round(weight_bytes(owner) / 2**20, 2),
                    "peak_alloc_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
