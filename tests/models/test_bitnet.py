"""BitNet b1.58 layers and their application to tiny Qwen2, Llama and GPT-2 models built from config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlit.errors import QlitError
from qlit.models.bitnet import (
    BitLinear,
    PackedBitLinear,
    activation_quant,
    apply_bitnet,
    bitnet_weight_bytes,
    pack_ternary,
    unpack_ternary,
    weight_dequant,
    weight_quant,
)
from qlit.models.shapes import TINY_DECODER, TINY_GPT2

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

_VOCAB = 128


def _tiny(arch: str, seed: int = 0) -> nn.Module:
    # The tiny shapes with transformers' default initialisation and a smaller vocabulary and context.
    common = {**TINY_DECODER, "vocab_size": _VOCAB, "max_position_embeddings": 64, "initializer_range": 0.02}
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif arch == "llama":
        config = transformers.LlamaConfig(**common)
    else:
        config = transformers.GPT2Config(
            **{**TINY_GPT2, "vocab_size": _VOCAB, "n_positions": 64, "initializer_range": 0.02}
        )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _batch(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, _VOCAB, (batch, length), generator=gen)


_EXPECTED = {
    "qwen2": [
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ],
    "gpt2": [
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ],
}
_EXPECTED["llama"] = _EXPECTED["qwen2"]


# --- quantisers -------------------------------------------------------------------------------------------------


def test_weight_quant_is_ternary_times_absmean():
    torch.manual_seed(0)
    w = torch.randn(48, 33)
    w_q, gamma = weight_quant(w)
    assert w_q.dtype == torch.int8
    assert set(w_q.unique().tolist()) == {-1, 0, 1}
    assert torch.allclose(gamma, w.abs().mean())
    deq = weight_dequant(w)
    assert set(deq.unique().tolist()) == {-gamma.item(), 0.0, gamma.item()}
    # RoundClip(W / gamma): entries above gamma/2 in magnitude become +-gamma, the others 0.
    expected = torch.where(w.abs() > gamma / 2, torch.sign(w) * gamma, torch.zeros_like(w))
    torch.testing.assert_close(deq, expected)


def test_activation_quant_per_token_absmax_8bit():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    x_q = activation_quant(x)
    scale = 127 / x.abs().amax(dim=-1, keepdim=True)
    levels = x_q * scale
    # Every token lands on the integer grid of its own scale, within the int8 range, and moves by at most half a step.
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
    assert levels.abs().max() <= 127 + 1e-3
    assert ((x_q - x).abs() <= 0.5 / scale + 1e-6).all()
    assert torch.equal(activation_quant(torch.zeros(2, 8)), torch.zeros(2, 8))


# --- straight-through estimator ------------------------------------------------------------------------------------


def test_bitlinear_straight_through_gradients():
    torch.manual_seed(0)
    layer = BitLinear(24, 16)
    x = torch.randn(4, 24, requires_grad=True)
    grad_out = torch.randn(4, 16)
    (layer(x) * grad_out).sum().backward()

    # Reference: the same forward with the quantised weight and input as leaves.
    w_leaf = weight_dequant(layer.weight).requires_grad_()
    x_leaf = activation_quant(x.detach()).requires_grad_()
    b_leaf = layer.bias.detach().clone().requires_grad_()
    ref = F.linear(x_leaf, w_leaf, b_leaf)
    (ref * grad_out).sum().backward()

    assert torch.equal(layer(x).detach(), ref.detach())
    torch.testing.assert_close(layer.weight.grad, w_leaf.grad)
    torch.testing.assert_close(x.grad, x_leaf.grad)
    torch.testing.assert_close(layer.bias.grad, b_leaf.grad)
    # The gradient is that of the quantised weight, not of the latent one.
    assert not torch.allclose(x.grad, grad_out @ layer.weight.detach())


# --- packing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (4,), (5,), (7, 3), (13, 11), (64, 64)])
def test_pack_unpack_round_trip(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    t = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    packed = pack_ternary(t)
    numel = t.numel()
    assert packed.dtype == torch.uint8 and packed.shape == ((numel + 3) // 4,)
    assert torch.equal(unpack_ternary(packed, shape), t)
    assert torch.equal(unpack_ternary(packed, numel), t.reshape(-1))


def test_pack_layout_and_validation():
    # Codes v + 1, first value in the lowest two bits.
    assert pack_ternary(torch.tensor([-1, 0, 1, 1], dtype=torch.int8)).tolist() == [0b10100100]
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([0, 2], dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        unpack_ternary(torch.zeros(2, dtype=torch.uint8), 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_and_unpacked_forwards_agree_bit_for_bit(dtype):
    torch.manual_seed(0)
    layer = BitLinear(37, 19, dtype=dtype).eval()  # 703 weights: not a multiple of 4
    packed = PackedBitLinear.from_module(layer)
    assert packed.compute_dtype == dtype
    x = torch.randn(3, 5, 37, dtype=dtype)
    assert torch.equal(packed.dequantized_weight(), weight_dequant(layer.weight))
    assert torch.equal(packed(x), layer(x))
    assert all(not p.requires_grad for p in packed.parameters())


# --- replacing layers in HF decoders ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("mode", ["latent", "frozen"])
def test_apply_bitnet_replaces_exactly_the_projections(arch, mode):
    model = _tiny(arch)
    before = dict(model.named_modules())
    embeddings, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    replaced = apply_bitnet(model, mode=mode)

    assert replaced == _EXPECTED[arch]
    cls = BitLinear if mode == "latent" else PackedBitLinear
    after = dict(model.named_modules())
    for name, module in after.items():
        if name in replaced:
            assert type(module) is cls
            assert module.training == before[name].training
        elif name in before and not any(name.startswith(r + ".") for r in replaced):
            assert module is before[name], name
    assert not [n for n, m in after.items() if isinstance(m, (BitLinear, PackedBitLinear)) and n not in replaced]
    # Embeddings and lm_head are the same objects (their values are checked with the rest of the state below).
    assert model.get_input_embeddings() is embeddings and type(embeddings) is nn.Embedding
    assert model.get_output_embeddings() is lm_head and type(lm_head) is nn.Linear
    untouched = [k for k in params_before if not any(k.startswith(r + ".") for r in replaced)]
    state = model.state_dict()
    assert untouched and all(torch.equal(state[k], params_before[k]) for k in untouched)
    if mode == "frozen":
        assert all(not p.requires_grad for n, p in model.named_parameters() if any(n.startswith(r) for r in replaced))
    # Applying again changes nothing.
    assert apply_bitnet(model, mode=mode) == []


def test_apply_bitnet_gpt2_conv1d_is_transposed_correctly():
    model = _tiny("gpt2")
    originals = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    qat_model = _tiny("gpt2")
    assert sorted(apply_bitnet(qat_model, mode="latent")) == sorted(originals)
    frozen_model = _tiny("gpt2")
    apply_bitnet(frozen_model, mode="frozen")
    torch.manual_seed(1)
    for name, conv in originals.items():
        assert conv.weight.shape == (conv.nx, conv.nf)  # stored (in, out)
        x = torch.randn(2, 3, conv.nx)
        # The quantised Conv1D: x_q @ W_q + b with W_q of the stored (in, out) weight.
        reference = activation_quant(x) @ weight_dequant(conv.weight) + conv.bias
        qat = qat_model.get_submodule(name)
        frozen = frozen_model.get_submodule(name)
        assert (qat.in_features, qat.out_features) == (conv.nx, conv.nf)
        torch.testing.assert_close(qat(x), reference, rtol=1e-5, atol=1e-6)
        assert torch.equal(frozen(x), qat(x))
        # Without quantisation the replaced weight computes the original Conv1D exactly.
        torch.testing.assert_close(F.linear(x, qat.weight, qat.bias), conv(x), rtol=1e-5, atol=1e-6)


def test_apply_bitnet_errors_and_packing_after_qat():
    with pytest.raises(QlitError, match="mode"):
        apply_bitnet(_tiny("qwen2"), mode="int4")  # type: ignore[arg-type]
    # Only the projections inside decoder layers are BitNet's: a model without any is refused, not left as it was.
    with pytest.raises(QlitError, match="no decoder layers in Sequential"):
        apply_bitnet(nn.Sequential(nn.Linear(4, 4)), mode="latent")
    # QAT layers are packed by a later frozen pass: train with QAT, deploy packed.
    qat = _tiny("llama")
    apply_bitnet(qat, mode="latent")
    ids = _batch()
    with torch.no_grad():
        qat_logits = qat(ids).logits
    assert apply_bitnet(qat, mode="frozen") == _EXPECTED["llama"]
    with torch.no_grad():
        assert torch.equal(qat(ids).logits, qat_logits)


# --- training -----------------------------------------------------------------------------------------------------


_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def test_lora_on_frozen_packed_base_trains():
    peft = pytest.importorskip("peft")
    model = _tiny("qwen2")
    apply_bitnet(model, mode="frozen")
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=_PROJECTIONS, lora_dropout=0.0)
    model = peft.get_peft_model(model, config)

    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, peft.tuners.lora.Linear) and isinstance(wrapped.base_layer, PackedBitLinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, seven projections, two layers
    packed_before = {n: b.clone() for n, b in model.named_buffers() if "packed_weight" in n}

    model.train()
    ids = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = _loss(model, ids)
        optimizer.zero_grad()
        loss.backward()
        # Gradients reach the LoRA of layer 0 through the frozen packed layers above it (the input STE); lora_B,
        # because lora_A's first gradient is zero while lora_B is initialised to zero.
        assert wrapped.lora_B["default"].weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] != losses[0]
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(torch.equal(b, packed_before[n]) for n, b in model.named_buffers() if "packed_weight" in n)


def test_qat_overfits_one_batch():
    model = _tiny("llama")
    apply_bitnet(model, mode="latent")
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, BitLinear) and layer.weight.requires_grad
    model.train()
    ids = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        loss = _loss(model, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- memory and serialisation -------------------------------------------------------------------------------------


def test_packed_base_is_at_most_a_sixth_of_bf16():
    model = _tiny("qwen2")
    apply_bitnet(model, mode="frozen")
    layers = [m for m in model.modules() if isinstance(m, PackedBitLinear)]
    buffer_bytes = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    weights = sum(m.in_features * m.out_features for m in layers)
    assert buffer_bytes * 6 <= weights * 2
    report = bitnet_weight_bytes(model)
    assert report["layers"] == 14 and report["params"] == weights
    assert report["resident_bytes"] == buffer_bytes == report["packed_bytes"]
    assert report["bf16_bytes"] == 2 * weights

    qat = _tiny("qwen2")
    apply_bitnet(qat, mode="latent")
    qat_report = bitnet_weight_bytes(qat)
    assert qat_report["resident_bytes"] == 4 * weights
    assert qat_report["packed_bytes"] == report["packed_bytes"]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_frozen_state_dict_round_trip(arch):
    model = _tiny(arch, seed=0)
    apply_bitnet(model, mode="frozen")
    ids = _batch()
    with torch.no_grad():
        logits = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("packed_weight") for k in state) and any(k.endswith("weight_scale") for k in state)
    assert not any(k.endswith((".q_proj.weight", ".c_attn.weight")) for k in state)  # no full-precision copy

    fresh = _tiny(arch, seed=1)  # different random weights
    apply_bitnet(fresh, mode="frozen")
    with torch.no_grad():
        assert not torch.equal(fresh(ids).logits, logits)
    fresh.load_state_dict(state)  # strict: the keys match exactly
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)
