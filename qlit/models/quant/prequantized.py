"""Checkpoints stored quantized: a ``config.json`` with a ``quantization_config`` loads as it is stored.

Two families are loaded as they are stored, and an adapter trains on them:

* **compressed-tensors** (llm-compressor's format, ``quant_method: compressed-tensors``): integer weights of 4 or 8
  bits with a scale per group or channel (and a zero point where asymmetric), packed into int32 (``pack-quantized``)
  or one per int8 (``naive-quantized``), activations left in 16 bits (W4A16, W8A16). Which algorithm chose the
  integers is not in ``quantization_config``: llm-compressor's ``recipe.yaml`` beside it names it (``GPTQModifier``,
  ``AWQModifier``), hence the modes ``gptq``, ``awq`` and ``compressed-tensors`` where no recipe says; ``bits`` is
  the checkpoint's.
  transformers leaves the packed tensors in each layer and de-compresses the whole model at its first forward pass
  (a hook of compressed-tensors), after which the base would take its full-precision size. qlit removes that hook
  and keeps the tensors as stored: each layer de-quantizes its weight for its matmul, and again in the backward pass
  (:class:`PackedLinear`, QLoRA's trade of compute for memory), so the base stays 4 bits a weight plus its scales.
* **bitsandbytes 4-bit** saved by transformers (``quant_method: bitsandbytes``, ``load_in_4bit``): bitsandbytes
  loads the stored NF4/FP4 blocks into its ``Linear4bit`` layers (modes ``bnb-nf4``, ``bnb-fp4``).

``quantization.mode: prequantized`` (or the default ``none``) takes whatever the checkpoint stores; naming another
mode than the checkpoint's is refused when the config is read. :func:`quantize_checkpoint` writes a compressed-tensors
checkpoint itself (GPTQ, Frantar et al. 2022; AWQ, Lin et al. 2023): llm-compressor, the library that does, pins an
older transformers, and the tiny offline models (``qlit-tiny/qwen2-gptq``) need one built on the CPU in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from qlit.errors import QlitError
from qlit.models.dtypes import to_dtype
from qlit.models.quant.base import QuantBackend
from qlit.models.quant.bitsandbytes import BitsAndBytes

#: The extra that installs what a compressed-tensors checkpoint needs.
EXTRA = "qlit[gptq]"
#: llm-compressor's record of how it quantized a checkpoint, beside its ``config.json``.
RECIPE_FILE = "recipe.yaml"
#: The modifier a recipe names → the algorithm (and mode) it stands for.
_ALGORITHMS = {"GPTQModifier": "gptq", "AWQModifier": "awq"}
#: The mode of integer weights whose checkpoint names no algorithm (a round-to-nearest quantization, or unrecorded).
UNNAMED = "compressed-tensors"
#: The bit widths of integer weights qlit trains on (llm-compressor's W4A16 and W8A16 schemes).
_BITS = (4, 8)
#: compressed-tensors' formats of integer weights that de-quantize per layer.
_INT_FORMATS = ("pack-quantized", "naive-quantized")


class Prequantized(QuantBackend):
    """``prequantized``: whatever quantization the checkpoint is stored in, found in its ``config.json`` when the
    config is read; the formats are served by the subclasses below."""

    modes: ClassVar[tuple[str, ...]] = ("prequantized",)
    labels: ClassVar[dict[str, str]] = {"prequantized": "pre-quantized"}
    #: LoRA on whatever the checkpoint stores (a study whose base names a GPTQ, AWQ or bitsandbytes checkpoint).
    strategies: ClassVar[dict[str, dict[str, Any]]] = {
        "lora-prequantized": {"mode": "prequantized", "double_quant": None, "lora": True}
    }
    needs_adapter: ClassVar[bool] = True
    kbit_training: ClassVar[bool] = True
    stored_format: ClassVar[bool] = True
    adopts_stored: ClassVar[bool] = True
    has_original: ClassVar[bool] = False  # the checkpoint holds its quantized weights only

    @classmethod
    def technique_label(cls, mode: str, adapter: str | None, **label_args: Any) -> str | None:
        if adapter == "LoraConfig":
            return f"{cls.base_label(mode)} + LoRA"
        return super().technique_label(mode, adapter, **label_args)

    def load_kwargs(self, device: torch.device) -> dict[str, Any]:
        # The checkpoint's own quantization_config is used as it is; the whole model goes onto this process's device.
        return {"device_map": {"": device}}

    def check_export(self, adapter: str, *, dequantize: bool) -> None:
        if not dequantize:
            raise QlitError(
                f"Adapter '{adapter}' trained on a checkpoint stored quantized ({self.base_label(self.spec.mode)}), "
                "which holds no full-precision weights to merge into: leave --dequantize true (the weights it trained "
                "against), or pass --base with the unquantized original and --quantization.mode none."
            )


class CompressedTensors(Prequantized):
    """Integer weights in compressed-tensors' format (GPTQ, AWQ or round-to-nearest), kept packed in training."""

    modes: ClassVar[tuple[str, ...]] = ("gptq", "awq", UNNAMED)
    labels: ClassVar[dict[str, str]] = {"gptq": "GPTQ", "awq": "AWQ", UNNAMED: "compressed-tensors int"}
    adopts_stored: ClassVar[bool] = False
    #: ``bits`` is the checkpoint's (filled in when the config is read; a different value is refused).
    options: ClassVar[tuple[str, ...]] = ("bits",)

    @classmethod
    def base_label(
        cls, mode: str, *, double_quant: bool | None = None, bits: int | None = None, scheme: str | None = None
    ) -> str:
        if bits is None:
            return cls.labels.get(mode, mode)
        return f"W{bits}A16" if mode == UNNAMED else f"{cls.labels.get(mode, mode)} {bits}-bit"

    @classmethod
    def technique_label(cls, mode: str, adapter: str | None, **label_args: Any) -> str | None:
        if adapter == "LoraConfig":
            return f"{cls.base_label(mode, bits=label_args.get('bits'))} + LoRA"
        return super().technique_label(mode, adapter, **label_args)

    def check_options(self) -> None:
        bits = self.spec.bits
        if bits is not None and bits not in _BITS:
            raise QlitError(
                f"quantization.bits {bits} is not a width qlit trains {self.spec.mode} weights in: use "
                f"{' or '.join(map(str, _BITS))} (or leave it out: the checkpoint's)."
            )

    @classmethod
    def stored_spec(cls, stored: Mapping[str, Any], *, name: str, read_file: Callable[[str], str | None]) -> Any:
        method = stored.get("quant_method")
        if method in ("gptq", "awq"):
            raise QlitError(
                f"Model '{name}' is stored in Auto{method.upper()}'s format (quant_method {method}), whose kernels "
                "qlit does not load: use a compressed-tensors checkpoint of it (llm-compressor's format), or its "
                "unquantized original with a quantization.mode."
            )
        if method != "compressed-tensors":
            return None
        require_compressed_tensors(name)
        groups = stored.get("config_groups") or {}
        if not groups:
            raise QlitError(f"Model '{name}' has a compressed-tensors quantization_config without config_groups.")
        bits = set()
        for group in groups.values():
            weights = group.get("weights") or {}
            if group.get("input_activations") or group.get("output_activations"):
                raise QlitError(
                    f"Model '{name}' is stored with quantized activations too (compressed-tensors scheme with "
                    "input_activations), which training through de-quantized weights would not compute: qlit "
                    "trains weight-only checkpoints (W4A16, W8A16)."
                )
            fmt = group.get("format") or stored.get("format")
            if weights.get("type") != "int" or weights.get("num_bits") not in _BITS or fmt not in _INT_FORMATS:
                raise QlitError(
                    f"Model '{name}' stores {weights.get('type')} weights of {weights.get('num_bits')} bits in "
                    f"compressed-tensors' {fmt} format: qlit trains int weights of 4 or 8 bits "
                    f"({' or '.join(_INT_FORMATS)})."
                )
            bits.add(weights["num_bits"])
        if len(bits) > 1:
            raise QlitError(
                f"Model '{name}' mixes {' and '.join(map(str, sorted(bits)))}-bit weights: qlit trains one."
            )
        (width,) = bits
        recipe = read_file(RECIPE_FILE) or ""
        algorithm = next((alg for key, alg in _ALGORITHMS.items() if key in recipe), None)
        return {"mode": algorithm or UNNAMED, "bits": width}

    def load_kwargs(self, device: torch.device) -> dict[str, Any]:
        require_compressed_tensors(self.spec.mode)
        _quiet_compressed_tensors()
        return super().load_kwargs(device)

    def after_load(self, model: Any, device: torch.device) -> Any:
        keep_packed(model, to_dtype(self.spec.compute_dtype))
        return model

    def dequantized_weight(self, module: torch.nn.Module) -> torch.Tensor | None:
        return module.weight if isinstance(module, PackedLinear) else None

    def packed_layers(self, model: Any) -> list[Any]:
        from qlit.models.quant.base import PackedLayer

        # Every stored tensor of a packed layer stands for its (out, in) weight: the integers, their scales and the
        # shape compressed-tensors records beside them.
        return [
            PackedLayer(
                packed=tuple(p for name, p in m.named_parameters(recurse=False) if name.startswith("weight_")),
                numel=m.in_features * m.out_features,
                hidden=(),
            )
            for m in model.modules()
            if isinstance(m, PackedLinear)
        ]

    def dequantize(self, model: Any) -> Any:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, PackedLinear):
                    setattr(parent, child_name, child.dense())
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # the config no longer says compressed-tensors: a plain model
            quantizer.remove_quantization_config(model)
        return model


