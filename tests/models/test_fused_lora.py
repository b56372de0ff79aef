"""The fused LoRA forward over a 4-bit base computes what peft's does: same logits, same adapter gradients."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from qlit.errors import QlitError
from qlit.models.quantization import Quantization
from qlit.module import QLitModule


def _module(fused, compute_dtype="float32", dropout=0.0, mode="nf4", checkpointing=False, compile=False, **lora):
    torch.manual_seed(0)  # the same random LoRA initialisation (B non-zero) for every build
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        quantization=Quantization(mode=mode, compute_dtype=compute_dtype),
        adapter=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False, **lora
        ),
        gradient_checkpointing=checkpointing,
        fused_lora=fused,
        compile=compile,
    )
    module.configure_model()
    module.train()
    return module


def _run(module, autocast=False):
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # LoRA dropout draws the same masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module.model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
    return out.logits.detach().float(), out.loss.item(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_gives_peft_logits_and_adapter_gradients_in_fp32(dropout):
    fused, peft = _module("auto", dropout=dropout), _module(False, dropout=dropout)
    assert fused.fused_lora_layers == 14 and peft.fused_lora_layers == 0  # 7 projections × 2 layers
    logits_f, loss_f, grads_f = _run(fused)
    logits_p, loss_p, grads_p = _run(peft)
    torch.testing.assert_close(logits_f, logits_p, rtol=1e-5, atol=1e-5)
    assert loss_f == pytest.approx(loss_p, rel=1e-6)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == 28  # lora_A and lora_B of every projection
    for name, grad in grads_f.items():
        torch.testing.assert_close(grad, grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_reentrant_checkpointing_runs_both_forwards_fused_with_the_same_dropout_masks(monkeypatch):
    """Reentrant checkpointing (qlit's default) runs each layer's first forward without gradients and recomputes it
    with them: both take the fused path, so LoRA dropout draws the same masks and the gradients are peft's."""
    from qlit.models import fused_lora

    calls = []
    forward = fused_lora._LoRA4bit.forward
    monkeypatch.setattr(fused_lora._LoRA4bit, "forward", staticmethod(lambda *a: calls.append(1) or forward(*a)))
    fused = _module("auto", dropout=0.1, checkpointing=True)
    peft = _module(False, dropout=0.1, checkpointing=True)
    _, loss_f, grads_f = _run(fused)
    assert len(calls) == 2 * 14  # every projection: the forward without gradients, then its recomputation
    _, loss_p, grads_p = _run(peft)
    assert loss_f == pytest.approx(loss_p, rel=1e-6)
    for name, grad in grads_f.items():
        torch.testing.assert_close(grad, grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_under_bf16_autocast_matches_peft_within_bf16_rounding():
    _, loss_f, grads_f = _run(_module("auto", compute_dtype="bfloat16"), autocast=True)
    _, loss_p, grads_p = _run(_module(False, compute_dtype="bfloat16"), autocast=True)
    flat_f = torch.cat([grads_f[name].flatten() for name in sorted(grads_f)])
    flat_p = torch.cat([grads_p[name].flatten() for name in sorted(grads_p)])
    # Measured: 0.02 % apart in loss, cosine 0.9997; the fused matmul accumulates the adapter product in fp32
    # where peft rounds it to bf16 twice (product, then sum).
    assert loss_f == pytest.approx(loss_p, rel=5e-3)
    assert torch.nn.functional.cosine_similarity(flat_f, flat_p, dim=0) > 0.995


def test_the_adapters_bf16_cast_follows_each_change_of_its_weights_between_steps():
    # The fp32 adapter is cast to bf16 once per step (model call) and reused by the backward pass. A change between
    # steps, even one that bypasses autograd's version counter (``.data``), must reach the next step's forward.
    fused, plain = _module("auto", compute_dtype="bfloat16"), _module(False, compute_dtype="bfloat16")
    losses = []
    for step in range(3):
        _, loss_f, _ = _run(fused, autocast=True)
        _, loss_p, _ = _run(plain, autocast=True)
        assert loss_f == pytest.approx(loss_p, rel=5e-3), step
        losses.append(loss_p)
        for module in (fused, plain):
            noise = torch.Generator().manual_seed(10 + step)
            for p in (p for p in module.model.parameters() if p.requires_grad):
                p.data.add_(torch.randn(p.shape, generator=noise))
                p.grad = None
    # Each change moves the loss well beyond the tolerance above, so a stale cast could not pass.
    assert min(abs(a - b) / b for a, b in zip(losses, losses[1:], strict=False)) > 2e-2


def test_the_fused_path_runs_in_training_only_and_steps_aside_for_a_disabled_adapter():
    from peft.tuners.lora.bnb import Linear4bit

    module = _module("auto")
    proj = module.model.base_model.model.model.layers[0].self_attn.o_proj
    assert isinstance(proj, Linear4bit)  # still peft's LoRA layer, for saving and merging
    x = torch.randn(3, proj.in_features, requires_grad=True)
    fused = proj(x)
    assert type(fused.grad_fn).__name__ == "_LoRA4bitBackward"
    module.eval()  # generation and validation: peft's path (bitsandbytes' inference kernel for a few rows)
    unfused = proj(x)
    assert "LoRA4bit" not in type(unfused.grad_fn).__name__
    torch.testing.assert_close(fused, unfused)
    module.train()
    with module.model.disable_adapter():
        torch.testing.assert_close(proj(x), proj.base_layer(x))  # the base alone
        assert not torch.allclose(proj(x), fused)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="int8"), "model.fused_lora: true needs a 4-bit base"),
        (dict(use_dora=True), "cannot fuse an adapter with use_dora"),
    ],
)
def test_an_explicit_fused_lora_it_cannot_apply_is_refused_in_one_sentence(kwargs, message):
    mode = kwargs.pop("mode", "nf4")
    with pytest.raises(QlitError, match=message):
        QLitModule(
            pretrained="qlit-tiny/qwen2",
            quantization=Quantization(mode=mode),
            adapter=LoraConfig(r=8, target_modules="all-linear", **kwargs),
            fused_lora=True,
        )


