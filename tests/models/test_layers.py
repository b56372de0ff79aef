"""Selective activation checkpointing and compiled decoder layers: same numbers, less recompute or fewer launches."""

from __future__ import annotations

import pytest
import torch

from qlit.errors import QlitError
from qlit.models import layers
from qlit.models.shapes import QWEN25


def _tiny_model(checkpointing: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from qlit.models.tiny import resolve_tiny

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_tiny("qlit-tiny/llama"), dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _loss_and_grads(model) -> tuple[float, dict[str, torch.Tensor]]:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_the_first_layers_only_keeps_the_rest_and_the_numbers() -> None:
    plain = _tiny_model(checkpointing=False)
    partial = _tiny_model(checkpointing=True)
    n_layers = len(layers.decoder_layers(partial))
    assert n_layers >= 2
    assert layers.checkpoint_first(partial, 1) == 1
    flags = [layer.gradient_checkpointing for layer in layers.decoder_layers(partial)]
    assert flags == [True] + [False] * (n_layers - 1)

    # Recomputing a layer in the backward pass changes no number (fp32): loss and every gradient equal.
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(partial)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-5, atol=1e-6, msg=name)

    # A layer whose checkpointing was never enabled is not turned on by a larger number.
    assert layers.checkpoint_first(plain, 5) == 0


@pytest.mark.parametrize(
    ("name", "fp32_stream", "graphed", "checkpointed", "total"),
    [
        ("qwen2.5-0.5b", False, False, 0, 24),
        ("qwen2.5-1.5b", False, False, 5, 28),
        ("qwen2.5-7b", False, False, 18, 28),
        ("qwen2.5-0.5b", True, False, 0, 24),
        ("qwen2.5-7b", True, False, 22, 28),
        ("qwen2.5-0.5b", False, True, 0, 24),
        ("qwen2.5-1.5b", False, True, 8, 28),
        ("qwen2.5-7b", False, True, 19, 28),
    ],
)
def test_auto_spends_what_the_fused_loss_saves(
    name: str, fp32_stream: bool, graphed: bool, checkpointed: int, total: int
) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25[name]))
    # Kept layers' activations (7.5 B, or 12 B with an fp32 residual stream, × (hidden + intermediate) per token
    # each, and three bf16 (tokens × hidden) buffers more for a graphed layer) fit in the unfused logits' 12 B ×
    # vocabulary.
    got = layers.auto_checkpointed(model, fused_loss=True, fp32_stream=fp32_stream, graphed=graphed)
    assert got == checkpointed
    config = QWEN25[name]
    kept = total - checkpointed
    per_token = layers.ACTIVATION_BYTES_FP32_STREAM if fp32_stream else layers.ACTIVATION_BYTES
    per_layer = per_token * (config["hidden_size"] + config["intermediate_size"])
    per_layer += graphed * layers.GRAPH_BUFFERS * 2 * config["hidden_size"]
    assert kept * per_layer <= layers.LOGIT_BYTES * config["vocab_size"]
    assert kept == total or layers.LOGIT_BYTES * config["vocab_size"] < (kept + 1) * per_layer
    assert layers.auto_checkpointed(model, fused_loss=False) == total  # no fused loss: nothing to spend


def test_auto_checkpointing_on_the_module_without_fused_kernels_recomputes_every_layer() -> None:
    from qlit.module import QLitModule

    module = QLitModule(pretrained="qlit-tiny/qwen2", gradient_checkpointing="auto", kernels="none")
    module.configure_model()
    assert module.checkpointed_layers == len(layers.decoder_layers(module.model)) > 0


def test_a_negative_layer_count_is_one_sentence() -> None:
    from qlit.module import QLitModule

    with pytest.raises(QlitError, match=r"model.gradient_checkpointing .*-2"):
        QLitModule(pretrained="qlit-tiny/qwen2", gradient_checkpointing=-2)


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones() -> None:
    eager = _tiny_model(checkpointing=False)
    compiled = _tiny_model(checkpointing=False)
    assert layers.compile_layers(compiled) == len(layers.decoder_layers(compiled))
    for _ in range(2):  # the second call runs the cached graphs
        loss_a, grads_a = _loss_and_grads(eager)
        loss_b, grads_b = _loss_and_grads(compiled)
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
        for name, grad in grads_a.items():
            torch.testing.assert_close(grad, grads_b[name], rtol=1e-4, atol=1e-5, msg=name)
