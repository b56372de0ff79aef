"""The torchao backend: int8 weights quantized by transformers' torchao integration while the base loads, LoRA trained
on them through the CLI, the adapter reloaded and merged into the de-quantized weights; each scheme a machine cannot
run, and each adapter peft cannot train, refused in one sentence when the config is read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from helpers import ROOT, run_cli, scalars
from peft import LoraConfig
from torchao.quantization import Float8Tensor, Int8Tensor
from transformers import AutoModelForCausalLM

from qlit.callbacks.params import weight_bytes
from qlit.errors import QlitError
from qlit.export import export_merged
from qlit.models.loading import load_causal_lm
from qlit.models.quant import backend_class
from qlit.models.quant._torchao_common import is_torchao_tensor
from qlit.models.quantization import Quantization
from qlit.module import QLitModule
from qlit.study.techniques import describe_config, technique

CPU = torch.device("cpu")
# 12 optimizer steps on the same 4 rows (one batch): the loss of an adapter overfitting them must fall.
SHORT_FIT = [
    *("fit", "--config", str(ROOT / "configs/demo_torchao.yaml"), "--trainer.max_steps", "12"),
    *("--trainer.max_epochs", "-1", "--trainer.val_check_interval", "12", "--trainer.log_every_n_steps", "1"),
    *("--trainer.check_val_every_n_epoch", "null"),
    *("--data.init_args.limit_train_samples", "4", "--data.init_args.batch_size", "4"),
    *("--data.init_args.limit_val_samples", "8", "--latency.probe_samples", "1", "--latency.probe_new_tokens", "2"),
]


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits.float()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchao")
    cli = run_cli(tmp, *SHORT_FIT)
    return cli, Path(cli.trainer.log_dir)


def test_lora_trains_on_torchao_int8_weights_through_the_cli(fitted):
    cli, run = fitted
    model = cli.model.model
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "TorchaoLoraLinear" and isinstance(layer.base_layer.weight, Int8Tensor)
    assert layer.base_layer.weight.qdata.dtype == torch.int8
    loss = [v for _, v in scalars(run)["train/loss"]]
    assert len(loss) == 12 and loss[-1] < 0.7 * loss[0], loss
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_the_saved_adapter_reloads_onto_the_int8_base_with_the_same_logits(fitted, input_ids):
    cli, run = fitted
    expected = logits(cli.model.model, input_ids)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        quantization=Quantization(mode="torchao", compute_dtype="float32"),
        adapter_path=str(run / "adapter"),
    )
    module.configure_model()
    torch.testing.assert_close(logits(module.model, input_ids), expected, rtol=1e-5, atol=1e-5)
    with module.model.disable_adapter():  # the adapter moved the model: the comparison is not of two bases
        assert (logits(module.model, input_ids) - expected).abs().max() > 1e-3


def test_the_weights_size_counts_int8_data_scales_and_zero_points(fitted):
    # By hand: each int8 projection holds out x in bytes of data and, per output row, a float32 scale and an int8
    # zero point; everything else (embeddings, head, norms, biases, LoRA) is float32 as stored.
    model = fitted[0].model.model
    quantized = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and is_torchao_tensor(m.weight)]
    assert len(quantized) == 14  # 7 projections x 2 layers
    by_hand = sum(m.out_features * m.in_features + m.out_features * (4 + 1) for m in quantized)
    plain = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers()) if not is_torchao_tensor(t)}
    by_hand += sum(t.numel() * t.element_size() for t in plain.values())
    assert weight_bytes(model) == by_hand
    logged = [v for _, v in scalars(fitted[1])["params/weight_gib"]]
    assert logged == [pytest.approx(by_hand / 2**30, rel=1e-6)]


def trained_adapter(directory: Path, scheme: str) -> QLitModule:
    """A LoRA adapter saved by qlit on the tiny base stored as torchao ``scheme``, with B far from zero (peft's zero
    initialisation would make any merge a no-op)."""
    torch.manual_seed(0)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        quantization=Quantization(mode="torchao", scheme=scheme, compute_dtype="float32"),
        adapter=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    module.configure_model()
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    module.save_adapter_to(directory)
    return module.eval()


@pytest.mark.parametrize(("scheme", "stored"), [("int8_weight_only", Int8Tensor), ("float8_weight_only", Float8Tensor)])
def test_export_merges_into_the_dequantized_weights_the_adapter_trained_on(tmp_path, input_ids, scheme, stored):
    module = trained_adapter(tmp_path / "adapter", scheme)
    assert isinstance(module.model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight, stored)
    expected = logits(module.model, input_ids)
    out = export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in merged.config.to_dict()
    assert not any(is_torchao_tensor(p) for p in merged.parameters())
    # Merging W + BA into one float32 matrix only re-associates sums: max |Δlogit| is 1e-5 on logits of |max| ~7.
    error = (logits(merged, input_ids) - expected).abs().max()
    assert error < 5e-5, error
    # The merge went into the de-quantized weights, not the original ones: those compute another model.
    original = export_merged(tmp_path / "adapter", tmp_path / "original", dequantize=False)
    assert (logits(AutoModelForCausalLM.from_pretrained(original), input_ids) - expected).abs().max() > 10 * error


@pytest.mark.parametrize("scheme", ["int8_weight_only", "float8_weight_only"])
@pytest.mark.parametrize(
    "adapter",
    [
        LoraConfig(use_dora=True, target_modules="all-linear"),
        peft.IA3Config(),
        peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
        peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]),
    ],
    ids=["dora", "ia3", "loha", "lokr"],
)
def test_other_peft_methods_train_on_the_weight_only_schemes(adapter, scheme, input_ids):
    quantization = Quantization(mode="torchao", scheme=scheme, compute_dtype="float32")
    module = QLitModule(pretrained="qlit-tiny/qwen2", quantization=quantization, adapter=adapter)
    module.configure_model()
    params = [p for p in module.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.01)
    losses = []
    for _ in range(8):
        loss = module.model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


# ----- refusals -------------------------------------------------------------------------------------------------------
@pytest.fixture
def fp8_gpu(monkeypatch):
    """This machine as if it had a GPU of compute capability 9.0 (what the config-time checks ask)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@pytest.mark.parametrize(
    ("fields", "sentence"),
    [
        (
            {"scheme": "int3"},
            "Unknown quantization.scheme 'int3' for mode torchao: use one of int8_weight_only, float8_weight_only, "
            "int4_weight_only, float8.",
        ),
        (
            {"group_size": 64},
            "quantization.group_size applies to scheme int4_weight_only only, but scheme is 'int8_weight_only' (int8 "
            "and float8 weights have one scale per row).",
        ),
        (
            {"scheme": "int4_weight_only", "group_size": 48},
            "quantization.group_size 48 is not one torchao's int4 kernel takes: use one of 32, 64, 128, 256.",
        ),
        (
            {"scheme": "int4_weight_only"},
            "quantization.scheme int4_weight_only needs a CUDA GPU (torchao's int4 kernels run there only), but this "
            "machine has none: use scheme int8_weight_only.",
        ),
        (
            {"scheme": "float8"},
            "quantization.scheme float8 needs a GPU of compute capability 8.9 or more (Ada, Hopper) for its float8 "
            "matmuls, but this machine has none: use scheme float8_weight_only or int8_weight_only.",
        ),
        ({"bits": 4}, "quantization.bits applies to mode"),
    ],
)
def test_a_bad_scheme_or_group_size_is_one_sentence_when_the_config_is_read(fields, sentence):
    with pytest.raises(QlitError) as err:
        Quantization(mode="torchao", **fields)
    assert str(err.value).startswith(sentence)


