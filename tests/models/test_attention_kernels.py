"""The fast paths choose themselves where they can run and say so where they cannot: the variable-length attention
kernel (CUDA) and Liger's fused kernels (CUDA, optional package)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from qlit.data.batching import PackingCollator
from qlit.errors import QlitError
from qlit.models import kernels
from qlit.module import QLitModule


def _module(**kwargs) -> QLitModule:
    return QLitModule(pretrained="qlit-tiny/qwen2", adapter=LoraConfig(r=4, target_modules="all-linear"), **kwargs)


def test_auto_falls_back_quietly_on_cpu() -> None:
    module = _module()
    module.configure_model()
    assert module.model.config._attn_implementation == "sdpa"
    assert module.kernels_applied == "none"


def test_asking_for_liger_without_it_is_one_sentence(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    with pytest.raises(QlitError, match=r"model.kernels liger needs the liger-kernel package: pip install"):
        _module(kernels="liger")


def test_asking_for_liger_on_cpu_is_one_sentence(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    module = _module(kernels="liger")
    with pytest.raises(QlitError, match="runs on CUDA GPUs only"):
        module.configure_model()


@pytest.mark.gpu
def test_varlen_kernel_matches_sdpa_on_a_packed_batch() -> None:
    """The variable-length kernel computes what SDPA with transformers' per-sample mask computes (bf16 tolerance)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in (37, 90, 11, 64):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "prompt_length": 0})
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in PackingCollator()(rows).items()}
    logits, names = {}, {}
    for attn in ("auto", "sdpa"):
        torch.manual_seed(0)
        module = _module(attn_implementation=attn, dtype="bfloat16", kernels="none").to("cuda")
        module.configure_model()  # onto the module's device
        names[attn] = module.model.config._attn_implementation
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits[attn] = module(batch).logits.float()
    assert names == {"auto": "qlit_varlen", "sdpa": "sdpa"}
    assert names == {"auto": "qlit_varlen", "sdpa": "sdpa"}
    err = (logits["auto"] - logits["sdpa"]).norm() / logits["sdpa"].norm()
    assert err < 1e-2, err


@torch.no_grad()
def test_varlen_implementation_off_cuda_masks_each_sample() -> None:
    """Asked for explicitly where its kernel cannot run (CPU, fp32), the variable-length implementation still keeps
    attention within each sample: the same logits as SDPA with transformers' per-sample mask."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (9, 14, 5):
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "prompt_length": 0})
    batch = PackingCollator()(rows)
    logits = {}
    for attn in ("qlit_varlen", "sdpa"):
        torch.manual_seed(0)
        module = _module(attn_implementation=attn, dtype="float32")
        module.configure_model()
        logits[attn] = module(batch).logits
    torch.testing.assert_close(logits["qlit_varlen"], logits["sdpa"], rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_read_from_each_architecture() -> None:
    from qlit.models.attention import attention_dropout
    from qlit.models.loading import load_config

    assert attention_dropout(load_config("qlit-tiny/qwen2")) == 0.0
    gpt2 = load_config("qlit-tiny/gpt2")
    assert attention_dropout(gpt2) == gpt2.attn_pdrop > 0  # GPT-2 names it attn_pdrop


@pytest.mark.gpu
def test_a_model_with_attention_dropout_is_not_packed_by_default_and_trains_packed_when_asked(tmp_path) -> None:
    """GPT-2 trains with attention dropout, which the variable-length kernel lacks: padded rows by default, and an
    explicit packing: true goes through SDPA with the per-sample mask instead of failing."""
    from helpers import ROOT, run_cli, scalars

    common = [
        "fit", "--config", str(ROOT / "configs/demo_codesearchnet.yaml"),
        "--model.init_args.pretrained", "qlit-tiny/gpt2", "--trainer.accelerator", "gpu",
        "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
        "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip
    default = run_cli(tmp_path / "default", *common)
    assert default.model.model.config._attn_implementation == "qlit_varlen"
    assert not default.datamodule.packs()
    packed = run_cli(tmp_path / "packed", *common, "--data.init_args.packing", "true")
    assert packed.datamodule.packs()
    assert len(scalars(packed.trainer.log_dir)["train/loss"]) == 3


def test_compiled_layers_get_liger_fused_loss_only(monkeypatch) -> None:
    """Under ``compile: true`` the compiler fuses the norms, rotary embedding and gated MLP; Liger's autograd
    functions for them break its tracing, so only the fused loss is patched in."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"qwen2": None}
    fake._apply_liger_kernel_to_instance = lambda model, **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    model = torch.nn.Module()
    model.config = types.SimpleNamespace(model_type="qwen2")
    cuda = torch.device("cuda")
    assert kernels.apply_kernels(model, "auto", cuda) == "liger"
    assert kernels.apply_kernels(model, "auto", cuda, layer_kernels=False) == "liger"
    assert calls[0] == {}  # every kernel Liger has for the architecture
    assert calls[1] == dict(rms_norm=False, rope=False, swiglu=False, geglu=False)
    # The module asks for the loss alone exactly when it compiles its layers.
    from qlit import module as module_file

    asked = []
    monkeypatch.setattr(module_file, "apply_kernels", lambda *a, layer_kernels: asked.append(layer_kernels) or "none")
    for compiled in (False, True):
        _module(compile=compiled).configure_model()
    assert asked == [True, False]


