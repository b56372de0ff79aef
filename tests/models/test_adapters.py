"""Any quantization × any peft method on the tiny models: each supported pair trains, each refused pair fails early.

``SUPPORTED`` is the README's support matrix. ``check_adapter`` must accept exactly those pairs, and peft must still
fail on the pairs it refuses, so a peft or bitsandbytes upgrade that fixes one shows up here as a test to update.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from helpers import ROOT, run_cli, run_main, scalars

from qlit.data import SST2DataModule
from qlit.errors import QlitError
from qlit.models.adapters import check_adapter
from qlit.models.quantization import Quantization
from qlit.module import QLitModule

MODES = ("none", "int8", "nf4", "fp4", "bitnet")
CAUSAL = {"task_type": "CAUSAL_LM"}
ADAPTERS: dict[str, Callable[[], peft.PeftConfig]] = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **CAUSAL),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **CAUSAL),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, **CAUSAL),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, **CAUSAL),
    "ia3": lambda: peft.IA3Config(**CAUSAL),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, **CAUSAL),
    "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, **CAUSAL),
    "prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=4, **CAUSAL),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, **CAUSAL),
    "p_tuning": lambda: peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32, **CAUSAL),
}
PROMPT_LEARNING = {"prompt_tuning", "prefix_tuning", "p_tuning"}
# (method, mode) pairs that fail on CPU with peft 0.21.2 + bitsandbytes 0.50.2; their backends (models/quant) say why.
REFUSED = {("dora", "int8"), ("dora", "bitnet")} | {(m, q) for m in ("loha", "lokr") for q in ("nf4", "fp4", "bitnet")}
SUPPORTED = [(m, q) for m in ADAPTERS for q in MODES if (m, q) not in REFUSED]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batches() -> Callable[[str], dict]:
    """A small SST-2 training batch tokenized for ``qlit-tiny/<arch>`` (built once per architecture)."""
    cache: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in cache:
            dm = SST2DataModule(tokenizer=f"qlit-tiny/{arch}", path="qlit-samples/sst2", batch_size=4, max_length=64)
            dm.setup("fit")
            cache[arch] = next(iter(dm.train_dataloader()))
        return cache[arch]

    return get


def build(adapter: peft.PeftConfig | None, mode: str = "nf4", arch: str = "qwen2", **kwargs) -> QLitModule:
    module = QLitModule(
        pretrained=f"qlit-tiny/{arch}",
        quantization=Quantization(mode=mode, compute_dtype="float32"),
        adapter=adapter,
        **kwargs,
    )
    module.configure_model()
    return module.train()


def train(module: QLitModule, batch: dict, steps: int = 2, optimizer: type = torch.optim.AdamW, lr: float = 1e-2):
    """``steps`` optimizer steps on one batch; the losses, and which parameters changed (trainable, frozen)."""
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    opt = optimizer([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = module(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    now = dict(module.named_parameters())
    changed = {n for n, before in {**trainable, **frozen}.items() if not torch.equal(before, now[n].detach())}
    return losses, changed & trainable.keys(), changed & frozen.keys(), opt


# ----- the support matrix --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "mode"), SUPPORTED, ids=[f"{m}-{q}" for m, q in SUPPORTED])
def test_every_supported_pair_trains_its_adapter_and_only_its_adapter(batches, method, mode):
    torch.manual_seed(0)
    module = build(ADAPTERS[method](), mode)
    losses, trained, frozen_changed, _ = train(module, batches("qwen2"))
    assert all(math.isfinite(x) for x in losses), losses
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    # Two steps: the second reaches factors that start at zero gradient (LoRA's A behind a zero B, AdaLoRA's E).
    assert trained == trainable, sorted(trainable - trained)
    assert not frozen_changed, sorted(frozen_changed)
    if method in PROMPT_LEARNING:  # only the virtual tokens (and P-tuning's encoder) train
        assert all(".prompt_encoder." in n for n in trainable), sorted(trainable)


@pytest.fixture
def cpu_only(monkeypatch):
    """Train where there is no GPU: the device the int8 DoRA refusal depends on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(("method", "mode"), SUPPORTED)