def test_float8_is_refused_off_hopper_and_int4_off_cuda_before_any_weight_loads(monkeypatch, fp8_gpu):
    float8 = Quantization(mode="torchao", scheme="float8").backend  # accepted: a 9.0 GPU is there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(QlitError, match="^quantization.scheme float8 needs a GPU of compute capability 8.9 or more"):
        Quantization(mode="torchao", scheme="float8")
    with pytest.raises(QlitError, match=r"but cuda:0 has compute capability 8\.0: use scheme float8_weight_only"):
        float8.check_device(torch.device("cuda:0"))
    int4 = Quantization(mode="torchao", scheme="int4_weight_only").backend
    with pytest.raises(QlitError, match="int4_weight_only needs a CUDA GPU .*, but the model runs on CPU: use scheme"):
        load_causal_lm("qlit-tiny/qwen2", quantization=int4.spec, dtype="float32", device=CPU)


@pytest.mark.usefixtures("fp8_gpu")
@pytest.mark.parametrize(
    ("scheme", "reason"),
    [
        ("int4_weight_only", "peft has no trainable layer over torchao's int4 weights"),
        ("float8", "torch._scaled_mm, which has no backward pass, so no gradient reaches the layers below"),
    ],
)
def test_schemes_peft_cannot_train_refuse_every_adapter_and_full_fine_tuning(scheme, reason):
    backend = Quantization(mode="torchao", scheme=scheme).backend
    for adapter in (LoraConfig(), peft.IA3Config()):
        refusal = backend.adapter_refusal(adapter)
        assert refusal.startswith(f"{type(adapter).__name__} cannot train on a torchao {scheme} base, because")
        assert reason in refusal and refusal.endswith("or quantization.mode qat.")
    with pytest.raises(QlitError, match=f"^quantization.scheme {scheme} cannot train, because"):
        backend.check_full_fine_tuning()


