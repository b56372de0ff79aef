"""``qat``: quantization-aware training with torchao's fake quantization, converted to real int4 weights at the end.

The base loads as it is stored; then every ``nn.Linear`` projection of the decoder layers becomes torchao's
``FakeQuantizedLinear`` (``QATConfig(base_config, step="prepare")``), which rounds its weight to int4 in groups of
``group_size`` (and, for ``int8_dynamic_act_int4_weight``, its input to int8 per token) in every forward pass and
passes gradients straight through the rounding. Without an adapter the whole model trains through it (QAT proper);
under LoRA the base is frozen and fake-quantized while the adapter trains in full precision beside it (QAT + LoRA,
as torchtune's ``QATLoRALinear``), so the adapter learns to correct the int4 base it will be deployed on.

At the end of ``fit`` torchao's convert step swaps the fake-quantized layers for real int4 weights in its
``IntxUnpackedToInt8Tensor`` (``QATConfig(base_config, step="convert")``); the validation loss of the converted model
is logged and stated next to the fake-quantized one, and the converted model (under LoRA: its base, onto which the
saved adapter loads) is saved in ``qat/`` as a transformers checkpoint. BitNet (``qlit.models.bitnet``) is the
ternary counterpart, with layers of qlit's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch

from qlit.errors import QlitError
from qlit.models.quant._torchao_common import require_linear_layers, require_torchao, save_quantized
from qlit.models.quant.base import QuantBackend, TrainedModel

CONVERTED_DIR = "qat"
#: The schemes and what each fake-quantizes.
SCHEMES = {
    "int8_dynamic_act_int4_weight": "int4 weights and int8 per-token activations",
    "int4_weight_only": "int4 weights",
}
DEFAULT_SCHEME = "int8_dynamic_act_int4_weight"
#: torchao's default for int4 QAT: one scale per 32 weights of a row.
DEFAULT_GROUP_SIZE = 32


class QAT(QuantBackend):
    """A base whose decoder projections train through torchao's fake int4 quantization, then convert to real int4."""

    modes: ClassVar[tuple[str, ...]] = ("qat",)
    labels: ClassVar[dict[str, str]] = {"qat": "QAT int4"}
    strategies: ClassVar[dict[str, dict[str, Any]]] = {
        "qat": {"mode": "qat", "double_quant": None},  # the whole model through its fake-quantized weights
        "qat-lora": {"mode": "qat", "double_quant": None, "lora": True},
    }
    # No fast path: the fake quantizers are not recorded as CUDA graphs here, and the fused LoRA reads 4-bit weights.
    options: ClassVar[tuple[str, ...]] = ("scheme", "group_size")

    @property
    def scheme(self) -> str:
        """The spec's scheme, or the default one."""
        return self.spec.scheme or DEFAULT_SCHEME

    @property
    def group_size(self) -> int:
        """The spec's group size, or torchao's default for int4 QAT."""
        return self.spec.group_size or DEFAULT_GROUP_SIZE

    @classmethod
    def technique_label(cls, mode: str, adapter: str | None, **kwargs: Any) -> str | None:
        if adapter == "full":
            return "QAT int4"  # the whole model trained through its fake-quantized weights
        if adapter == "LoraConfig":
            return "QAT int4 + LoRA"
        return super().technique_label(mode, adapter, **kwargs)

    # ----- before any weight is loaded --------------------------------------------------------------------------------
    def check_options(self) -> None:
        require_torchao(self.spec.mode)
        scheme, group_size = self.spec.scheme, self.spec.group_size
        if scheme is not None and scheme not in SCHEMES:
            raise QlitError(f"Unknown quantization.scheme '{scheme}' for mode qat: use one of {', '.join(SCHEMES)}.")
        if group_size is not None and (isinstance(group_size, bool) or group_size < 1):
            raise QlitError(f"quantization.group_size must be a positive number of weights, got {group_size!r}.")

    def adapter_refusal(self, adapter: Any) -> str | None:
        from peft import LoraConfig

        if isinstance(adapter, LoraConfig) and getattr(adapter, "use_dora", False):
            # peft's DoRA divides its magnitude by the norm of FakeQuantizedLinear.weight, the full-precision weight,
            # while the layer computes with it rounded to int4: trained so, the converted int4 model computes other
            # logits than the one trained (max |Δlogit| 0.6 on the tiny Qwen2 with a random adapter; 0 under LoRA).
            return (
                "DoRA (use_dora) cannot train on a qat base, because peft normalises it by the full-precision weights, "
                "not the int4 ones its layers compute with: set use_dora to false or use quantization.mode nf4."
            )
        return super().adapter_refusal(adapter)

    # ----- training ---------------------------------------------------------------------------------------------------
    def base_config(self) -> Any:
        """torchao's post-training configuration the fake quantization simulates and the convert step applies."""
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerGroup

        group = PerGroup(self.group_size)
        if self.scheme == "int4_weight_only":
            return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=group)
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=group)

    def _targets(self, model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        """The decoder layers' ``nn.Linear`` projections (not ``lm_head``, not the embeddings, not ``skip_modules``)."""
        from qlit.models.layers import decoder_layers

        inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
        skip = tuple(self.spec.skip_modules or ())
        return {
            name: m
            for name, m in model.named_modules()
            if type(m) is torch.nn.Linear
            and id(m) in inside
            and not any(name == s or name.endswith("." + s) or f".{s}." in name for s in skip)
        }

    def convert(self, model: Any, *, has_adapter: bool) -> None:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        targets = self._targets(model)
        require_linear_layers(list(targets), model, self.spec.mode)
        for name, layer in targets.items():
            if layer.in_features % self.group_size:
                raise QlitError(
                    f"quantization.group_size {self.group_size} does not divide the {layer.in_features} inputs of "
                    f"'{name}': use a divisor of every projection's input size (e.g. 32)."
                )
        chosen = set(targets.values())
        quantize_(model, QATConfig(self.base_config(), step="prepare"), filter_fn=lambda m, _: m in chosen)

    def dequantized_weight(self, module: torch.nn.Module) -> torch.Tensor | None:
        from torchao.quantization.qat import FakeQuantizedLinear

        if not isinstance(module, FakeQuantizedLinear) or module.weight_fake_quantizer is None:
            return None
        with torch.no_grad():
            return module.weight_fake_quantizer(module.weight)

    # ----- after training ---------------------------------------------------------------------------------------------
    def finish_fit(
        self, model: Any, log_dir: Path, *, adapter_saved: bool, validation_loss: Callable[[Any], float | None]
    ) -> TrainedModel:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        fake = validation_loss(model)
        # In place: the fake-quantized layers become nn.Linear holding int4 weights (under LoRA, the base layers).
        quantize_(model, QATConfig(self.base_config(), step="convert"))
        converted = validation_loss(model)
        target = log_dir / CONVERTED_DIR
        with _without_adapter(model) as base:
            save_quantized(base, self.base_config(), target)
        what = f"{SCHEMES[self.scheme]}, groups of {self.group_size}"
        saved = f"base saved to {target} (the adapter loads onto it)" if adapter_saved else f"saved to {target}"
        if fake is None or converted is None:
            return TrainedModel(target, line=f"QAT: the model converted to {what}; {saved}.")
        metrics = {"qat/fake_quant_val_loss": fake, "qat/converted_val_loss": converted}
        line = (
            f"QAT: validation loss {converted:.4f} converted to {what}, against {fake:.4f} fake-quantized as "
            f"trained ({converted - fake:+.4f}); {saved}."
        )
        return TrainedModel(target, metrics, line)

    def check_export(self, adapter: str, *, dequantize: bool) -> None:
        if dequantize and self.scheme == "int8_dynamic_act_int4_weight":
            raise QlitError(
                f"Adapter '{adapter}' trained on a QAT base whose layers also quantize their activations to int8, "
                "which a plain transformers model cannot compute: pass --dequantize false to merge into the original "
                "full-precision weights instead."
            )

    def dequantize(self, model: Any) -> Any:
        # The weights the adapter trained against are the fake-quantized ones: each projection keeps its fake int4
        # weight as a plain nn.Linear (torchao's convert step without a base config only swaps the modules back).
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

        self.convert(model, has_adapter=True)
        for module in model.modules():
            if isinstance(module, FakeQuantizedLinear):
                with torch.no_grad():
                    module.weight.copy_(module.weight_fake_quantizer(module.weight))
        quantize_(model, QATConfig(step="convert"))
        return model


@contextmanager
def _without_adapter(model: Any) -> Iterator[Any]:
    """The Hugging Face model under a peft ``model`` with each adapted layer swapped back for its base layer, for as
    long as the block runs (``model`` itself when it has no adapter); the adapter layers are put back after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    swapped = [(name, m) for name, m in base.named_modules() if isinstance(m, BaseTunerLayer)]
    swapped = [(name, m) for name, m in swapped if not any(name.startswith(n + ".") for n, _ in swapped if n != name)]
    for name, layer in swapped:
        base.set_submodule(name, layer.get_base_layer())
    try:
        yield base
    finally:
        for name, layer in swapped:
            base.set_submodule(name, layer)