def test_liger_changes_the_model_it_is_applied_to_and_no_model_built_later(monkeypatch) -> None:
    """Liger's instance patching also replaces the modeling module's classes and rotary function, for every model
    the process builds later. qlit keeps it to the instance: a model built afterwards gets transformers' modules,
    and the patched one still calls Liger's rotary function, in its forward pass and in a checkpointed layer's
    recomputation. (A stand-in for Liger that patches as Liger 0.8 does, since Liger needs CUDA.)"""
    import inspect
    import sys
    import types

    from transformers.models.qwen2 import modeling_qwen2

    from qlit.models.loading import load_causal_lm

    original_rope, original_norm = modeling_qwen2.apply_rotary_pos_emb, modeling_qwen2.Qwen2RMSNorm
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", original_rope)  # put back whatever happens here
    monkeypatch.setattr(modeling_qwen2, "Qwen2RMSNorm", original_norm)
    calls = []

    def liger_rope(*args, **kwargs):
        calls.append(1)
        return original_rope(*args, **kwargs)

    class LigerNorm(original_norm):
        pass

    def patch(model, **kwargs):
        modeling_qwen2.apply_rotary_pos_emb = liger_rope
        modeling_qwen2.Qwen2RMSNorm = LigerNorm
        model.forward = types.MethodType(type(model).forward, model)  # Liger's loss: on the instance

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"qwen2": None}
    fake._apply_liger_kernel_to_instance = patch
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)

    from qlit.models.quantization import Quantization

    def load():
        return load_causal_lm(
            "qlit-tiny/qwen2", quantization=Quantization(), dtype="float32", device=torch.device("cpu")
        )

    patched = load()
    assert kernels.apply_kernels(patched, "auto", torch.device("cuda")) == "liger"
    assert modeling_qwen2.apply_rotary_pos_emb is original_rope and modeling_qwen2.Qwen2RMSNorm is original_norm
    # The wrapped forward keeps its signature (generation reads it for the arguments it may pass).
    assert "logits_to_keep" in inspect.signature(patched.forward).parameters
    layers = patched.config.num_hidden_layers
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()
    ids = torch.randint(0, 100, (1, 8))
    loss = patched(input_ids=ids, labels=ids).loss
    assert len(calls) == layers  # Liger's rotary function in each layer's forward
    loss.backward()
    assert len(calls) == 2 * layers  # and in each checkpointed layer's recomputation
    assert modeling_qwen2.apply_rotary_pos_emb is original_rope

    later = load()
    assert type(later.model.norm) is original_norm
    later(input_ids=ids)
    assert len(calls) == 2 * layers  # a model built afterwards runs transformers' own


@pytest.mark.gpu
def test_real_liger_stays_on_its_model() -> None:
    """Liger itself (where installed): its kernels in the model it was applied to, transformers' modeling module as
    it was, the same loss through checkpointed layers as without Liger (bf16 tolerance), and a model loaded next
    built from transformers' own modules."""
    if not kernels.liger_installed():
        pytest.skip("liger-kernel is not installed (pip install 'qlit[gpu]')")
    from transformers.models.qwen2 import modeling_qwen2

    before = dict(vars(modeling_qwen2))
    batch = {"input_ids": torch.randint(3, 500, (2, 32), device="cuda")}
    batch["labels"] = batch["input_ids"]
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    losses = {}
    for choice in ("none", "auto", "none"):
        torch.manual_seed(0)
        module = _module(dtype="bfloat16", kernels=choice, gradient_checkpointing=True).to("cuda")
        module.configure_model()
        assert module.kernels_applied == ("liger" if choice == "auto" else "none")
        norms = {type(m).__name__ for m in module.model.modules() if "RMSNorm" in type(m).__name__}
        assert norms == {"Qwen2RMSNorm"}, norms
        patched = [m for m in module.model.modules() if "forward" in vars(m) and "RMSNorm" in type(m).__name__]
        assert bool(patched) == (choice == "auto")  # Liger's norm bound to this model's modules only
        module.train()
        # The rotary function each attention's forward sees (read from inside it, by its query projection), in the
        # forward pass and in the checkpointed layers' recomputation in the backward pass.
        ropes: list[str] = []
        attention = next(m for m in module.model.modules() if type(m).__name__ == "Qwen2Attention")
        attention.q_proj.register_forward_pre_hook(
            lambda *_, seen=ropes: seen.append(modeling_qwen2.apply_rotary_pos_emb.__module__.split(".")[0])
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module(batch).loss
        loss.backward()  # the checkpointed layers recomputed with the same kernels
        assert ropes == 2 * ["liger_kernel" if choice == "auto" else "transformers"], ropes
        losses.setdefault(choice, []).append(loss.item())
        assert {k: v for k, v in vars(modeling_qwen2).items() if k in before} == before
    assert losses["none"][0] == losses["none"][1]  # the model loaded after Liger's runs transformers' modules
    assert abs(losses["auto"][0] - losses["none"][0]) < 1e-2 * losses["none"][0], losses