class StoredBitsAndBytes(Prequantized, BitsAndBytes):
    """A bitsandbytes 4-bit checkpoint saved by transformers: its NF4/FP4 blocks load into ``Linear4bit`` as stored."""

    modes: ClassVar[tuple[str, ...]] = ("bnb-nf4", "bnb-fp4")
    labels: ClassVar[dict[str, str]] = {"bnb-nf4": "pre-quantized NF4", "bnb-fp4": "pre-quantized FP4"}
    adopts_stored: ClassVar[bool] = False
    packs_weights: ClassVar[bool] = True  # two 4-bit weights to a byte

    @classmethod
    def technique_label(cls, mode: str, adapter: str | None, **label_args: Any) -> str | None:
        if adapter == "LoraConfig":
            return f"QLoRA ({cls.base_label(mode)})"
        return super().technique_label(mode, adapter, **label_args)

    @classmethod
    def stored_spec(cls, stored: Mapping[str, Any], *, name: str, read_file: Callable[[str], str | None]) -> Any:
        if stored.get("quant_method") != "bitsandbytes":
            return None
        if not (stored.get("load_in_4bit") or stored.get("_load_in_4bit")):
            raise QlitError(
                f"Model '{name}' is stored in bitsandbytes' 8-bit format, which qlit does not load as stored: use its "
                "unquantized original with quantization.mode int8, or a 4-bit checkpoint."
            )
        return {"mode": f"bnb-{stored.get('bnb_4bit_quant_type', 'fp4')}"}


