"""The real CUDA path of bitsandbytes under qlit: QLoRA training, adapter reload and resume on one GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli, scalars

from qlit.models import kernels

pytestmark = pytest.mark.gpu

GPU = [
    "--config",
    str(ROOT / "configs/demo.yaml"),
    "--trainer.accelerator",
    "gpu",
    "--trainer.precision",
    "bf16-mixed",
    "--model.init_args.quantization.compute_dtype",
    "bfloat16",
    "--model.init_args.gradient_checkpointing",
    "true",
    "--model.init_args.optimizer",
    "bitsandbytes.optim.PagedAdamW8bit",
    "--model.init_args.optimizer.lr",
    "0.005",
    "--trainer.max_epochs",
    "-1",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.limit_val_batches",
    "2",
]


def test_qlora_trains_on_the_gpu_and_its_adapter_reloads(tmp_path):
    from peft import PeftModel, prepare_model_for_kbit_training

    from qlit.models.loading import load_causal_lm

    cli = run_cli(tmp_path, "fit", *GPU, "--trainer.max_steps", "30", "--trainer.val_check_interval", "10")
    losses = [v for _, v in sorted(scalars(cli.trainer.log_dir)["train/loss"])]
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert scalars(cli.trainer.log_dir)["gpu/peak_allocated_gib"][0][1] > 0

    module = cli.model.eval().to("cuda")  # Lightning hands the module back on the CPU after fit
    base = load_causal_lm(
        module.model.peft_config["default"].base_model_name_or_path,
        quantization=module.quantization,
        dtype="auto",
        device=torch.device("cuda"),
    )
    # The same base as in training: NF4 weights, and the norms and embeddings as loaded (bf16) unless the run made
    # the k-bit preparation's fp32 copies.
    if module.upcasts_frozen_weights:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    adapter = str(Path(cli.trainer.log_dir) / "adapter")
    ids = torch.randint(0, 500, (2, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        trained = module.model(input_ids=ids).logits
        # transformers' own modules, as anyone loading the adapter gets them: the same model, up to bf16 rounding
        # where training ran Liger's kernels (they round in other places: ~1 ulp of the logits).
        plain = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        drift = (plain - trained).abs().mean().item()
        assert drift < 0.02 * trained.std().item(), (drift, trained.std().item(), module.kernels_applied)
        if module.kernels_applied != "none":  # and with the kernels training ran: the same logits
            base = load_causal_lm(
                module.model.peft_config["default"].base_model_name_or_path,
                quantization=module.quantization,
                dtype="auto",
                device=torch.device("cuda"),
            )
            assert kernels.apply_kernels(base, module.kernels_applied, torch.device("cuda")) == module.kernels_applied
            if module.upcasts_frozen_weights:
                base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
            plain = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        torch.testing.assert_close(plain, trained, rtol=2**-7, atol=2**-7)


def test_resume_on_the_gpu_continues_from_the_checkpoint(tmp_path):
    first = run_cli(tmp_path, "fit", *GPU, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4")
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert all("lora_" in k for k in torch.load(last, map_location="cpu", weights_only=True)["state_dict"])
    resumed = run_cli(
        tmp_path, "fit", *GPU, "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--ckpt_path", str(last)
    )
    assert resumed.trainer.global_step == 8
    assert sorted(s for s, _ in scalars(resumed.trainer.log_dir)["train/loss"]) == [4, 5, 6, 7]


def test_fast_paths_keep_the_loss_curve(tmp_path):
    """Every optimisation against the unoptimised run, on the same packed batches for 20 steps: packed rows through
    the variable-length kernel, Liger's fused kernels (where installed), bf16 frozen norms and embeddings
    (``prepare_kbit: auto``) and the fused LoRA forward — all defaults — then each default alone turned back, and
    selective checkpointing with compiled layers, and with the layers replayed as CUDA graphs. The unoptimised run:
    SDPA with transformers' per-sample mask, plain modules, peft's fp32 copies and peft's LoRA forward."""
    common = ["fit", *GPU, "--trainer.max_steps", "20", "--trainer.limit_val_batches", "0"]
    m = "--model.init_args."
    curves, paths = {}, {}
    for name, extra in {
        "plain": [m + "attn_implementation", "sdpa", m + "kernels", "none", m + "prepare_kbit", "true",
                  m + "fused_lora", "false"],
        "fast": [],
        "fp32_frozen": [m + "prepare_kbit", "true"],
        "peft_lora": [m + "fused_lora", "false"],
        "compiled": [m + "gradient_checkpointing", "auto", m + "compile", "true"],
        "graphs": [m + "gradient_checkpointing", "auto", m + "cuda_graphs", "true"],
    }.items():  # fmt: skip
        cli = run_cli(tmp_path / name, *common, "--data.init_args.packing", "true", *extra)
        curves[name] = [v for _, v in sorted(scalars(cli.trainer.log_dir)["train/loss"])]
        module = cli.model
        paths[name] = (module.model.config._attn_implementation, module.kernels_applied, module.fused_lora_layers > 0)
        if name == "graphs":  # every layer kept (auto), so every one replayed as a graph at every step
            assert module.graphs is not None and len(module.graphs.layers) == module.model.config.num_hidden_layers
            assert module.graphs.replays == 20 * len(module.graphs.layers), module.graphs.replays
            assert module.graph_held_bytes > 0  # the activations kept between replays, counted as allocated
        elif name == "compiled":
            assert module.graphs is None  # compiled layers are never graphed
        if name == "fast":
            frozen = {p.dtype for p in module.parameters() if not p.requires_grad and p.dtype.is_floating_point}
            assert frozen == {torch.bfloat16}, frozen
    assert paths["fast"][:2] == ("qlit_varlen", "liger" if kernels.liger_installed() else "none"), paths
    assert paths["plain"] == ("sdpa", "none", False), paths
    assert paths["fast"][2] and not paths["peft_lora"][2], paths
    assert paths["compiled"] == paths["fp32_frozen"] == paths["fast"] == paths["graphs"], paths
    for name in ("fast", "fp32_frozen", "peft_lora", "compiled", "graphs"):
        assert len(curves["plain"]) == len(curves[name]) == 20
        # bf16 autocast: the kernels round differently; the curves must agree step for step, not bit for bit.
        worst = max(abs(a - b) for a, b in zip(curves["plain"], curves[name], strict=True))
        assert worst < 0.05 * max(curves["plain"]), (name, worst, curves)
        assert curves[name][-1] < 0.5 * curves[name][0], curves  # and it still learns


