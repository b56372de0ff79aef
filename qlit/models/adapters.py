"""Which peft methods qlit can train on which base: refused pairs fail before any weight is loaded.

Every peft method is passed by ``class_path`` and applied by peft itself. This module knows only the settings that
peft 0.22 + bitsandbytes 0.50 accept when the adapter is built and then break in the first training steps, or refuse
only after the weights have loaded; each was found by training the tiny models (``tests/models/test_adapters.py``
trains every supported pair of the support matrix in docs/quantization.md and checks that each refused pair still
fails in peft). The
refusals that depend on how the base is stored are its quantization backend's (``QuantBackend.adapter_refusal``).

A new LoRA adapter starts as its ``init_lora_weights`` says (:func:`start_adapter`): peft's default, PiSSA, OLoRA,
EVA, CorDA or LoftQ, each where its base can hold it (``QuantBackend.lora_inits``), refused elsewhere with the reason
when the config is read. EVA and CorDA read the DataModule's first training rows; a start that rewrites the base
weights (PiSSA, OLoRA, CorDA) is saved converted, as an adapter on the original base.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch

from qlit.errors import QlitError
from qlit.models.loading import is_hub_id
from qlit.models.quant import QuantBackend
from qlit.models.quantization import Quantization
from qlit.paths import QLIT_BASE_FILE

_CAUSAL_LM = "CAUSAL_LM"


def _accept_every_pissa_niter() -> None:
    # peft types init_lora_weights as a Literal that names "pissa_niter_[number of iters]" literally, so a parser that
    # checks Literals (jsonargparse) refuses every real pissa_niter_<n> and lists values qlit does not run:
    # check_adapter checks the value instead, in one sentence.
    loosened = "bool | str"
    peft.LoraConfig.__dataclass_fields__["init_lora_weights"].type = loosened
    peft.LoraConfig.__annotations__["init_lora_weights"] = loosened
    peft.LoraConfig.__init__.__annotations__["init_lora_weights"] = loosened


_accept_every_pissa_niter()


def check_adapter(adapter: Any, quantization: Quantization, *, gradient_checkpointing: bool = False) -> None:
    """Refuse an adapter/quantization pair that peft cannot train, in one sentence that says why.

    Args:
        adapter: a peft config (``peft.LoraConfig``, ``peft.PrefixTuningConfig``, ...).
        quantization: how the base weights will be stored.
        gradient_checkpointing: whether activations will be recomputed in the backward pass.
    """
    reason = _unsupported_reason(adapter, quantization, gradient_checkpointing=gradient_checkpointing)
    if reason is not None:
        raise QlitError(reason)


def _unsupported_reason(adapter: Any, quantization: Quantization, *, gradient_checkpointing: bool) -> str | None:
    """Why ``adapter`` cannot train on a base stored as ``quantization`` (one sentence), or ``None`` if it can."""
    from peft import PrefixTuningConfig, PromptLearningConfig

    name = type(adapter).__name__
    task_type = getattr(adapter, "task_type", None)
    if task_type is not None and task_type != _CAUSAL_LM:
        return f"{name}.task_type is '{task_type}', but qlit trains causal LMs: set task_type to CAUSAL_LM."
    if isinstance(adapter, PromptLearningConfig) and task_type is None:
        # Only PeftModelForCausalLM prepends the virtual tokens; the generic PeftModel fails with a bare KeyError.
        return f"{name} needs task_type CAUSAL_LM so that peft prepends its virtual tokens: set task_type: CAUSAL_LM."
    if isinstance(adapter, PrefixTuningConfig) and gradient_checkpointing:
        # peft refuses this pair itself, but only in get_peft_model, after the weights have loaded.
        return "PrefixTuningConfig does not work with gradient checkpointing: set gradient_checkpointing to false."
    return _init_refusal(adapter, quantization.backend) or quantization.backend.adapter_refusal(adapter)


def adapter_base(adapter_path: str) -> str | None:
    """The base model the adapter in ``adapter_path`` (peft format) was trained on, or ``None`` if unrecorded.

    qlit writes its record, ``qlit_base.json``, beside every adapter it saves. For an adapter trained elsewhere,
    peft's ``base_model_name_or_path`` counts when it is a hub id: a path there names a folder on the machine the
    adapter was trained on, which says nothing about this one.
    """
    path = Path(adapter_path).expanduser()
    if path.is_file():
        raise QlitError(
            f"model.adapter_path '{adapter_path}' is a file, not an adapter directory (peft format): a checkpoint "
            "is loaded with --ckpt_path."
        )
    if not (path / "adapter_config.json").is_file():
        raise QlitError(f"model.adapter_path '{adapter_path}' holds no adapter_config.json (peft format).")
    record = path / QLIT_BASE_FILE
    if record.is_file():
        return _read_json(record).get("pretrained") or None
    name = _read_json(path / "adapter_config.json").get("base_model_name_or_path")
    return name if isinstance(name, str) and is_hub_id(name) else None


def check_adapter_storage(adapter_path: str, quantization: Quantization) -> None:
    """Refuse an adapter trained on a checkpoint stored quantized (GPTQ, AWQ, ...) for a base stored otherwise: it
    learned to correct that checkpoint's rounding, and its weights load onto any other base without an error.

    Args:
        adapter_path: the adapter directory (peft format), with the ``qlit_base.json`` qlit writes beside it.
        quantization: how the base it is loaded onto is stored.
    """
    from qlit.models.quant import described_backend

    record = Path(adapter_path).expanduser() / QLIT_BASE_FILE
    stored = (_read_json(record).get("quantization") or {}) if record.is_file() else {}
    trained = {key: stored.get(key) for key in ("mode", "bits")}
    here = {"mode": quantization.mode, "bits": quantization.bits}
    if described_backend(trained["mode"]).stored_format and trained != here:
        raise QlitError(
            f"model.adapter_path '{adapter_path}' was trained on a checkpoint stored as quantization.mode "
            f"{trained['mode']} (bits {trained['bits']}), but this base is stored as mode {here['mode']} (bits "
            f"{here['bits']}): load it onto the checkpoint it was trained on."
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QlitError(f"'{path}' cannot be read as JSON ({str(err).splitlines()[0]}).") from None
    if not isinstance(value, dict):
        raise QlitError(f"'{path}' holds a JSON {type(value).__name__}, not an object.")
    return value


def load_adapter(
    model: Any, adapter_path: str | Path, pretrained: str, *, what: str | None = None, is_trainable: bool = True
) -> Any:
    """``model`` with the trained adapter in ``adapter_path`` loaded onto it; one sentence if its weights file is
    unreadable or it does not fit (modules the base lacks or lacks weights for, or weights of other shapes).

    Args:
        model: the base.
        adapter_path: the adapter directory (peft format).
        pretrained: the base's name, for the sentence.
        what: how the sentence names the adapter (``None``: ``model.adapter_path '...'``).
        is_trainable: load it for training (else frozen, for inference or a merge).
    """
    import warnings

    from peft import PeftModel

    from qlit.checkpoint_io import adapter_misfit, adapter_weight_names

    what = what or f"model.adapter_path '{adapter_path}'"
    path = str(Path(adapter_path).expanduser())
    _read_json(Path(path) / "adapter_config.json")
    names = adapter_weight_names(path, what)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found missing adapter keys")  # adapter_misfit says it below
            peft_model = PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        raise QlitError(f"{what} does not fit base '{pretrained}': {_reason(err)}") from None
    misfit = adapter_misfit(peft_model, names)
    if misfit is not None:
        raise QlitError(f"{what} does not fit base '{pretrained}': {misfit}.")
    return peft_model


def _reason(err: BaseException) -> str:
    """The line of a peft/torch loading error that names the mismatch (torch puts it after a header line)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    named = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    reason = (named or lines or [type(err).__name__])[0]
    reason = reason.split(". Please ")[0]  # peft's advice to check the target modules: the sentence says it
    return reason if reason.endswith(".") else reason + "."