# ----- the packed layer -----------------------------------------------------------------------------------------------
def require_compressed_tensors(name: str) -> None:
    """One sentence naming the extra where compressed-tensors is not installed."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise QlitError(
            f"Model '{name}' is stored in compressed-tensors' format, which needs the compressed-tensors package: "
            f"pip install '{EXTRA}'."
        ) from None


class PackedLinear(torch.nn.Linear):
    """A linear layer whose weight stays as compressed-tensors stores it (``weight_packed``, ``weight_scale``, ...).

    ``weight`` is the de-quantized ``(out, in)`` weight in the compute dtype, made on each read: what peft, DoRA, a
    merge and the fidelity callback see. The forward pass makes it for the matmul and drops it; the backward pass
    makes it again for the input's gradient (:class:`_DequantizedMatmul`), so no full-precision copy outlives a layer.
    """

    compute_dtype: torch.dtype
    quantization_scheme: Any

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # computed, not a stored parameter
        from compressed_tensors.compressors import BaseCompressor

        scheme = self.quantization_scheme
        compressor = BaseCompressor.get_value_from_registry(str(scheme.format.value))
        state = {name: p for name, p in self.named_parameters(recurse=False) if name.startswith("weight_")}
        return compressor.decompress(state, scheme)["weight"].to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantizedMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def dense(self) -> torch.nn.Linear:
        """A plain ``nn.Linear`` holding the weight this layer computes with (what a merge writes)."""
        weight = self.weight
        linear = torch.nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)


class _DequantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` with ``W`` de-quantized in the forward pass and again in the backward pass, never saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.weight, None


def keep_packed(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Make the packed linear layers of a model transformers loaded from a compressed-tensors checkpoint compute from
    their stored tensors (:class:`PackedLinear`), instead of de-compressing the whole model at its first forward
    pass; other quantized modules (embeddings) are de-compressed. The stored tensors are frozen. How many layers."""
    from compressed_tensors.compressors.base import decompress_module

    hook = getattr(model, "ct_decompress_hook", None)
    if hook is not None:
        hook.remove()
        del model.ct_decompress_hook
    packed = 0
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        if type(module) is torch.nn.Linear:
            module.__class__ = PackedLinear
            module.compute_dtype = compute_dtype
            packed += 1
        elif not isinstance(module, PackedLinear):
            decompress_module(module)
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
    return packed