@pytest.mark.parametrize("option", ["fused_lora", "prepare_kbit"])
def test_an_unknown_value_given_from_python_is_refused_in_one_sentence(option):
    with pytest.raises(QlitError, match=f"model.{option} must be true, false or auto, got 'yes'"):
        QLitModule(quantization=Quantization(mode="nf4"), adapter=LoraConfig(r=8), **{option: "yes"})


def test_auto_leaves_a_dora_adapter_to_peft():
    assert _module("auto", use_dora=True).fused_lora_layers == 0


def test_the_kept_block_scales_are_bitsandbytes_own_and_follow_a_replaced_weight():
    # A double-quantized weight's fp32 block scales are de-quantized once and kept; the weight they give must be
    # bitsandbytes' own de-quantization, and a weight quantized anew (new scales) must not reuse the old ones.
    import bitsandbytes.functional as bnbf

    from qlit.models import fused_lora

    module = _module("auto")
    proj = module.model.base_model.model.model.layers[0].mlp.down_proj
    state = proj.base_layer.weight.quant_state
    assert state.nested  # qlit's default: double quantization
    x = torch.randn(3, proj.in_features)
    proj(x)
    kept = proj.__dict__["_qlit_absmax"][1]
    spec = (state.blocksize, state.quant_type, state.shape)
    weight = fused_lora._dequantize(proj.base_layer.weight, kept, spec, torch.float32)
    torch.testing.assert_close(weight, bnbf.dequantize_4bit(proj.base_layer.weight, state), rtol=0, atol=0)
    # Quantize a different weight into the same layer, its state updated in place (as ``QuantState.to`` does when
    # a weight moves): the next call de-quantizes the new scales.
    packed, new_state = bnbf.quantize_4bit(2 * weight, quant_type=state.quant_type, compress_statistics=True)
    proj.base_layer.weight.data = packed
    state.absmax, state.state2, state.offset = new_state.absmax, new_state.state2, new_state.offset
    torch.testing.assert_close(proj(x), proj.base_layer(x) + proj.lora_B["default"](proj.lora_A["default"](x)) * 2)
    assert proj.__dict__["_qlit_absmax"][0] is new_state.absmax