# ----- how a new LoRA adapter starts ----------------------------------------------------------------------------------
#: The ``init_lora_weights`` values qlit runs, as a config writes them.
LORA_INITS = ("true", "false", "gaussian", "pissa", "pissa_niter_<n>", "olora", "eva", "corda", "loftq")
_FIELD = "model.init_args.adapter.init_args.init_lora_weights"
_PISSA_NITER = re.compile(r"pissa_niter_\d+")
#: The families whose start moves part of each weight into the adapter and leaves the residual in the base: the
#: adapter saved at the end of ``fit`` is converted to apply to the original base (peft's
#: ``path_initial_model_for_weight_conversion``).
REWRITES_BASE = ("pissa", "olora", "corda")
#: What each family needs of the base, for the sentence that refuses it on a base that lacks it.
_NEEDS = {
    "pissa": "PiSSA moves each weight's principal singular components into the adapter and writes the residual into "
    "the base weights",
    "olora": "OLoRA moves each weight's orthonormal (QR) part into the adapter and writes the residual into the base "
    "weights",
    "corda": "CorDA decomposes the full-precision weights with their inputs' covariance and writes the residual into "
    "the base weights",
    "loftq": "LoftQ starts the adapter at the base's 4-bit quantization error, read against the checkpoint's weights",
    "eva": "EVA was not checked on this base's layers",
}
#: Training rows a data-driven start (EVA, CorDA) reads, at most: CorDA's authors find 256 samples enough.
CALIBRATION_ROWS = 256
#: EVA's batches, and its passes over them before its SVD must have settled.
_EVA_BATCHES, _EVA_PASSES = 16, 4


