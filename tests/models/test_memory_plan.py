"""The memory budget: offloaded checkpointing is exact, the plan follows the budget, one line says it."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import run_cli
from peft import LoraConfig

from qlit.data import SST2DataModule
from qlit.errors import QlitError
from qlit.models import layers
from qlit.models.memory_plan import GIB, LayerCosts, MemoryPlan, budget_bytes, measure, plan
from qlit.models.quantization import Quantization
from qlit.module import QLitModule

FIT = ("fit", "--config", "configs/demo.yaml", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")


@pytest.fixture(scope="module")
def batch(tiny_qwen2):
    dm = SST2DataModule(tokenizer="qlit-tiny/qwen2", path="qlit-samples/sst2", batch_size=8, max_length=128)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _loss_and_grads(mode: str, checkpointing, batch) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        quantization=Quantization(mode=mode, compute_dtype="float32"),
        adapter=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"),
        gradient_checkpointing=checkpointing,
        dtype="float32",
    )
    module.configure_model()
    module.train()
    torch.manual_seed(1)  # the same dropout masks in every variant, forward and recomputation alike
    loss = module(batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_offloaded_layers_give_recomputations_loss_and_gradients(mode, batch):
    plain_loss, plain = _loss_and_grads(mode, True, batch)
    off_loss, off = _loss_and_grads(mode, "offload", batch)
    kept_loss, kept = _loss_and_grads(mode, False, batch)
    assert off_loss == pytest.approx(plain_loss, abs=1e-6) and kept_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == off.keys() and len(plain) > 0
    for name in plain:
        if "lora_B" in name:  # B starts at zero, so only B has a gradient on the first step: every layer's does
            assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(off[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(kept[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_plan_keeps_what_the_budget_pays_for_and_offloads_last():
    costs = LayerCosts(kept_fixed=0, kept_per_token=1000, input_per_token=100, work_fixed=0, work_per_token=500)
    static, tokens, n = 10_000_000, 1000, 10
    everything = static + tokens * (10 * 1000 + 500)
    assert plan(everything, static, tokens, n, costs) == MemoryPlan(everything, n, 10, 0, 0, everything)
    # One layer fewer kept frees its activations but its input stays, and one layer is made again at the peak.
    four = plan(static + tokens * (4 * 1000 + 6 * 100 + 500 + 1000), static, tokens, n, costs)
    assert (four.kept, four.recomputed, four.offloaded) == (4, 6, 0) and four.fits
    low = plan(static + tokens * (3 * 100 + 1500), static, tokens, n, costs)
    assert (low.kept, low.recomputed, low.offloaded) == (0, 3, 7) and low.fits
    short = plan(static, static, tokens, n, costs)
    assert (short.kept, short.offloaded) == (0, 10) and not short.fits
    assert "below what the smallest plan needs" in short.line()


def test_budget_values_are_checked_when_the_config_is_read():
    assert budget_bytes(14, torch.device("cpu")) == 14 * GIB
    for bad, words in [(0, "above 0"), ("lots", "number of GiB"), ("150%", "at most 100%"), (True, "number")]:
        with pytest.raises(QlitError, match=words):
            QLitModule(memory_budget=bad)
    with pytest.raises(QlitError, match="share of a GPU"):
        budget_bytes("50%", torch.device("cpu"))
    with pytest.raises(QlitError, match="gradient_checkpointing to auto"):
        QLitModule(memory_budget=4, gradient_checkpointing=True)


def _plan_of(tmp_path, budget: str, caplog) -> QLitModule:
    caplog.set_level(logging.INFO)
    cli = run_cli(tmp_path, *FIT, "--model.init_args.memory_budget", budget)
    return cli.model


def test_a_fit_plans_its_layers_to_the_budget_and_says_so(tmp_path, caplog):
    roomy = _plan_of(tmp_path / "roomy", "4", caplog)
    n = len(layers.decoder_layers(roomy.model))
    assert roomy.memory_plan.kept == n and roomy.checkpointed_layers == 0
    assert f"Memory plan for 4 GiB: {n} of {n} layers kept, 0 recomputed, activations of 0 offloaded" in caplog.text
    caplog.clear()
    # What this model holds whatever the plan, plus a little: the smallest plans, down to offloading.
    tight = _plan_of(tmp_path / "tight", "0.0005", caplog)
    plan_ = tight.memory_plan
    assert plan_.kept < n and plan_.offloaded + plan_.recomputed + plan_.kept == n
    flags = [bool(layer.gradient_checkpointing) for layer in layers.decoder_layers(tight.model)]
    assert flags == [True] * (n - plan_.kept) + [False] * plan_.kept
    assert f"Memory plan for 0.0005 GiB: {plan_.kept} of {n} layers kept" in caplog.text
    # The estimate grows with what is kept: the roomy plan expects more than the tight one.
    assert roomy.memory_plan.estimate > plan_.estimate

    # The costs behind the plan are measured on the model: a layer keeps far more than its fp32 input.
    costs = measure(roomy.model, layers.decoder_layers(roomy.model), roomy._probe_loss, lengths=(32, 96))
    assert costs.input_per_token == pytest.approx(4 * roomy.model.config.hidden_size)
    assert costs.kept_per_token > 4 * costs.input_per_token
    assert all(p.grad is None for p in roomy.model.parameters())  # the probe leaves no gradient behind
