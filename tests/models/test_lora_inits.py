"""How a new LoRA adapter starts (``init_lora_weights``): each start qlit runs trains on each base that can hold it, the
others are refused when the config is read, LoftQ starts nearer the checkpoint than NF4 alone, a start that rewrote
the base is saved as an adapter on the original base, and studies name each start as its technique.

``SUPPORTED`` is the table of docs/quantization.md ("LoRA initialisations").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
from helpers import ROOT, run_cli, run_main, scalars, write_study

from qlit.data import SST2DataModule
from qlit.errors import QlitError
from qlit.models.adapters import Calibration, check_adapter
from qlit.models.loading import load_causal_lm, resolve_pretrained
from qlit.models.quantization import Quantization
from qlit.module import QLitModule
from qlit.naming import adapter_name
from qlit.study.sweep import check_cells, load_study
from qlit.study.techniques import describe_config, technique

CPU = torch.device("cpu")
MODES = ("none", "int8", "nf4", "fp4", "bitnet")
STARTS = {
    "none": ("true", "gaussian", "pissa", "pissa_niter_2", "olora", "eva", "corda"),
    "int8": ("true", "olora", "eva"),
    "nf4": ("true", "pissa", "olora", "eva", "loftq"),
    "fp4": ("true", "pissa", "olora", "eva", "loftq"),
    "bitnet": ("true", "eva"),
}
SUPPORTED = [(init, mode) for mode, inits in STARTS.items() for init in inits]
FAMILY = {"pissa_niter_2": "pissa", "true": "default", "gaussian": "default"}
ALL = ("true", "pissa", "olora", "eva", "corda", "loftq")
REFUSED = [(init, mode) for mode in MODES for init in ALL if init not in STARTS[mode]]
#: The pairs the command-line fits below train; the matrix trains the others (peft's default is test_adapters.py's).
THROUGH_THE_CLI = {("pissa", "nf4"), ("olora", "nf4"), ("eva", "nf4"), ("loftq", "nf4")} | {
    ("gaussian", "none"),
    ("pissa_niter_2", "none"),
    ("corda", "none"),
}
MATRIX = [(i, m) for i, m in SUPPORTED if (i, m) not in THROUGH_THE_CLI and i != "true"]
ALLOWED = "use one of true, false, gaussian, pissa, pissa_niter_<n>, olora, eva, corda, loftq."


def lora(init: object, r: int = 4, alpha: int = 8, **options) -> peft.LoraConfig:
    value = {"true": True}.get(init, init) if isinstance(init, str) else init
    if value == "loftq":
        options.setdefault("loftq_config", peft.LoftQConfig())
    options.setdefault("target_modules", "all-linear")
    return peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=value, task_type="CAUSAL_LM", **options)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The starts' small SVDs (64 x 64 here) only wait on each other in a second thread on a shared CPU: 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> SST2DataModule:
    dm = SST2DataModule(tokenizer="qlit-tiny/qwen2", path="qlit-samples/sst2", batch_size=8, max_length=64)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def batch(data) -> dict:
    return next(iter(data.train_dataloader()))


def build(adapter: peft.PeftConfig, mode: str, data: SST2DataModule | None = None, arch: str = "qwen2") -> QLitModule:
    """The module with ``adapter`` started on the tiny base, its calibration rows read from ``data``."""
    module = QLitModule(
        pretrained=f"qlit-tiny/{arch}",
        dtype="float32",
        quantization=Quantization(mode=mode, compute_dtype="float32"),
        adapter=adapter,
    )
    if data is not None:
        module._calibration = lambda: Calibration(data.train_dataloader(), lambda m, b: module(b, model=m))
    torch.manual_seed(0)
    module.configure_model()
    return module.train()


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def original(mode: str = "none"):
    return load_causal_lm(
        "qlit-tiny/qwen2", quantization=Quantization(mode=mode, compute_dtype="float32"), dtype="float32", device=CPU
    ).eval()


# ----- read with the config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["foo", "astra", "pissa_niter_x", "PiSSA"])
def test_an_init_qlit_does_not_run_is_one_sentence_listing_the_ones_it_does(value):
    with pytest.raises(QlitError) as err:
        check_adapter(lora(value), Quantization(mode="nf4"))
    message = str(err.value)
    assert message.startswith("model.init_args.adapter.init_args.init_lora_weights ") and message.endswith(ALLOWED)
    assert "\n" not in message


def test_the_cli_refuses_an_unknown_init_in_one_line_before_any_weight_loads(capsys, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("weights were loaded before the adapter's start was checked")

    monkeypatch.setattr("qlit.module.load_causal_lm", load)
    code = run_main(
        "fit",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--model.init_args.adapter.init_args.init_lora_weights",
        "foo",
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlit: error:")]
    assert code == 1
    assert len(errors) == 1 and "init_lora_weights 'foo' is no LoRA initialisation" in errors[0], errors
    assert errors[0].endswith(ALLOWED)


@pytest.mark.parametrize(("init", "mode"), SUPPORTED)
def test_every_supported_start_is_accepted(init, mode):
    check_adapter(lora(init), Quantization(mode=mode))


@pytest.mark.parametrize(("init", "mode"), REFUSED)
def test_a_start_the_base_cannot_hold_is_refused_with_the_reason_and_the_modes_that_can(init, mode):
    with pytest.raises(QlitError) as err:
        check_adapter(lora(init), Quantization(mode=mode))
    message = str(err.value)
    takers = [m for m in MODES if init in STARTS[m]]
    assert f"'{init}' cannot start LoRA on a {mode} base, because " in message
    assert message.endswith(f"use quantization.mode {' or '.join(takers)}, or init_lora_weights true."), message


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        (lambda: lora("pissa", use_dora=True), "'pissa' cannot start DoRA \\(use_dora\\)"),
        (
            lambda: peft.AdaLoraConfig(init_lora_weights="olora", total_step=10, task_type="CAUSAL_LM"),
            "'olora' starts peft.LoraConfig only, not AdaLoraConfig",
        ),
        (
            lambda: lora("olora", use_rslora=True, rank_pattern={"q_proj": 8}),
            "use_rslora and a rank_pattern .* cannot be converted",
        ),
        (
            lambda: lora("loftq", loftq_config=peft.LoftQConfig(loftq_bits=8)),
            "loftq_config asks for loftq_bits 8 and loftq_iter 1, .* set loftq_bits to 4",
        ),
    ],
    ids=["dora", "adalora", "rslora-pattern", "loftq-8-bit"],
)
def test_settings_a_start_cannot_take_are_refused(adapter, message):
    with pytest.raises(QlitError, match=message):
        check_adapter(adapter(), Quantization(mode="nf4"))


@pytest.mark.parametrize(
    ("init", "mode", "error", "message"),
    [
        ("pissa", "int8", QlitError, "peft could not apply LoraConfig: Please initialize PiSSA under float32"),
        ("olora", "bitnet", QlitError, "peft could not apply LoraConfig: Unsupported data type"),
        ("loftq", "nf4", RuntimeError, "cannot be multiplied"),
    ],
)
def test_refused_starts_still_fail_in_peft(batch, monkeypatch, init, mode, error, message):
    """Without qlit's check peft fails on them (LoftQ on NF4 by peft's own path replaces each 4-bit weight by a bogus
    one, and the first forward fails): the refusals are still needed."""
    monkeypatch.setattr("qlit.models.adapters._init_refusal", lambda *args: None)
    monkeypatch.setattr(type(Quantization(mode=mode).backend), "lora_inits", ALL)
    monkeypatch.setattr(type(Quantization(mode=mode).backend), "own_lora_inits", ())
    with pytest.raises(error, match=message):
        logits(build(lora(init), mode).model, batch)


# ----- each start trains --------------------------------------------------------------------------------------------
def train(module: QLitModule, batch: dict, steps: int = 3) -> tuple[list[float], set[str], set[str]]:
    """``steps`` AdamW steps on one batch: the losses, and the trainable and frozen parameters that changed."""
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = module(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    now = dict(module.named_parameters())
    changed = {n for n, old in before.items() if not torch.equal(old, now[n].detach())}
    return losses, changed & trainable, changed - trainable


@pytest.mark.parametrize(("init", "mode"), MATRIX)
def test_every_supported_start_trains_its_adapter_only(data, batch, init, mode):
    module = build(lora(init), mode, data)
    family = FAMILY.get(init, init)
    if mode == "none" and family in ("pissa", "olora", "default", "eva"):
        # Each starts where the base is: a zero update, or a residual base plus its part in the adapter.
        torch.testing.assert_close(logits(module.model, batch), logits(original(), batch), rtol=1e-4, atol=1e-4)
    if family == "eva":  # A holds the principal directions of each layer's inputs: orthonormal rows, not random
        for layer in module.model.modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer) and layer.r["default"] > 0:
                a = layer.lora_A["default"].weight.detach()
                torch.testing.assert_close(a @ a.T, torch.eye(a.size(0)), rtol=0, atol=1e-3)
    losses, trained, frozen_changed = train(module, batch)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert trained == {n for n, p in module.named_parameters() if p.requires_grad}
    assert not frozen_changed, sorted(frozen_changed)


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_a_data_driven_start_without_a_datamodule_is_one_sentence(init):
    with pytest.raises(QlitError, match=f"'{init}' computes the adapter's start from training batches.*no DataModule"):
        build(lora(init), "none")


def test_loftq_and_pissa_on_gpt2_s_conv1d_layers_are_refused_when_the_model_loads(data):
    with pytest.raises(QlitError, match="'loftq' cannot start on layer 'transformer.h.0.attn.c_attn'.*Conv1D"):
        build(lora("loftq", target_modules=["c_attn"]), "nf4", arch="gpt2")


# ----- LoftQ: the adapter starts at the quantization error ----------------------------------------------------------
def test_loftq_starts_base_plus_adapter_nearer_the_checkpoint_than_nf4_alone():
    import bitsandbytes as bnb
    from safetensors import safe_open

    # lora_alpha = 2r: peft's factors alone (without the scaling qlit divides out) would add twice the error's SVD.
    module = build(lora("loftq", r=8, alpha=16), "nf4")
    layers = {n: m for n, m in module.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(layers) == 14  # 7 projections in each of the 2 layers
    checkpoint = safe_open(str(Path(resolve_pretrained("qlit-tiny/qwen2")) / "model.safetensors"), "pt")
    ratios = []
    for name, layer in layers.items():
        weight = checkpoint.get_tensor(name.removeprefix("base_model.model.") + ".weight").float()
        base = layer.get_base_layer().weight
        nf4 = bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
        update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ratios.append(float((weight - (nf4 + update)).norm() / (weight - nf4).norm()))
    assert max(ratios) < 0.95, ratios  # every projection: the rank-8 share of its quantization error is gone
    assert sum(ratios) / len(ratios) < 0.9, ratios


# ----- a start that rewrote the base is saved for the original base ----------------------------------------------
@pytest.mark.parametrize("init", ["olora", "corda"])
def test_a_saved_residual_start_reloaded_on_the_original_base_gives_the_trained_logits(tmp_path, data, batch, init):
    module = build(lora(init), "none", data)
    train(module, batch)
    module.save_adapter_to(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)  # twice the rank
    trained = logits(module.model.eval(), batch)
    reloaded = peft.PeftModel.from_pretrained(original(), str(tmp_path / "adapter")).eval()
    assert (trained - logits(original(), batch)).abs().max() > 1e-2  # the training moved the model
    torch.testing.assert_close(logits(reloaded, batch), trained, rtol=1e-4, atol=1e-4)


# ----- through the command line -------------------------------------------------------------------------------------
CLI_RUNS = [
    ("demo.yaml", "pissa"),
    ("demo.yaml", "olora"),
    ("demo.yaml", "eva"),
    ("demo_loftq.yaml", None),  # init_lora_weights: loftq is the config's own
    ("demo_peft_lora.yaml", "gaussian"),
    ("demo_peft_lora.yaml", "pissa_niter_2"),
    ("demo_peft_lora.yaml", "corda"),
]


@pytest.mark.parametrize(("config", "init"), CLI_RUNS, ids=[f"{c.removesuffix('.yaml')}-{i}" for c, i in CLI_RUNS])
def test_every_start_fits_through_the_cli_and_lowers_the_loss(tmp_path, batch, config, init):
    given = [] if init is None else ["--model.init_args.adapter.init_args.init_lora_weights", init]
    cli = run_cli(
        tmp_path, "fit", "--config", str(ROOT / "configs" / config), *given,
        "--trainer.max_steps", "8", "--trainer.max_epochs", "-1", "--trainer.val_check_interval", "8",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--data.init_args.batch_size", "8", "--data.init_args.generate_val_samples", "4",
        "--model.init_args.lr_scheduler.init_args.warmup_steps", "1",
    )  # fmt: skip
    losses = [v for _, v in scalars(cli.trainer.log_dir)["train/loss"]]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    value = init or "loftq"
    family = FAMILY.get(value, value)
    named = "+gaussian" if value == "gaussian" else "" if family == "default" else f"+{family}"
    assert cli.model.study_hparams()["adapter"] == "LoraConfig" + named
    adapter_dir = Path(cli.trainer.log_dir) / "adapter"
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank = cli.model.adapter.r
    # Saved to reload as it is: a residual start converted (twice the rank), a start qlit ran itself as peft's default.
    assert saved["r"] == (2 * rank if family in ("pissa", "corda", "olora") else rank)
    assert saved["init_lora_weights"] == (value if value in ("eva", "gaussian") else True)
    if config == "demo_peft_lora.yaml":  # an unquantized base: the saved adapter gives the trained model exactly
        trained = logits(cli.model.model.eval(), batch)
        reloaded = peft.PeftModel.from_pretrained(original(), str(adapter_dir)).eval()
        torch.testing.assert_close(logits(reloaded, batch), trained, rtol=1e-4, atol=1e-4)


# ----- how studies name them ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"init_lora_weights": True}, "LoraConfig"),
        ({}, "LoraConfig"),
        ({"init_lora_weights": "loftq"}, "LoraConfig+loftq"),
        ({"init_lora_weights": "pissa_niter_4"}, "LoraConfig+pissa"),
        ({"init_lora_weights": "gaussian"}, "LoraConfig+gaussian"),
        ({"init_lora_weights": "olora", "use_rslora": True}, "LoraConfig+rslora+olora"),
    ],
)
def test_the_adapter_is_described_with_its_start(options, name):
    assert adapter_name("LoraConfig", options, None) == name


@pytest.mark.parametrize(
    ("mode", "adapter", "double_quant", "label"),
    [
        ("nf4", "LoraConfig+loftq", True, "LoftQ on NF4 + DQ"),
        ("nf4", "LoraConfig+loftq", False, "LoftQ on NF4"),
        ("nf4", "LoraConfig+pissa", True, "PiSSA on NF4 + DQ"),
        ("none", "LoraConfig+pissa", None, "PiSSA"),
        ("int8", "LoraConfig+eva", None, "EVA on 8-bit"),
        ("none", "LoraConfig+corda", None, "CorDA"),
        ("none", "LoraConfig+rslora+olora", None, "OLoRA (rsLoRA)"),
        ("nf4", "LoraConfig", True, "QLoRA (NF4 + DQ)"),
    ],
)
def test_a_start_is_named_as_its_technique(mode, adapter, double_quant, label):
    assert technique(mode, adapter, double_quant) == label


def test_a_study_over_the_starts_expands_into_cells_named_by_technique(tmp_path):
    axis = "model.init_args.adapter.init_args.init_lora_weights"
    study = load_study(write_study(tmp_path, {"axes": {axis: [True, "pissa", "loftq"]}, "output": str(tmp_path / "o")}))
    labels = [cell.label for cell in study.cells]
    assert labels == ["QLoRA (NF4 + DQ)", "PiSSA on NF4 + DQ", "LoftQ on NF4 + DQ"]
    assert len({cell.name for cell in study.cells}) == 3
    assert [describe_config(cell.config)["adapter"] for cell in study.cells] == [
        "LoraConfig", "LoraConfig+pissa", "LoraConfig+loftq",
    ]  # fmt: skip
    assert check_cells(study) == {}  # every cell's config parses and its model accepts its start


def test_the_built_in_start_strategies_run_on_the_base_config_s_quantization(tmp_path):
    starts = ["pissa", "olora", "eva", "loftq"]
    study = load_study(write_study(tmp_path, {"strategies": starts, "output": str(tmp_path / "o")}))
    assert [cell.label for cell in study.cells] == [f"{m} on NF4 + DQ" for m in ("PiSSA", "OLoRA", "EVA", "LoftQ")]
    assert check_cells(study) == {}
