"""Which peft methods qlit can train on which base: refused pairs fail before any weight is loaded.

Every peft method is passed by ``class_path`` and applied by peft itself. This module knows only the settings that
peft 0.21 + bitsandbytes 0.50 accept when the adapter is built and then break in the first training steps, or refuse
only after the weights have loaded; each was found by training the tiny models (``tests/test_adapters.py`` trains
every supported pair of the README's support matrix and checks that each refused pair still fails in peft). The
refusals that depend on how the base is stored are its quantization backend's (``QuantBackend.adapter_refusal``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlit.errors import QlitError
from qlit.models.loading import is_hub_id
from qlit.models.quantization import Quantization
from qlit.paths import QLIT_BASE_FILE

_CAUSAL_LM = "CAUSAL_LM"


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
    return quantization.backend.adapter_refusal(adapter)


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
