"""BitNet b1.58 as a quantization mode of QLitModule: QAT, QLoRA + BitNet, packed save and reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli, scalars

from qlit.models.bitnet import BitLinear, PackedBitLinear, load_packed

SHORT = [
    "--trainer.max_steps",
    "12",
    "--trainer.max_epochs",
    "-1",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.val_check_interval",
    "12",
]


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    return run_cli(tmp_path_factory.mktemp("bitnet"), "fit", "--config", str(ROOT / "configs/demo_bitnet.yaml"), *SHORT)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    return run_cli(
        tmp_path_factory.mktemp("qlora_bitnet"), "fit", "--config", str(ROOT / "configs/demo_qlora_bitnet.yaml"), *SHORT
    )


@pytest.mark.parametrize("run", ["qat_run", "qlora_run"])
def test_bitnet_demos_train_with_falling_loss(run, request):
    cli = request.getfixturevalue(run)
    losses = [v for _, v in sorted(scalars(cli.trainer.log_dir)["train/loss"])]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_qat_trains_latent_weights_of_every_projection(qat_run):
    model = qat_run.model.model
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 decoder layers
    assert all(m.weight.requires_grad for m in layers)
    assert not any(isinstance(m, PackedBitLinear) for m in model.modules())


def test_qlora_bitnet_trains_only_lora_over_a_packed_base(qlora_run):
    model = qlora_run.model.model
    packed = [m for m in model.modules() if isinstance(m, PackedBitLinear)]
    assert len(packed) == 14
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # peft wrapped every packed projection with a LoRA layer.
    assert sum(1 for n, _ in model.named_modules() if n.endswith("q_proj.base_layer")) == 2
    assert (Path(qlora_run.trainer.log_dir) / "adapter" / "adapter_model.safetensors").is_file()


def test_qat_model_is_saved_packed_and_reloads_with_the_same_logits(qat_run):
    directory = Path(qat_run.trainer.log_dir) / "bitnet"
    reloaded = load_packed(directory)
    trained = qat_run.model.model.eval()
    ids = torch.randint(0, trained.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    # The projections are stored at 2 bits per weight (1/16 of their fp32 latents); the rest stays fp32.
    latent = {id(m.weight) for m in trained.modules() if isinstance(m, BitLinear)}
    latent_bytes = sum(p.numel() * 4 for p in trained.parameters() if id(p) in latent)
    other_bytes = sum(p.numel() * 4 for p in trained.parameters() if id(p) not in latent)
    size = (directory / "bitnet_model.safetensors").stat().st_size
    assert other_bytes < size < other_bytes + latent_bytes / 8 + 16_384


def test_memory_callback_reports_the_packed_base_at_most_a_sixth_of_bf16(qlora_run):
    logged = scalars(qlora_run.trainer.log_dir)
    packed = logged["params/bitnet_weight_gib"][0][1]
    bf16 = logged["params/bitnet_bf16_gib"][0][1]
    assert 0 < packed <= bf16 / 6, (packed, bf16)
