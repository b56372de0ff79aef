"""QLitModule on the tiny Qwen2 model: quantized training, adapters that reload, adapter-only checkpoints, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import run_cli, scalars
from peft import LoraConfig

from qlit.data import SST2DataModule
from qlit.errors import QlitError
from qlit.models.quantization import Quantization
from qlit.module import QLitModule

DEMO = "configs/demo.yaml"
# 6 optimizer steps of the demo config, logged every step, validated at the end.
SIX_STEPS = (
    "fit --config configs/demo.yaml --trainer.max_steps 6 --trainer.max_epochs -1 --trainer.val_check_interval 6 "
    "--trainer.log_every_n_steps 1"
).split()


def lora() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


@pytest.fixture(scope="module")
def sst2_batch(tiny_qwen2):
    dm = SST2DataModule(tokenizer="qlit-tiny/qwen2", path="qlit-samples/sst2", batch_size=8, max_length=128)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def build(mode: str, **kwargs) -> QLitModule:
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        quantization=Quantization(mode=mode, compute_dtype="float32"),
        adapter=lora(),
        **kwargs,
    )
    module.configure_model()
    return module


def test_overfitting_one_batch_nf4_lora_halves_the_loss(sst2_batch):
    torch.manual_seed(0)
    module = build("nf4")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    losses = []
    for _ in range(25):
        loss = module(sst2_batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4"])
def test_each_quantization_mode_runs_a_training_step(sst2_batch, mode):
    import bitsandbytes as bnb

    module = build(mode)
    layer = module.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit)
    if mode != "int8":
        assert layer.weight.quant_state.quant_type == mode
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    before = [p.detach().clone() for p in lora_b]
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    loss = module(sst2_batch).loss
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_b, strict=True))


def test_full_fine_tuning_of_a_quantized_base_is_refused():
    with pytest.raises(QlitError, match="nf4"):
        QLitModule(pretrained="qlit-tiny/qwen2", quantization=Quantization(mode="nf4"), adapter=None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "nf5"}, "nf5"), ({"mode": "int8", "double_quant": True}, "double_quant")],
)
def test_invalid_quantization_specs_are_refused(kwargs, message):
    with pytest.raises(QlitError, match=message):
        Quantization(**kwargs)


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    """A short run of the demo config: 6 optimizer steps, checkpoint every 3, validation at the end."""
    tmp = tmp_path_factory.mktemp("demo")
    cli = run_cli(
        tmp, *SIX_STEPS, "--checkpoint.every_n_train_steps", "3", "--checkpoint.save_top_k", "-1",
        "--checkpoint.monitor", "null",
    )  # fmt: skip
    return cli, tmp


def test_saved_adapter_reloads_onto_the_base_with_the_same_logits(trained_demo, sst2_batch):
    from peft import PeftModel

    from qlit.models.loading import load_causal_lm

    cli, _ = trained_demo
    adapter_dir = Path(cli.trainer.log_dir) / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    module = cli.model.eval()
    # The same base: the same NF4 weights loaded through the same from_pretrained path.
    base = load_causal_lm(
        module.model.peft_config["default"].base_model_name_or_path,
        quantization=module.quantization,
        dtype="auto",
        device=torch.device("cpu"),
    )
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    inputs = {k: sst2_batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = module.model(**inputs).logits
        got = reloaded(**inputs).logits
    # Same NF4 weights, same fp32 LoRA weights: equal well within bf16 resolution (2^-8 relative).
    torch.testing.assert_close(got, expected, rtol=2**-8, atol=2**-8)
    # The adapter is not a no-op: the trained model differs from the base.
    with torch.no_grad(), reloaded.disable_adapter():
        assert not torch.allclose(reloaded(**inputs).logits, expected, atol=1e-3)


def test_checkpoints_hold_only_trainable_weights_and_resume(trained_demo):
    cli, tmp = trained_demo
    ckpt_dir = Path(cli.trainer.log_dir) / "checkpoints"
    step3 = next(ckpt_dir.glob("*step=3*.ckpt"))
    state = torch.load(step3, map_location="cpu", weights_only=False)
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == trainable
    assert all("lora_" in k for k in state["state_dict"])
    assert state["optimizer_states"], "optimizer state must be kept for resuming"

    resumed = run_cli(tmp, *SIX_STEPS, "--ckpt_path", str(step3))
    assert resumed.trainer.global_step == 6
    steps = [s for s, _ in scalars(resumed.trainer.log_dir)["train/loss"]]
    assert min(steps) >= 3, f"a resumed run starts after the checkpoint's step, logged {steps}"
    # The resumed run continues the same trajectory as the uninterrupted one (same seed, same data order).
    original = dict(scalars(cli.trainer.log_dir)["train/loss"])
    again = dict(scalars(resumed.trainer.log_dir)["train/loss"])
    for step in sorted(set(original) & set(again)):
        assert again[step] == pytest.approx(original[step], rel=1e-4, abs=1e-5)


def test_the_demo_logs_train_and_validation_metrics(trained_demo):
    cli, _ = trained_demo
    logged = scalars(cli.trainer.log_dir)
    study = (
        "train/loss",
        "val/loss",
        "val/perplexity",
        "val/accuracy",
        # the measurement callbacks the CLI turns on (no CUDA here: resident memory instead of GPU memory)
        "cpu/peak_rss_gib",
        "train/tokens_per_sec",
        "train/padded_tokens_per_sec",
        "train/samples_per_sec",
        "train/step_time_sec",
        "params/trainable",
        "params/total",
        "params/trainable_ratio",
        "params/weight_gib",
        "time/setup_seconds",
        "time/first_step_seconds",
        "time/fit_seconds",
    )
    for tag in study:
        assert tag in logged, f"{tag} missing from {sorted(logged)}"
    assert 0 < logged["params/trainable_ratio"][0][1] < 0.2  # LoRA trains a small share of the weights
    assert logged["train/tokens_per_sec"][-1][1] > 0
    losses = [v for _, v in logged["train/loss"]]
    assert losses[-1] < losses[0]
    assert 0.0 <= logged["val/accuracy"][-1][1] <= 1.0


def test_bf16_compute_keeps_frozen_weights_in_bf16_and_trains_like_the_fp32_recipe(sst2_batch):
    """``prepare_kbit: auto`` with a bf16 compute dtype keeps the frozen norms and embeddings as loaded (no fp32
    copies, no casts around each layer); the loss and the adapter's gradient stay those of peft's fp32 recipe within
    what bf16's 8-bit mantissa allows on the residual stream."""

    def built(prepare_kbit):
        torch.manual_seed(0)  # the same LoRA initialisation for both
        module = QLitModule(
            pretrained="qlit-tiny/qwen2",
            quantization=Quantization(mode="nf4", compute_dtype="bfloat16"),
            adapter=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
            prepare_kbit=prepare_kbit,
        )
        module.configure_model()
        return module

    fast, recipe = built("auto"), built(True)  # auto is the default, True the QLoRA recipe
    frozen = {name: p.dtype for name, p in fast.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert set(frozen.values()) == {torch.bfloat16}, frozen  # embeddings and norms (4-bit weights are uint8)
    assert {p.dtype for p in fast.parameters() if p.requires_grad} == {torch.float32}  # the adapter's master weights
    assert recipe.model.get_input_embeddings().weight.dtype == torch.float32

    results = []
    for module in (fast, recipe):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(sst2_batch).loss
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad])
        results.append((loss.item(), grad))
    (fast_loss, fast_grad), (recipe_loss, recipe_grad) = results
    # Measured: 0.06 % apart in loss, cosine 0.9992, norms 0.15 % apart; bf16 rounds at 2**-8 = 0.4 % per value.
    assert fast_loss == pytest.approx(recipe_loss, rel=5e-3)
    assert torch.nn.functional.cosine_similarity(fast_grad, recipe_grad, dim=0) > 0.995
    assert fast_grad.norm() == pytest.approx(recipe_grad.norm().item(), rel=0.01)


def test_prepare_kbit_auto_makes_fp32_copies_for_a_float16_compute_dtype_only():
    def resolved(**quantization):
        module = QLitModule(quantization=Quantization(**quantization), adapter=lora(), prepare_kbit="auto")
        return module.upcasts_frozen_weights

    assert not QLitModule(quantization=Quantization(mode="nf4"), adapter=lora()).upcasts_frozen_weights  # auto
    assert QLitModule(quantization=Quantization(mode="nf4"), adapter=lora(), prepare_kbit=True).upcasts_frozen_weights
    assert resolved(mode="nf4", compute_dtype="float16")
    assert not resolved(mode="nf4", compute_dtype="bfloat16")
    assert not resolved(mode="int8")
    assert not resolved(mode="none")