@pytest.mark.parametrize("checkpointing", [False, True])
def test_q_k_v_and_gate_up_run_as_one_function_each_and_give_peft_results(monkeypatch, checkpointing):
    from qlit.models import fused_lora

    calls = {"group": 0, "single": 0}
    group, single = fused_lora._LoRA4bitGroup.forward, fused_lora._LoRA4bit.forward
    monkeypatch.setattr(
        fused_lora._LoRA4bitGroup,
        "forward",
        staticmethod(lambda *a: calls.__setitem__("group", calls["group"] + 1) or group(*a)),
    )
    monkeypatch.setattr(
        fused_lora._LoRA4bit,
        "forward",
        staticmethod(lambda *a: calls.__setitem__("single", calls["single"] + 1) or single(*a)),
    )
    fused, peft = _module("auto", checkpointing=checkpointing), _module(False, checkpointing=checkpointing)
    logits_f, loss_f, grads_f = _run(fused)
    passes = 2 if checkpointing else 1  # reentrant checkpointing runs each layer twice
    # Two layers: q/k/v and gate/up grouped; o_proj and down_proj alone.
    assert calls == {"group": 2 * 2 * passes, "single": 2 * 2 * passes}
    logits_p, loss_p, grads_p = _run(peft)
    torch.testing.assert_close(logits_f, logits_p, rtol=1e-5, atol=1e-5)
    assert loss_f == pytest.approx(loss_p, rel=1e-6)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == 28
    for name, grad in grads_f.items():
        torch.testing.assert_close(grad, grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_sibling_takes_the_grouped_output_only_for_the_same_unchanged_input():
    module = _module("auto")
    attn = module.model.base_model.model.model.layers[0].self_attn
    q, k = attn.q_proj, attn.k_proj

    def alone(proj, x):  # what peft's LoRA computes
        return proj.base_layer(x) + proj.lora_B["default"](proj.lora_A["default"](x)) * proj.scaling["default"]

    x1, x2 = torch.randn(5, q.in_features), torch.randn(5, q.in_features)
    q(x1)
    out = k(x2)  # another input: computed for it, not handed the output for x1
    torch.testing.assert_close(out, alone(k, x2), rtol=1e-5, atol=1e-5)
    q(x1)
    x1.add_(1.0)  # the same tensor, changed in place after q read it
    torch.testing.assert_close(k(x1), alone(k, x1), rtol=1e-5, atol=1e-5)
    q(x2)
    handed = k(x2)
    assert type(handed.grad_fn).__name__ == "_LoRA4bitGroupBackward"
    torch.testing.assert_close(handed, alone(k, x2), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_layers_with_fused_lora_train_like_eager_ones():
    # Under torch.compile the projections run alone (no state kept across calls inside a graph) and the 4-bit
    # scales are computed in the graph; two steps, the second on the cached graphs.
    eager, compiled = _module("auto"), _module("auto", compile=True)
    for _ in range(2):
        _, loss_e, grads_e = _run(eager)
        _, loss_c, grads_c = _run(compiled)
        assert loss_c == pytest.approx(loss_e, rel=1e-5)
    for name, grad in grads_e.items():
        # fp32, the same sums in the compiler's order: a few elements differ by ~1e-6 absolute.
        assert (grads_c[name] - grad).norm() <= 1e-5 * grad.norm(), name