def test_check_adapter_accepts_every_supported_pair(cpu_only, method, mode):
    check_adapter(ADAPTERS[method](), Quantization(mode=mode))


@pytest.mark.parametrize(
    ("method", "mode", "message"),
    [
        ("dora", "int8", "DoRA.*int8.*CPU"),
        ("loha", "nf4", "LoHaConfig.*nf4.*packed.*int8 or none"),
        ("loha", "fp4", "LoHaConfig.*fp4"),
        ("lokr", "nf4", "LoKrConfig.*nf4.*packed.*int8 or none"),
        ("lokr", "fp4", "LoKrConfig.*fp4"),
        ("loha", "bitnet", "LoHaConfig.*bitnet.*packed"),
        ("lokr", "bitnet", "LoKrConfig.*bitnet.*packed"),
        ("dora", "bitnet", "DoRA.*bitnet.*use_dora to false"),
    ],
)
def test_check_adapter_refuses_the_pairs_peft_cannot_train(cpu_only, method, mode, message):
    assert (method, mode) in REFUSED
    with pytest.raises(QlitError, match=message):
        check_adapter(ADAPTERS[method](), Quantization(mode=mode))


@pytest.mark.parametrize(("method", "mode"), sorted(REFUSED))
def test_refused_pairs_still_fail_in_peft(batches, monkeypatch, method, mode):
    """Without qlit's check peft builds the model and then fails in training: the refusal is still needed."""
    monkeypatch.setattr("qlit.module.check_adapter", lambda *args, **kwargs: None)
    # LoHa/LoKr break on the packed weight's shape, DoRA on int8 on the 8-bit scales it lost in the first step,
    # DoRA on bitnet on the norm of a packed buffer.
    with pytest.raises((RuntimeError, AttributeError, IndexError), match="NoneType|shape|size of tensor|index"):
        train(build(ADAPTERS[method](), mode), batches("qwen2"))


def test_dora_on_int8_is_refused_only_on_cpu(monkeypatch):
    # The lost 8-bit scales come from a CPU-only branch of peft's de-quantization; on CUDA peft keeps them.
    # At config time the device is not known: the GPU where there is one, else the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_adapter(ADAPTERS["dora"](), Quantization(mode="int8"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QlitError, match="CPU"):
        check_adapter(ADAPTERS["dora"](), Quantization(mode="int8"))


@pytest.mark.parametrize(
    ("adapter", "kwargs", "message"),
    [
        (
            lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, **CAUSAL),
            {"gradient_checkpointing": True},
            "gradient checkpointing",
        ),
        (lambda: peft.PromptTuningConfig(num_virtual_tokens=4), {}, "task_type: CAUSAL_LM"),
        (lambda: peft.LoraConfig(task_type="SEQ_CLS"), {}, "'SEQ_CLS'.*CAUSAL_LM"),
    ],
    ids=["prefix-with-checkpointing", "prompt-without-task-type", "lora-for-classification"],
)
def test_check_adapter_refuses_settings_peft_would_fail_on_later(adapter, kwargs, message):
    with pytest.raises(QlitError, match=message):
        check_adapter(adapter(), Quantization(mode="nf4"), **kwargs)


def test_lora_without_task_type_is_accepted():
    check_adapter(peft.LoraConfig(), Quantization(mode="nf4"))