def test_offloaded_and_planned_layers_keep_the_loss_curve(tmp_path):
    """Recomputation with the layers' inputs in pinned host memory (``gradient_checkpointing: offload``) and a plan
    to a small budget follow plain recomputation's curve on the GPU, and the plan's estimate bounds its peak."""
    common = ["fit", *GPU, "--trainer.max_steps", "12", "--trainer.limit_val_batches", "0"]
    m = "--model.init_args."
    curves, peaks = {}, {}
    for name, extra in {
        "recomputed": [],
        "offloaded": [m + "gradient_checkpointing", "offload"],
        "planned": [m + "gradient_checkpointing", "auto", m + "memory_budget", "0.05"],
    }.items():
        cli = run_cli(tmp_path / name, *common, *extra)
        curves[name] = [v for _, v in sorted(scalars(cli.trainer.log_dir)["train/loss"])]
        peaks[name] = scalars(cli.trainer.log_dir)["gpu/peak_allocated_gib"][-1][1]
        if name == "offloaded":
            assert cli.model.offloader.held_bytes == 0  # every input came back
        if name == "planned":
            plan = cli.model.memory_plan
            assert plan is not None and plan.kept + plan.recomputed + plan.offloaded == 2
    for name in ("offloaded", "planned"):
        worst = max(abs(a - b) for a, b in zip(curves["recomputed"], curves[name], strict=True))
        assert worst < 0.02 * max(curves["recomputed"]), (name, worst, curves)