def _init_family(value: object) -> str | None:
    """The family of an ``init_lora_weights`` value (``default``, ``pissa``, ...), or ``None`` if qlit runs none."""
    # false: peft's random start of both factors (the adapter is not the identity at step 0), nothing else changes.
    if isinstance(value, bool) or value == "gaussian":
        return "default"
    if value == "pissa" or (isinstance(value, str) and _PISSA_NITER.fullmatch(value)):
        return "pissa"
    return value if value in ("olora", "eva", "corda", "loftq") else None


def _shown(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else f"'{value}'"


def lora_init(adapter: Any) -> str:
    """How a new adapter starts: the family of a ``peft.LoraConfig``'s ``init_lora_weights`` (``default``,
    ``pissa``, ``olora``, ``eva``, ``corda``, ``loftq``), ``default`` for any other peft method."""
    from peft import LoraConfig

    if type(adapter) is not LoraConfig:  # AdaLoRA's own start ignores the field (check_adapter refuses a value)
        return "default"
    family = _init_family(adapter.init_lora_weights)
    if family is None:
        raise QlitError(_init_refusal(adapter, None) or "")
    return family


def _init_refusal(adapter: Any, backend: QuantBackend | None) -> str | None:
    """Why ``adapter`` cannot start as its ``init_lora_weights`` says on ``backend``'s base (one sentence)."""
    from peft import LoraConfig

    if not isinstance(adapter, LoraConfig):
        return None
    value = adapter.init_lora_weights
    family, shown = _init_family(value), _shown(value)
    if family is None:
        return f"{_FIELD} {shown} is no LoRA initialisation qlit runs: use one of {', '.join(LORA_INITS)}."
    if family == "default":
        return None
    if type(adapter) is not LoraConfig:
        return f"{_FIELD} {shown} starts peft.LoraConfig only, not {type(adapter).__name__}: leave it at true."
    if adapter.use_dora:
        # DoRA's magnitude vector is the norm of the base weight plus the adapter's start, computed when peft builds
        # the layer: a start set afterwards, or a residual base, leaves it stale.
        return f"{_FIELD} {shown} cannot start DoRA (use_dora): set use_dora to false, or init_lora_weights to true."
    if family in REWRITES_BASE and adapter.use_rslora and (adapter.rank_pattern or adapter.alpha_pattern):
        return (
            f"{_FIELD} {shown} with use_rslora and a rank_pattern or alpha_pattern cannot be converted to apply to the "
            "original base when it is saved (peft cannot): drop use_rslora or the patterns."
        )
    if family == "loftq":
        loftq = adapter.loftq_config or {}
        bits, steps = loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1)
        if (bits, steps) != (4, 1):
            return (
                f"loftq_config asks for loftq_bits {bits} and loftq_iter {steps}, but qlit starts LoftQ on a 4-bit "
                "base in peft's one step: set loftq_bits to 4 and loftq_iter to 1."
            )
    if backend is None or family in backend.lora_inits:
        return None
    from qlit.models.quant import backend_class, backend_modes

    takers = [mode for mode in backend_modes() if family in backend_class(mode).lora_inits]
    return (
        f"{_FIELD} {shown} cannot start LoRA on a {backend.spec.mode} base, because {_NEEDS[family]}: use "
        f"quantization.mode {' or '.join(takers)}, or init_lora_weights true."
    )


@dataclass
class Calibration:
    """The training data a data-driven start (EVA, CorDA) runs the base on.

    Args:
        loader: the DataModule's training loader: its first rows (:data:`CALIBRATION_ROWS`) are collated by its own
            collate function, in its dataset's order, so that every rank starts the same adapter.
        forward: runs ``(model, batch)`` as training does: on the training device, in its precision.
    """

    loader: Any
    forward: Callable[[Any, Mapping[str, Any]], Any]