def _quiet_compressed_tensors() -> None:
    # compressed-tensors draws a progress bar over every quantized layer while transformers loads (and again when it
    # compresses), and logs through loguru: a qlit run's console holds qlit's lines.
    import compressed_tensors.compressors.model_compressors.model_compressor as compressor_module
    import compressed_tensors.quantization.lifecycle.apply as apply_module
    from loguru import logger

    for module in (compressor_module, apply_module):
        module.tqdm = _no_bar  # type: ignore[attr-defined]
    logger.disable("compressed_tensors")


def _no_bar(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    return iterable


# ----- writing a checkpoint -----------------------------------------------------------------------------------------
#: The methods :func:`quantize_checkpoint` offers. Both write symmetric groups (llm-compressor's W4A16): the
#: asymmetric variant's zero points (W4A16_ASYM, AWQ's own default) are packed on disk, and compressed-tensors 0.20
#: lays out unpacked ones when transformers prepares the model, so that such a checkpoint does not load.
METHODS = ("gptq", "awq")


def quantize_checkpoint(
    source: str | Path,
    target: str | Path,
    *,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 32,
    calibration_rows: int = 64,
    max_length: int = 64,
    dampening: float = 0.01,
    device: str | torch.device = "cpu",
) -> Path:
    """Quantize the Llama-style model in ``source`` (``save_pretrained`` format) and write it to ``target`` as
    compressed-tensors writes it (``pack-quantized``, a ``quantization_config`` and llm-compressor's ``recipe.yaml``),
    for transformers' ``CompressedTensorsHfQuantizer`` to load. ``target`` may be ``source``.

    Every ``nn.Linear`` but ``lm_head`` is quantized, decoder layer after decoder layer, each on the activations of the
    layers before it already quantized, over the first ``calibration_rows`` sentences of the bundled SST-2 sample.

    Args:
        source: the model directory (with its tokenizer).
        target: where to write the quantized model and the tokenizer.
        method: ``gptq`` (Hessian-based column-wise rounding with error feedback) or ``awq`` (activation-aware
            per-channel scales folded into the previous norm or layer, then round-to-nearest), in symmetric groups.
        bits: 4 or 8 bits per weight.
        group_size: weights sharing one scale along the input dimension; it must divide every layer's input size.
        calibration_rows: sentences of the calibration set.
        max_length: tokens per calibration sentence at most.
        dampening: GPTQ's dampening, a fraction of the Hessian's mean diagonal added to it.
        device: where the model is calibrated and its weights rounded (``cuda`` for a large model: GPTQ rounds one
            column at a time); it is written from the CPU.

    Returns:
        ``target``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method not in METHODS:
        raise QlitError(f"Unknown quantization method '{method}': use one of {', '.join(METHODS)}.")
    if bits not in _BITS:
        raise QlitError(f"bits must be one of {', '.join(map(str, _BITS))}, got {bits}.")
    require_compressed_tensors(str(source))
    _quiet_compressed_tensors()
    source, target = Path(source), Path(target)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval().to(device)
    layers = _decoder_layers(model, str(source))
    for layer in layers:
        for name, linear in _linears(layer):
            if linear.in_features % group_size:
                raise QlitError(f"group_size {group_size} does not divide {name}'s {linear.in_features} inputs.")
    batch = {key: value.to(device) for key, value in _calibration(tokenizer, calibration_rows, max_length).items()}
    qparams: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for layer in layers:
            if method == "awq":
                _awq_scale(model, layer, batch, bits, group_size)
                inputs = {}
            else:
                inputs = _hessians(model, layer, batch)
            for _, linear in _linears(layer):
                if method == "gptq":
                    weight, scale, zero = _gptq(linear.weight, inputs[linear], bits, group_size, dampening)
                else:
                    scale, zero = _qparams(linear.weight, bits, group_size, symmetric=True)
                    weight = _fake_quantize(linear.weight, scale, zero, bits, group_size)
                linear.weight.copy_(weight)
                qparams[linear] = (scale.cpu(), zero.cpu())
    model.to("cpu")
    _save_compressed(model, qparams, target, method=method, bits=bits, group_size=group_size)
    if target != source:
        tokenizer.save_pretrained(target)
    return target


def _decoder_layers(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers):
        raise QlitError(
            f"Model '{name}' is not a Llama-style decoder (model.layers with self_attn and mlp): compressed-tensors "
            "quantizes nn.Linear layers, which GPT-2's Conv1D layers are not."
        )
    return list(layers)


def _linears(layer: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, module


def _calibration(tokenizer: Any, rows: int, max_length: int) -> dict[str, torch.Tensor]:
    from qlit.paths import SAMPLES_DIR

    lines = (SAMPLES_DIR / "sst2" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    sentences = [json.loads(line)["sentence"] for line in lines if line.strip()][:rows]
    pad = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.pad_token = pad
    return dict(tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=max_length))


def _capture(
    model: torch.nn.Module, modules: list[torch.nn.Module], batch: dict[str, torch.Tensor]
) -> dict[torch.nn.Module, torch.Tensor]:
    """The inputs each of ``modules`` sees over the calibration batch (padding left out), as ``(tokens, in)``."""
    seen: dict[torch.nn.Module, torch.Tensor] = {}
    keep = batch["attention_mask"].bool().reshape(-1)

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen[module] = args[0].reshape(-1, args[0].shape[-1])[keep].float()

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _hessians(
    model: torch.nn.Module, layer: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> dict[torch.nn.Module, torch.Tensor]:
    """GPTQ's ``H = 2 XᵀX / n`` of each linear layer of ``layer``, over the inputs it sees with the layers before it
    quantized."""
    inputs = _capture(model, [m for _, m in _linears(layer)], batch)
    return {m: 2 * x.T @ x / x.shape[0] for m, x in inputs.items()}


def _qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' min-max scale and zero point of each group of ``w``'s columns: ``(out, in / group_size)``."""
    qmin, qmax = _qrange(bits)
    groups = w.reshape(w.shape[0], -1, group_size)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(hi, -lo) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = (qmin - torch.round(lo / scale.clamp(min=1e-12))).clamp(qmin, qmax)
    return scale.clamp(min=1e-8), zero


def _fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """``w`` rounded to its grid and de-quantized (what the stored integers stand for)."""
    qmin, qmax = _qrange(bits)
    s, z = scale.repeat_interleave(group_size, 1), zero.repeat_interleave(group_size, 1)
    return (torch.clamp(torch.round(w / s) + z, qmin, qmax) - z) * s


def _gptq(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, dampening: float, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022) on one ``(out, in)`` weight: columns are rounded one at a time, left to right, and
    each one's rounding error is spread over the columns not yet rounded through the inverse Hessian's Cholesky factor
    (the optimal update of the OBS framework); a group's scale is taken when its first column is reached, from the
    columns as updated so far. Returns the de-quantized weight and each group's scale and zero point."""
    w = weight.detach().clone().float()
    h = hessian.clone()
    columns = w.shape[1]
    dead = torch.diag(h) == 0  # inputs that are always zero: any value computes the same
    h[dead, dead] = 1
    w[:, dead] = 0
    h += dampening * torch.mean(torch.diag(h)) * torch.eye(columns, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmin, qmax = _qrange(bits)
    scales = torch.zeros(w.shape[0], columns // group_size, device=w.device)
    zeros = torch.zeros_like(scales)
    quantized = torch.zeros_like(w)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w1, err = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start, device=w.device)
        h1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:
                g = col // group_size
                span = w1[:, i : i + group_size] if i + group_size <= end - start else w[:, col : col + group_size]
                scale, zero = _qparams(span, bits, group_size, symmetric=True)
                scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
            s, z = scales[:, col // group_size], zeros[:, col // group_size]
            q = (torch.clamp(torch.round(w1[:, i] / s) + z, qmin, qmax) - z) * s
            quantized[:, col] = q
            e = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, end:] -= err @ hinv[start:end, end:]
    return quantized.to(weight.dtype), scales, zeros


def _awq_scale(
    model: torch.nn.Module, layer: Any, batch: dict[str, torch.Tensor], bits: int, group_size: int, grid: int = 20
) -> None:
    """AWQ (Lin et al. 2023) on one decoder layer: each group of linear layers that reads one input gets per-input-
    channel scales ``s = mean|x|^α`` (α searched on a grid for the least output error once quantized); the weights are
    multiplied by ``s`` and the norm or layer that produces the input divided by it, so the float model computes the
    same and the salient channels are rounded more finely."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [
        (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
        (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
        (mlp.up_proj, [mlp.down_proj]),
    ]
    if attn.v_proj.out_features == attn.o_proj.in_features:  # without grouped-query attention
        groups.append((attn.v_proj, [attn.o_proj]))
    for previous, linears in groups:
        x = _capture(model, [linears[0]], batch)[linears[0]]
        magnitude = x.abs().mean(0)
        reference = [x @ m.weight.T for m in linears]
        best, best_error = torch.ones_like(magnitude), float("inf")
        for step in range(grid):
            s = magnitude.pow(step / grid).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            error = 0.0
            for m, ref in zip(linears, reference, strict=True):
                scaled = m.weight * s
                scale, zero = _qparams(scaled, bits, group_size, symmetric=True)
                error += float(((x / s) @ _fake_quantize(scaled, scale, zero, bits, group_size).T - ref).pow(2).mean())
            if error < best_error:
                best, best_error = s, error
        for m in linears:
            m.weight.mul_(best)
        if isinstance(previous, torch.nn.Linear):
            previous.weight.div_(best.unsqueeze(1))
            if previous.bias is not None:
                previous.bias.div_(best)
        else:  # an RMSNorm's gain
            previous.weight.div_(best)


def _save_compressed(
    model: torch.nn.Module,
    qparams: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]],
    target: Path,
    *,
    method: str,
    bits: int,
    group_size: int,
) -> None:
    import yaml
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        scale, zero = qparams[module]  # every linear layer of the decoder was quantized above
        module.weight_scale.data.copy_(scale)
        module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))
    # compressed-tensors re-quantizes each de-quantized weight with its scale and zero point: the same integers.
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(str(target))
    modifier = {alg: key for key, alg in _ALGORITHMS.items()}[method]
    recipe = {
        modifier: {
            "targets": ["Linear"],
            "ignore": ["lm_head"],
            "scheme": f"W{bits}A16",
        }
    }
    (target / RECIPE_FILE).write_text(yaml.safe_dump({"default_stage": {"default_modifiers": recipe}}))
