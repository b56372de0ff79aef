"""The recorded decode step on a GPU: transformers' greedy generate's tokens from one recording replayed, and its
per-token latency beside generate's (printed: run with ``pytest -m gpu tests/test_gpu_generation.py -s``)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from qlit.generation import KEPT_SHAPES, eager_generate
from qlit.models.loading import load_tokenizer
from qlit.models.quantization import Quantization
from qlit.module import QLitModule

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def _module(pretrained: str, mode: str, compute_dtype: str, generation: str = "graphs") -> QLitModule:
    torch.manual_seed(0)
    module = QLitModule(
        pretrained=pretrained,
        quantization=Quantization(mode=mode, compute_dtype=compute_dtype),
        dtype=compute_dtype,
        adapter=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        generation=generation,
    ).to(CUDA)
    module.configure_model()
    module.eval()
    for name, param in module.model.named_parameters():
        if "lora_B" in name:  # an adapter that changes the outputs (peft starts B at zero)
            torch.nn.init.normal_(param, std=0.05)
    module.tokenizer = load_tokenizer(pretrained)
    return module


def _prompts(lengths: tuple[int, ...], pad: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(5, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids.to(CUDA), mask.to(CUDA)


def _generate(model, ids, mask, new, eos, pad, **kwargs) -> torch.Tensor:
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
        **kwargs,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("mode", ["none", "nf4"])
@torch.no_grad()
def test_the_recorded_decode_step_gives_generate_tokens_and_is_replayed(mode):
    module = _module("qlit-tiny/qwen2", mode, "float32")
    model, pad = module.model, module.tokenizer.pad_token_id
    model.generation_config.eos_token_id = None
    generator = module.generator
    lengths = (5, 17, 9, 2)
    for seed in range(3):  # one recording, replayed for every later batch of this shape with its own prompts
        ids, mask = _prompts(lengths, pad, 200, seed)
        free = _generate(model, ids, mask, 24, None, pad)
        out = generator.generate(model, ids, mask, max_new_tokens=24, eos_token_id=None, pad_token_id=pad)
        assert out.path == "graphs" and torch.equal(out.tokens, free), seed
        stops = sorted({int(free[row, 2 + 3 * row]) for row in range(len(lengths))})
        expected = _generate(model, ids, mask, 24, stops, pad)
        out = generator.generate(model, ids, mask, max_new_tokens=24, eos_token_id=stops, pad_token_id=pad)
        assert torch.equal(out.tokens, expected), seed
        suppressed = _generate(model, ids, mask, 24, stops, pad, min_new_tokens=10)
        out = generator.generate(
            model, ids, mask, max_new_tokens=24, eos_token_id=stops, pad_token_id=pad, min_new_tokens=10
        )
        assert torch.equal(out.tokens, suppressed), seed
    decoders = list(generator._decoders.values())
    assert 1 <= len(decoders) <= KEPT_SHAPES and all(d.graph is not None for d in decoders)
    generator.release()
    assert not generator._decoders


@torch.no_grad()
def test_an_8bit_base_decodes_through_generate_and_says_why(caplog):
    module = _module("qlit-tiny/qwen2", "int8", "float32", generation="auto")
    ids, mask = _prompts((3, 8), module.tokenizer.pad_token_id, 200, 0)
    with caplog.at_level("INFO"):
        out = module.generate_ids(ids, mask, 6)
    assert out.path == "eager"
    assert "Generation runs transformers' generate (the recorded decode step needs an unquantized or 4-bit base)" in (
        caplog.text
    )


@pytest.mark.parametrize("rows", [1, 8])
@torch.no_grad()
def test_per_token_latency_of_the_recorded_step_against_generate(rows):
    """Qwen2.5-0.5B's shape (random weights), NF4 + LoRA in bf16, 32 new tokens: the recorded step decodes faster
    than generate; the numbers are printed."""
    module = _module("qlit-random/qwen2.5-0.5b", "nf4", "bfloat16")
    model, tok = module.model, module.tokenizer
    ids, mask = _prompts(tuple(48 + 7 * r for r in range(rows)), tok.pad_token_id, 1000, 0)

    def timed(run) -> tuple[float, float, torch.Tensor]:
        run()  # warm-up (and the recording)
        outs = [run() for _ in range(3)]
        best = min(outs, key=lambda o: o.decode_seconds)
        return 1000 * best.prefill_seconds, 1000 * best.decode_seconds / max(best.decode_steps, 1), best.tokens

    kwargs = dict(max_new_tokens=32, min_new_tokens=32, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    eager = timed(lambda: eager_generate(model, ids, mask, **kwargs))
    graphs = timed(lambda: module.generator.generate(model, ids, mask, **kwargs))
    same = (eager[2] == graphs[2]).all(dim=1).float().mean().item()
    print(
        f"\nbatch {rows}, NF4 + LoRA bf16, Qwen2.5-0.5B shape, {torch.cuda.get_device_name()}: "
        f"generate {eager[0]:.1f} ms prefill, {eager[1]:.2f} ms/token; "
        f"recorded step {graphs[0]:.1f} ms prefill, {graphs[1]:.2f} ms/token "
        f"({eager[1] / graphs[1]:.1f}x); rows with the same 32 tokens: {same:.0%}"
    )
    assert graphs[1] < eager[1]