def test_the_module_refuses_a_refused_pair_when_built_before_any_weight_loads(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("weights were loaded before the adapter was checked")

    monkeypatch.setattr("qlit.module.load_causal_lm", load)
    with pytest.raises(QlitError, match="LoHaConfig cannot train on a nf4 base") as err:
        QLitModule(pretrained="qlit-tiny/qwen2", quantization=Quantization(mode="nf4"), adapter=ADAPTERS["loha"]())
    assert "\n" not in str(err.value)


def test_the_module_refuses_prefix_tuning_with_gradient_checkpointing_when_built():
    with pytest.raises(QlitError, match="gradient checkpointing"):
        QLitModule(adapter=ADAPTERS["prefix_tuning"](), gradient_checkpointing=True)


def test_the_cli_refuses_a_refused_pair_in_one_sentence(capsys):
    code = run_main(
        "fit", "--config", str(ROOT / "configs/demo_peft_loha.yaml"), "--model.init_args.quantization.mode", "nf4"
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlit: error:")]
    assert code == 1
    assert len(errors) == 1 and "LoHaConfig cannot train on a nf4 base" in errors[0], errors


# ----- target modules and architectures ------------------------------------------------------------------------------
LLAMA_LIKE_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TARGETS = {
    # target_modules None: peft's per-model-type default (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
    ("qwen2", None): {"q_proj", "v_proj"},
    ("llama", None): {"q_proj", "v_proj"},
    ("gpt2", None): {"c_attn"},
    # all-linear: every linear layer but the output head.
    ("qwen2", "all-linear"): LLAMA_LIKE_LINEAR,
    ("llama", "all-linear"): LLAMA_LIKE_LINEAR,
    ("gpt2", "all-linear"): {"c_attn", "c_proj", "c_fc"},
}


@pytest.mark.parametrize(("arch", "target"), list(TARGETS), ids=[f"{a}-{t or 'default'}" for a, t in TARGETS])
def test_nf4_lora_targets_the_architectures_layers_and_trains(batches, arch, target):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    module = build(peft.LoraConfig(r=4, lora_alpha=8, target_modules=target, **CAUSAL), "nf4", arch)
    targeted = module.model.base_model.targeted_module_names
    assert {name.rsplit(".", 1)[-1] for name in targeted} == TARGETS[arch, target]
    for name in targeted:  # the base of each adapter is a 4-bit layer (GPT-2's Conv1D included)
        assert isinstance(module.model.base_model.model.get_submodule(name).get_base_layer(), bnb.nn.Linear4bit), name
    losses, trained, frozen_changed, _ = train(module, batches(arch))
    assert all(math.isfinite(x) for x in losses)
    assert trained and not frozen_changed


@pytest.mark.parametrize(("mode", "tolerance"), [("nf4", 0.2), ("fp4", 0.25), ("int8", 0.05)])
def test_bitsandbytes_quantizes_gpt2_conv1d_layers_with_their_transposed_layout(mode, tolerance):
    """GPT-2's Conv1D stores (in, out); bitsandbytes' layers hold (out, in): the loader must transpose, not reshape."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    from qlit.models.loading import load_causal_lm

    reference = load_causal_lm("qlit-tiny/gpt2", quantization=Quantization(), dtype="float32", device=CPU)
    quantized = load_causal_lm(
        "qlit-tiny/gpt2", quantization=Quantization(mode=mode, compute_dtype="float32"), dtype="float32", device=CPU
    )
    conv1d = {n: m for n, m in reference.named_modules() if isinstance(m, Conv1D)}
    assert len(conv1d) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of the 2 blocks
    torch.manual_seed(0)
    for name, conv in conv1d.items():
        layer = quantized.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit if mode != "int8" else bnb.nn.Linear8bitLt), name
        assert (layer.in_features, layer.out_features) == tuple(conv.weight.shape), name
        x = torch.randn(8, layer.in_features)
        with torch.no_grad():
            want, got = conv(x), layer(x).float()
        # A weight reshaped instead of transposed gives an unrelated output (relative error ~1.4).
        assert (got - want).norm() / want.norm() < tolerance, name


def test_lora_on_unquantized_gpt2_switches_to_fan_in_fan_out_and_merges_exactly(batches):
    """peft sets fan_in_fan_out for Conv1D (weights stored (in, out)); a merge must then give the same logits."""
    torch.manual_seed(0)
    adapter = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], **CAUSAL)
    assert adapter.fan_in_fan_out is False
    module = build(adapter, "none", "gpt2", dtype="float32")
    assert module.model.peft_config["default"].fan_in_fan_out is True
    assert module.model.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out is True
    losses, trained, frozen_changed, _ = train(module, batches("gpt2"))
    assert all(math.isfinite(x) for x in losses) and trained and not frozen_changed
    inputs = {k: batches("gpt2")[k] for k in ("input_ids", "attention_mask")}
    model = module.model.eval()
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merged = model.merge_and_unload()(**inputs).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_lora_on_quantized_gpt2_keeps_the_linear_layout(batches):
    # bitsandbytes replaced Conv1D by Linear4bit, whose weight is (out, in): no fan_in_fan_out there.
    module = build(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], **CAUSAL), "nf4", "gpt2")
    assert module.model.peft_config["default"].fan_in_fan_out is False
    assert module.model.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out is False


# ----- full fine-tuning ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "optimizer"),
    [("float32", torch.optim.AdamW), ("bfloat16", torch.optim.AdamW), ("float32", "AdamW8bit")],
    ids=["fp32", "bf16", "fp32-adamw8bit"],
)
def test_full_fine_tuning_trains_every_weight_and_lowers_the_loss(batches, dtype, optimizer):
    import bitsandbytes as bnb

    if optimizer == "AdamW8bit":
        optimizer = bnb.optim.AdamW8bit
    torch.manual_seed(0)
    module = build(None, "none", dtype=dtype)
    params = list(module.parameters())
    assert all(p.requires_grad and p.dtype == getattr(torch, dtype) for p in params)
    losses, trained, _, opt = train(module, batches("qwen2"), steps=5, optimizer=optimizer, lr=1e-3)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    every = {n for n, _ in module.named_parameters()}
    if dtype == "bfloat16":
        # bf16 rounds an update below ~1/256 of a weight away: RMSNorm scales (1.0) do not move at lr 1e-3.
        every = {n for n, p in module.named_parameters() if p.ndim > 1}
    assert every <= trained, sorted(every - trained)
    if optimizer is bnb.optim.AdamW8bit:  # both Adam moments of the embedding are kept in 8 bits
        state = opt.state[module.model.model.embed_tokens.weight]
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4"])
def test_full_fine_tuning_of_a_quantized_base_is_refused(mode):
    with pytest.raises(QlitError, match=f"'{mode}'.*adapter"):
        QLitModule(pretrained="qlit-tiny/qwen2", quantization=Quantization(mode=mode), adapter=None)


# ----- every new config through the CLI -----------------------------------------------------------------------------
CONFIGS = sorted(
    [
        *ROOT.glob("configs/demo_peft_*.yaml"),
        *ROOT.glob("configs/demo_full_*.yaml"),
        ROOT / "configs/demo_lora_int8.yaml",
    ]
)
PEFT_TYPES = {
    "lora": "LORA", "dora": "LORA", "rslora": "LORA", "adalora": "ADALORA", "ia3": "IA3", "loha": "LOHA",
    "lokr": "LOKR", "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING",
}  # fmt: skip


def test_there_is_a_config_per_method_and_per_full_fine_tuning_variant():
    names = {p.stem for p in CONFIGS}
    assert {f"demo_peft_{m}" for m in PEFT_TYPES} <= names
    assert {"demo_full_fp32", "demo_full_bf16", "demo_full_adamw8bit", "demo_lora_int8"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_new_config_trains_through_the_cli(tmp_path, config):
    cli = run_cli(
        tmp_path, "fit", "--config", str(config), "--trainer.max_steps", "2", "--trainer.max_epochs", "-1",
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1", "--data.init_args.generate_val_samples", "4",
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    logged = scalars(cli.trainer.log_dir)
    assert len(logged["train/loss"]) == 2 and all(math.isfinite(v) for _, v in logged["train/loss"])
    assert math.isfinite(logged["val/loss"][-1][1])
    adapter_dir = Path(cli.trainer.log_dir) / "adapter"
    method = config.stem.removeprefix("demo_peft_")
    if config.stem.startswith("demo_full_"):
        assert not adapter_dir.exists()
        assert all(p.requires_grad for p in cli.model.parameters())
    else:
        saved = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert saved["peft_type"] == PEFT_TYPES.get(method, "LORA")
        assert saved.get("use_dora", False) == (method == "dora")
        assert saved.get("use_rslora", False) == (method == "rslora")
    if config.stem == "demo_full_bf16":
        assert {p.dtype for p in cli.model.parameters()} == {torch.bfloat16}
    if config.stem == "demo_full_adamw8bit":
        import bitsandbytes as bnb

        assert isinstance(cli.trainer.optimizers[0], bnb.optim.AdamW8bit)