def test_int8_weights_need_an_adapter_and_refuse_lora_bias():
    with pytest.raises(QlitError, match="quantization mode 'torchao' stores frozen k-bit weights"):
        QLitModule(quantization=Quantization(mode="torchao"))
    with pytest.raises(QlitError, match="^LoraConfig.lora_bias cannot train on a torchao base"):
        QLitModule(quantization=Quantization(mode="torchao"), adapter=LoraConfig(lora_bias=True))
    assert Quantization(mode="torchao").backend.adapter_refusal(LoraConfig(use_dora=True)) is None


def test_a_gpt2_base_with_no_linear_projection_is_refused_not_trained_unquantized():
    spec = Quantization(mode="torchao", compute_dtype="float32")
    with pytest.raises(QlitError, match="found no nn.Linear projection to quantize in GPT2LMHeadModel"):
        load_causal_lm("qlit-tiny/gpt2", quantization=spec, dtype="float32", device=CPU)


def test_without_torchao_the_mode_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name))
    for mode in ("torchao", "qat"):
        with pytest.raises(QlitError) as err:
            Quantization(mode=mode)
        assert str(err.value) == (
            f"quantization.mode {mode} needs the torchao package, which is not installed: pip install 'qlit[torchao]'."
        )


# ----- labels and console ---------------------------------------------------------------------------------------------
def test_a_study_names_the_torchao_base_by_its_scheme():
    cls = backend_class("torchao")
    assert cls.base_label("torchao") == "torchao int8"
    assert (
        cls.technique_label("torchao", "LoraConfig", scheme="float8_weight_only") == "torchao float8 weight-only + LoRA"
    )
    config = {"model": {"init_args": {"quantization": {"mode": "torchao", "scheme": "int8_weight_only"}}}}
    described = describe_config(config)
    assert described["scheme"] == "int8_weight_only"
    assert technique(described["quantization"], "LoraConfig", scheme=described["scheme"]) == "torchao int8 + LoRA"
    assert technique("torchao", "IA3Config", scheme="int4_weight_only") == "IA3 on torchao int4"


def test_importing_and_using_torchao_prints_nothing(tmp_path):
    # torchao notes on import that its kernels for other GPUs failed to load, and PyTorch that torchao registers its
    # enums the deprecated way; transformers imports torchao whenever it is installed. A fresh process hears it.
    script = (
        "import torch\n"
        "from qlit.trainer_cli import quiet_console\n"
        "quiet_console()\n"
        "from qlit.models.loading import load_causal_lm\n"
        "from qlit.models.quantization import Quantization\n"
        "for mode in ('torchao', 'qat'):\n"
        "    spec = Quantization(mode=mode, compute_dtype='float32')\n"
        "    cpu = torch.device('cpu')\n"
        "    model = load_causal_lm('qlit-tiny/qwen2', quantization=spec, dtype='float32', device=cpu)\n"
        "    spec.backend.convert(model, has_adapter=True)\n"
        "    model(input_ids=torch.tensor([[5, 6, 7]]))\n"
        "print('done')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")