class _Batch(dict):
    """A collated batch that EVA moves to the device as a whole (peft warns about each field that is not a tensor)."""

    def to(self, device: Any) -> _Batch:
        return _Batch({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


@dataclass
class AdapterStart:
    """How a new adapter started, as far as saving it needs to know.

    Args:
        init: the family of its initialisation (``default`` for any peft method but a LoRA started otherwise).
        initial: its first weights (peft's names), where its start also wrote the base weights (PiSSA, OLoRA, CorDA):
            the adapter is then saved as the difference from them, which applies to the original base.
    """

    init: str = "default"
    initial: dict[str, torch.Tensor] | None = None

    def save(self, model: Any, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``model``'s adapter to ``directory`` in peft format; ``state_dict``: its weights gathered whole."""
        whole = {} if state_dict is None else {"state_dict": state_dict}
        if self.initial is None:
            model.save_pretrained(str(directory), safe_serialization=True, **whole)
            return
        if state_dict is not None:
            raise QlitError(
                f"{_FIELD} '{self.init}' wrote the residual into a base that is sharded now, and qlit converts its "
                "adapter back to the original base only from a model held whole: train it without sharding."
            )
        import tempfile
        import warnings

        from safetensors.torch import save_file

        # W = W_res + s·B0·A0 at the start and W_res + s·B·A after training, so the trained change is
        # s·(B·A - B0·A0) = s·[B | -B0]·[A ; A0]: a LoRA of twice the rank on the original base. peft computes it.
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # peft's notes on the start's adapter read back as a plain LoRA (its corda_config unused) and on a second
            # adapter over a base it rewrote: the conversion is what they advise.
            warnings.filterwarnings("ignore", message=".*changes the base weights")
            warnings.filterwarnings("ignore", message=".*specified but will be ignored when `init_lora_weights`")
            initial = Path(tmp) / "initial"
            initial.mkdir()
            save_file(self.initial, str(initial / "adapter_model.safetensors"))
            model.save_pretrained(
                str(directory), safe_serialization=True, path_initial_model_for_weight_conversion=str(initial)
            )


def start_adapter(
    model: Any,
    adapter: Any,
    backend: QuantBackend,
    *,
    pretrained: str,
    revision: str | None = None,
    calibration: Callable[[], Calibration | None] | None = None,
) -> tuple[Any, AdapterStart]:
    """``model`` wrapped by peft in a new ``adapter``, started as its ``init_lora_weights`` says, and how it started.

    peft starts it where it can on this base; a start the base's backend runs itself (``own_lora_inits``: PiSSA and
    LoftQ on a 4-bit base) follows peft's default one; CorDA reads the base's activations before peft wraps it, EVA
    after. A start that rewrote the base weights leaves its first weights in the returned record, for saving.

    Args:
        model: the loaded (and converted) base.
        adapter: the peft config (as the backend spells it out for this base).
        backend: how the base is stored.
        pretrained: the base's name, whose checkpoint a backend's own start reads the unquantized weights from.
        revision: its hub revision.
        calibration: the training data, for EVA and CorDA (``None``, or a result ``None``: there is none).
    """
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    init = lora_init(adapter)
    value = getattr(adapter, "init_lora_weights", True)
    # A copy: peft records what a start decided in its config (EVA's ranks), and the module's own stays as given.
    config = adapter if init == "default" else copy.deepcopy(adapter)
    if init in backend.own_lora_inits:
        config.init_lora_weights, config.loftq_config = True, {}  # saved so: the adapter reloads as it is
    data = _calibration(calibration, value) if init in ("eva", "corda") else None
    if init == "corda":
        config = _corda_preprocessed(model, config, data)
    try:
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=init == "eva")
    except (ValueError, TypeError, NotImplementedError) as err:  # peft names what it cannot wrap
        raise QlitError(f"peft could not apply {type(adapter).__name__}: {str(err).splitlines()[0]}") from None
    if init in backend.own_lora_inits:
        backend.init_lora(peft_model, value, _checkpoint_weights(pretrained, revision, value))
    elif init == "eva":
        _eva_started(peft_model, config, data)
    initial = None
    if init in REWRITES_BASE:
        state = get_peft_model_state_dict(peft_model)
        initial = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()}
    return peft_model, AdapterStart(init, initial)


def _calibration(source: Callable[[], Calibration | None] | None, value: object) -> tuple[Calibration, list[Any]]:
    """The calibration source and its first training rows; one sentence where there are none."""
    data = source() if source is not None else None
    if data is None:
        raise QlitError(
            f"{_FIELD} {_shown(value)} computes the adapter's start from training batches, and this run has no "
            "DataModule to read them from: give it a data section, or set init_lora_weights to true."
        )
    dataset = getattr(data.loader, "dataset", None)
    try:
        wanted = range(min(len(dataset), CALIBRATION_ROWS))  # type: ignore[arg-type]
        # A loader without a batch size (packing) reads a dataset indexed by lists of rows, one list per batch.
        by_batch = getattr(data.loader, "batch_size", 1) is None
        rows = list(dataset[list(wanted)]) if by_batch else [dataset[i] for i in wanted]  # type: ignore[index]
    except TypeError:
        raise QlitError(
            f"{_FIELD} {_shown(value)} reads training rows by index, and the training loader's dataset "
            f"({type(dataset).__name__}) has none: set init_lora_weights to true."
        ) from None
    if not rows:
        raise QlitError(f"{_FIELD} {_shown(value)} computes the adapter's start from training rows; there are none.")
    return data, rows


def _corda_preprocessed(model: Any, config: Any, data: tuple[Calibration, list[Any]]) -> Any:
    """``config`` with its target modules named one by one (CorDA's hooks do not read ``all-linear`` or peft's
    per-architecture default), after CorDA has read the activations of each training row (one row per call, as its
    covariance hook wants) and decomposed the weights."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    calibration, rows = data
    if config.corda_config is None:
        config.corda_config = CordaConfig()
    if config.target_modules is None:
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
        config.target_modules = set(default) if default is not None else None
    config = _maybe_include_all_linear_layers(config, model)
    collate = calibration.loader.collate_fn
    training = model.training

    def run() -> None:
        for row in rows:
            calibration.forward(model, collate([row]))

    preprocess_corda(model, config, run_model=run)
    model.train(training)  # peft leaves the model in eval mode
    return config


class _Unsettled(Exception):
    """EVA ran more passes than qlit allows it."""


def _eva_started(model: Any, config: Any, data: tuple[Calibration, list[Any]]) -> None:
    """Start the adapter with EVA: the SVD of each layer's inputs on training batches, its ranks redistributed.

    Each batch holds enough of the tokens EVA reads (the learned ones under ``use_label_mask``) for the SVD of its
    largest layer rank; peft cycles over the batches until its components settle, here for :data:`_EVA_PASSES`
    passes at most. Every rank computes on the same rows, so every rank starts the same adapter.
    """
    from peft import initialize_lora_eva_weights
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import _Hook

    calibration, rows = data
    eva = config.eva_config or EvaConfig()
    config.eva_config = eva
    ranks = [config.r, *config.rank_pattern.values()]
    needed = 2 * max(round(r * eva.rho) for r in ranks)
    batches, group, tokens = [], [], 0
    for row in rows:
        group.append(row)
        labels = row["labels"]
        tokens += sum(label != eva.label_mask_value for label in labels) if eva.use_label_mask else len(labels)
        if tokens >= needed:
            batches.append(_Batch(calibration.loader.collate_fn(group)))
            group, tokens = [], 0
            if len(batches) == _EVA_BATCHES:
                break
    tokens_read = "learned tokens" if eva.use_label_mask else "tokens"
    if not batches:
        raise QlitError(
            f"{_FIELD} 'eva' needs batches of {needed} {tokens_read} or more for its SVD, and the first "
            f"{len(rows)} training rows hold fewer: lower the rank (r) or eva_config.rho, or set "
            "eva_config.use_label_mask to false."
        )
    calls = 0

    def forward(model: Any, batch: Mapping[str, Any]) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1 + _EVA_PASSES * len(batches):  # the first call only compares the layers' inputs
            raise _Unsettled
        return calibration.forward(model, batch)

    try:
        with torch.no_grad():
            initialize_lora_eva_weights(
                model, batches, forward_fn=forward, show_progress_bar=False, gather_distributed_inputs=False
            )
    except _Unsettled:
        for module in model.modules():  # peft's hooks stay when its loop is broken off
            for key, hook in list(module._forward_hooks.items()):
                if isinstance(hook, _Hook):
                    del module._forward_hooks[key]
        raise QlitError(
            f"{_FIELD} 'eva': the SVD of the layers' inputs did not settle in {_EVA_PASSES} passes over "
            f"{len(batches)} batches of training rows: lower eva_config.tau (now {eva.tau}), or set "
            "init_lora_weights to true."
        ) from None


def _checkpoint_weights(pretrained: str, revision: str | None, value: object) -> Path:
    """The folder of ``pretrained``'s checkpoint, whose safetensors hold the unquantized weights a backend's own
    LoRA start reads (the hub's cache for a hub id: the base was just loaded from it)."""
    from qlit.models.loading import resolve_pretrained

    source = resolve_pretrained(pretrained)
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
        except (OSError, ValueError):
            folder = Path("")
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise QlitError(
            f"{_FIELD} {_shown(value)} reads the unquantized weights of '{pretrained}' from its checkpoint's "
            "safetensors files, and it has none here: use a checkpoint saved as safetensors."
        )
    return folder
