"""What a run's config amounts to, in a study's words: its columns (model, quantization, adapter, rank, task) and
the name of its technique (``QLoRA (NF4 + DQ)``, ``IA3 on 8-bit``, ``full fine-tuning (fp32)``).

How a quantization mode names its base and its techniques is its backend's (:mod:`qlit.models.quant`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qlit.naming import adapter_name

if TYPE_CHECKING:
    from qlit.models.quant import QuantBackend


def describe_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The study's columns of a run's config (a resolved ``config.yaml``, or a sweep cell's merged config).

    ``pretrained``, ``quantization`` (its mode), ``double_quant``, ``adapter`` (named as
    ``QLitModule.study_hparams`` names it), ``rank`` (LoRA, LoHa and LoKr's ``r``, AdaLoRA's ``target_r``) and
    ``task`` (the DataModule without its suffix, and its dataset: ``SST2 (qlit-samples/sst2)``). A key the config
    does not settle is ``None``; ``bits`` and ``scheme`` (the quantization's, for the modes that offer several) are
    there when set.
    """
    model = config.get("model")
    init = model.get("init_args", model) if isinstance(model, Mapping) else None
    out: dict[str, Any] = {"task": _task_name(config.get("data"))}
    if not isinstance(init, Mapping):
        return out
    quantization = init.get("quantization")
    adapter = init.get("adapter")
    rank = None
    if isinstance(adapter, Mapping):
        config_class = str(adapter.get("class_path", "")).rsplit(".", 1)[-1]
        options = adapter.get("init_args") or {}
        name = adapter_name(config_class, options, None) if config_class else None
        rank = options.get("target_r" if config_class == "AdaLoraConfig" else "r")
    elif "adapter" in init:
        name = adapter_name(None, {}, init.get("adapter_path"))
    else:
        name = None
    mode = quantization.get("mode", "none") if isinstance(quantization, Mapping) else None
    double_quant = quantization.get("double_quant") if isinstance(quantization, Mapping) else None
    bits = quantization.get("bits") if isinstance(quantization, Mapping) else None
    scheme = quantization.get("scheme") if isinstance(quantization, Mapping) else None
    backend = _backend(mode) if mode is not None else None
    if backend is not None and double_quant is None:  # QLoRA's default: on for the 4-bit modes
        double_quant = backend.is_4bit
    dtype = init.get("dtype")
    if backend is not None and backend.quantized and isinstance(quantization, Mapping):
        dtype = quantization.get("compute_dtype", dtype)
    return {
        **out,
        "pretrained": init.get("pretrained"),
        "quantization": mode,
        "double_quant": double_quant,
        "compute_dtype": dtype,
        "adapter": name,
        "rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        **({"bits": bits} if isinstance(bits, int) else {}),
        **({"scheme": scheme} if isinstance(scheme, str) else {}),
    }


def _task_name(data: Any) -> str | None:
    if not isinstance(data, Mapping) or not data.get("class_path"):
        return None
    name = str(data["class_path"]).rsplit(".", 1)[-1].removesuffix("DataModule")
    init = data.get("init_args") or {}
    source = init.get("path") if isinstance(init, Mapping) else None
    if isinstance(source, str) and source in ("json", "csv", "parquet", "text"):  # local files: name the first one
        files = init.get("data_files")
        first = next(iter(files.values()), None) if isinstance(files, Mapping) else files
        source = first[0] if isinstance(first, list) and first else first
    return f"{name} ({source})" if source else name


_METHODS = {
    "LoraConfig": "LoRA",
    "LoraConfig+dora": "DoRA",
    "LoraConfig+rslora": "rsLoRA",
    "LoraConfig+dora+rslora": "DoRA (rsLoRA scaling)",
    "AdaLoraConfig": "AdaLoRA",
    "IA3Config": "IA3",
    "LoHaConfig": "LoHa",
    "LoKrConfig": "LoKr",
    "PromptTuningConfig": "prompt tuning",
    "PrefixTuningConfig": "prefix tuning",
    "PromptEncoderConfig": "P-tuning",
    "loaded": "trained adapter",
}
#: How a LoRA that does not start as peft's default is named (``LoraConfig+pissa``: PiSSA).
_INITS = {
    "gaussian": "LoRA (Gaussian init)",
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "eva": "EVA",
    "corda": "CorDA",
    "loftq": "LoftQ",
}


def _method(adapter: str | None) -> str:
    """The adapter's method as a study names it: ``LoRA``, ``DoRA``, ``PiSSA``, ``LoftQ (rsLoRA)``, ``IA3``, ..."""
    name = adapter or ""
    start, _, init = name.rpartition("+")
    if name not in _METHODS and start in _METHODS and init in _INITS:
        method = _METHODS[start]
        return _INITS[init] if method == "LoRA" else f"{_INITS[init]} ({method})"
    return _METHODS.get(name, (adapter or "?").removesuffix("Config"))


def technique(
    quantization: str | None,
    adapter: str | None,
    double_quant: bool | None = None,
    dtype: str | None = None,
    bits: int | None = None,
    scheme: str | None = None,
) -> str | None:
    """The technique a run stands for, as a study names it: ``QLoRA (NF4 + DQ)``, ``8-bit + LoRA``, ``IA3 on NF4``,
    ``full fine-tuning (fp32)``, ``BitNet b1.58``, ``HQQ 2-bit + LoRA``, ``torchao int8 + LoRA`` (``bits``,
    ``scheme``: the quantization's, where its mode offers several); ``None`` where neither the quantization nor the
    adapter is known.

    The quantization's backend names the base and the techniques it has names for; the rest is the adapter's method
    on that base.
    """
    if quantization is None and adapter is None:
        return None
    mode = quantization or "none"
    backend = _backend(mode)
    # A run's record may hold anything; TensorBoard's hparams give a whole number back as a float (4.0).
    bits = int(bits) if isinstance(bits, (int, float)) and not isinstance(bits, bool) and bits == int(bits) else None
    scheme = scheme if isinstance(scheme, str) else None
    named = backend.technique_label(mode, adapter, double_quant=double_quant, dtype=dtype, bits=bits, scheme=scheme)
    if named is not None:
        return named
    base = backend.base_label(mode, double_quant=double_quant, bits=bits, scheme=scheme)
    method = _method(adapter)
    return f"{method} on {base}" if base else method


def _backend(mode: object) -> type[QuantBackend]:
    # Imported here: reading runs (``qlit board``) needs no PyTorch, which the backends import.
    from qlit.models.quant import described_backend

    return described_backend(mode)
