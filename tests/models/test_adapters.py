"""Any quantization × any peft method on the tiny models: each supported pair trains, each refused pair fails early.

``SUPPORTED`` is the support matrix of docs/quantization.md ("Which method trains on which base"). ``check_adapter``
must accept exactly those pairs, and peft must still fail on the pairs it refuses, so a peft, bitsandbytes, hqq,
torchao or compressed-tensors upgrade that fixes one shows up here as a test to update.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from helpers import ROOT, run_cli, run_main, scalars

from qlit.data import SST2DataModule
from qlit.errors import QlitError
from qlit.models.adapters import check_adapter
from qlit.models.quantization import Quantization
from qlit.module import QLitModule

#: The bases of the support matrix, by its column names: the tiny model and how its weights are stored.
BASES: dict[str, tuple[str, dict[str, Any]]] = {
    **{mode: ("qlit-tiny/qwen2", {"mode": mode}) for mode in ("none", "int8", "nf4", "fp4", "bitnet")},
    "hqq": ("qlit-tiny/qwen2", {"mode": "hqq", "bits": 4}),
    "torchao": ("qlit-tiny/qwen2", {"mode": "torchao", "scheme": "int8_weight_only"}),
    "qat": ("qlit-tiny/qwen2", {"mode": "qat", "scheme": "int8_dynamic_act_int4_weight"}),
    # An AWQ checkpoint is stored in the same format and trains through the same layer (PackedLinear): one column.
    "gptq": ("qlit-tiny/qwen2-gptq", {"mode": "gptq"}),
}
MODES = tuple(BASES)
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
#: The methods peft has no HQQ layer for, by their config's class name.
HQQ_REFUSED = {"adalora": "AdaLoraConfig", "ia3": "IA3Config", "loha": "LoHaConfig", "lokr": "LoKrConfig"}
#: A refused pair that peft trains without an error, but wrongly: its DoRA magnitude is divided by the norm of
#: another weight than the one its base layer computes with (:func:`dora_error` measures how far off it is).
WRONG_NORM = "DoRA's norm of another weight"
#: The (method, base) pairs that peft 0.22.0 cannot train on CPU (bitsandbytes 0.50.2, hqq 0.2.8, torchao 0.18.0,
#: compressed-tensors 0.20.1), each with how it fails without qlit's check: the words of the error, or WRONG_NORM.
#: Their backends (models/quant) refuse them when the config is read, and say why.
REFUSED: dict[tuple[str, str], str] = {
    ("dora", "int8"): "NoneType",  # the 8-bit scales it lost in the first step
    ("dora", "bitnet"): "shape|size of tensor",  # the norm of a packed buffer
    **{(m, q): "shape|size of tensor|index" for m in ("loha", "lokr") for q in ("nf4", "fp4", "bitnet")},
    **{(m, "hqq"): "HQQLinear.*not supported" for m in HQQ_REFUSED},  # no HQQ layer in peft
    ("dora", "qat"): WRONG_NORM,  # the full-precision weight's norm, not the fake-quantized weight's
}
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


def build(adapter: peft.PeftConfig | None, mode: str = "nf4", arch: str | None = None, **kwargs) -> QLitModule:
    """A configured module training ``adapter`` on the base of column ``mode`` (on ``qlit-tiny/<arch>`` if given)."""
    pretrained, fields = BASES[mode]
    module = QLitModule(
        pretrained=f"qlit-tiny/{arch}" if arch else pretrained,
        quantization=Quantization(**fields, compute_dtype="float32"),
        adapter=adapter,
        **kwargs,
    )
    module.configure_model()
    return module.train()


@pytest.fixture(scope="module")
def base_copies() -> Callable[..., Any]:
    """``load_causal_lm`` that loads (and quantizes) each base once per module and hands out copies of it: peft
    wraps the layers of the model it is given in place."""
    from qlit.models.loading import load_causal_lm

    loaded: dict[str, Any] = {}

    def load(pretrained: str, **kwargs: Any) -> Any:
        key = repr((pretrained, sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = load_causal_lm(pretrained, **kwargs)
        model = loaded[key]
        # deepcopy refuses a tensor computed from a parameter (HQQLinear's bias): such a tensor is copied detached.
        computed = [
            t for m in model.modules() for t in vars(m).values() if isinstance(t, torch.Tensor) and not t.is_leaf
        ]
        memo = {id(t): t.detach().clone().requires_grad_(t.requires_grad) for t in computed}
        return copy.deepcopy(model, memo)

    return load


@pytest.fixture
def each_base_once(base_copies, monkeypatch):
    monkeypatch.setattr("qlit.module.load_causal_lm", base_copies)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values; a tensor subclass (torchao's Int8Tensor) by each tensor it holds."""
    if type(a) not in (torch.Tensor, torch.nn.Parameter) and hasattr(a, "__tensor_flatten__"):
        names, _ = a.__tensor_flatten__()
        return all(same(getattr(a, name), getattr(b, name)) for name in names)
    return torch.equal(a, b)


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
    changed = {n for n, before in {**trainable, **frozen}.items() if not same(before, now[n].detach())}
    return losses, changed & trainable.keys(), changed & frozen.keys(), opt


def dora_error(module: QLitModule) -> float:
    """How far the first DoRA layer's output is from DoRA's (Liu et al. 2024) on the weight its base layer computes
    with (the backend's de-quantized weight): ``m ⊙ (W + s·BA) / ‖W + s·BA‖`` per output row, relative to its size."""
    layer = next(m for m in module.model.modules() if "default" in getattr(m, "lora_magnitude_vector", {}))
    base = layer.get_base_layer()
    weight = module.quantization.backend.dequantized_weight(base)
    weight = base.weight if weight is None else weight
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    scale = layer.lora_magnitude_vector["default"].weight / (weight + delta).norm(dim=1)
    bias = 0 if base.bias is None else base.bias
    x = torch.randn(1, 4, base.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The base layer's own output stands for W·x: it holds whatever else the base computes (an int8 activation).
        want = scale * (base(x) - bias + x @ delta.T) + bias
        return ((layer(x) - want).norm() / want.norm()).item()


# ----- the support matrix --------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("each_base_once")
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
    if method == "dora":  # peft normalises by the weight each base layer computes with (it de-quantizes it)
        assert dora_error(module) < 1e-6  # float32 rounding: 5e-8


@pytest.fixture
def cpu_only(monkeypatch):
    """Train where there is no GPU: the device the int8 DoRA refusal depends on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(("method", "mode"), SUPPORTED)
def test_check_adapter_accepts_every_supported_pair(cpu_only, method, mode):
    check_adapter(ADAPTERS[method](), Quantization(**BASES[mode][1]))


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
        *[(m, "hqq", f"{name} cannot train on an hqq base.*LoRA only") for m, name in HQQ_REFUSED.items()],
        ("dora", "qat", "DoRA.*qat base.*full-precision.*use_dora to false"),
    ],
)
def test_check_adapter_refuses_the_pairs_peft_cannot_train(cpu_only, method, mode, message):
    assert (method, mode) in REFUSED
    with pytest.raises(QlitError, match=message) as err:
        check_adapter(ADAPTERS[method](), Quantization(**BASES[mode][1]))
    assert "\n" not in str(err.value)


@pytest.mark.usefixtures("each_base_once")
@pytest.mark.parametrize(("method", "mode"), sorted(REFUSED))
def test_refused_pairs_still_fail_in_peft(batches, monkeypatch, method, mode):
    """Without qlit's check peft builds the model and then fails (to wrap the layers, or in training), or trains a
    DoRA against another weight than its layers compute with: the refusal is still needed."""
    monkeypatch.setattr("qlit.module.check_adapter", lambda *args, **kwargs: None)
    failure = REFUSED[method, mode]
    if failure == WRONG_NORM:
        module = build(ADAPTERS[method](), mode)
        train(module, batches("qwen2"))
        assert dora_error(module) > 1e-3  # 1e-2 here, 5e-8 on the bases where DoRA is supported
        return
    # peft's errors in wrapping a layer come as qlit's sentence that quotes them.
    with pytest.raises((RuntimeError, AttributeError, IndexError, QlitError), match=failure):
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
