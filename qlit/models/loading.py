"""Loading a Hugging Face causal LM and its tokenizer from a hub id, a local directory or a ``qlit-tiny/`` name;
telling whether two names are the same base."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlit.errors import QlitError
from qlit.hub import looks_local, offline_unless_reachable
from qlit.models.quant.base import stored_quantization
from qlit.models.quantization import Quantization
from qlit.models.tiny import is_tiny, resolve_tiny, stores_quantized


def resolve_pretrained(name: str) -> str:
    """What ``from_pretrained`` should be given for ``name``: tiny names become their built local directory."""
    if is_tiny(name):
        return resolve_tiny(name)
    if looks_local(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise QlitError(f"Model directory '{name}' does not exist or holds no config.json.")
        return str(path)
    return name


def same_base(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name the same base model: equal hub ids or tiny names, or the same local folder."""
    return _base_key(a) == _base_key(b)


def _base_key(name: str) -> str:
    if not is_tiny(name) and looks_local(name):
        return str(Path(name).expanduser().resolve())
    return name.rstrip("/")


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id (``org/name`` or ``name``) rather than of a path."""
    return _HUB_ID.fullmatch(name) is not None and not name.startswith(".")


def _hub_error(name: str, what: str, err: Exception) -> QlitError:
    return QlitError(
        f"Could not load the {what} of '{name}': the Hugging Face Hub is unreachable or has no such id "
        f"({type(err).__name__}); download it where the hub is reachable (`hf download {name} --local-dir DIR`) "
        f"and set model.init_args.pretrained to DIR."
    )


def _from_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    from safetensors import SafetensorError

    source = resolve_pretrained(name)
    if source != name or looks_local(name):
        try:
            return loader.from_pretrained(source, **kwargs)
        except (OSError, SafetensorError) as err:  # a missing, truncated or foreign file in the folder
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            where = f" ({source})" if source != name else ""
            raise QlitError(f"Could not load the {what} of '{name}'{where}: {reason.rstrip('.')}.") from None
    with offline_unless_reachable():
        try:
            return loader.from_pretrained(source, **kwargs)
        except OSError as err:  # transformers reports unreachable hubs and unknown ids as OSError
            raise _hub_error(name, what, err) from None


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's config alone (no weights): what a choice made before loading needs to know."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name, "config", revision=revision, trust_remote_code=trust_remote_code)


def checkpoint_quantization(
    name: str,
    quantization: Quantization,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    local_only: bool = False,
) -> Quantization:
    """``quantization`` as checkpoint ``name`` stores its weights, from its config alone (no weights are read).

    A checkpoint stored quantized (a ``quantization_config`` in its ``config.json``: GPTQ, AWQ, bitsandbytes) decides
    the mode of a spec that leaves it open (the default mode, or one that adopts the checkpoint's); the backend that
    loads such checkpoints says which mode (:func:`~qlit.models.quant.base.stored_quantization`). A spec that names
    another, or a mode for stored checkpoints on one that is not stored quantized, is one sentence naming both.

    Args:
        name: hub id, local directory or qlit model name.
        quantization: the spec as the config gives it.
        revision: hub revision of the config.
        trust_remote_code: run model code shipped in the hub repository.
        local_only: read only a config already on this machine (a local directory, a stored-quantized qlit model),
            as when a config is read: a hub id is then left to the loading.
    """
    if local_only and not (stores_quantized(name) or (not is_tiny(name) and (Path(name) / "config.json").is_file())):
        return quantization
    config = load_config(name, revision=revision, trust_remote_code=trust_remote_code)
    stored = getattr(config, "quantization_config", None)
    backend = quantization.backend
    if stored is None:
        if backend.stored_format:
            raise QlitError(
                f"quantization.mode {quantization.mode} loads a checkpoint stored quantized, but model '{name}' is "
                "not (its config.json has no quantization_config): set quantization.mode to none or to a mode that "
                "quantizes it while loading (nf4)."
            )
        return quantization
    stored = stored if isinstance(stored, dict) else stored.to_dict()
    method = stored.get("quant_method")
    fields = stored_quantization(stored, name=name, read_file=_checkpoint_file(name, revision))
    if fields is None:
        raise QlitError(
            f"Model '{name}' is stored quantized with quant_method '{method}', which qlit does not load as stored: "
            "use a compressed-tensors (GPTQ, AWQ) or bitsandbytes 4-bit checkpoint, or the unquantized original."
        )
    requested = dataclasses.asdict(quantization)
    # The default mode means no quantization block: the checkpoint's own is taken as stored.
    open_mode = backend.adopts_stored or quantization.mode == Quantization.mode
    clashes = [key for key, value in fields.items() if requested.get(key) is not None and requested[key] != value]
    if clashes and not (open_mode and clashes == ["mode"]):
        stored_as = ", ".join(f"{key} {value}" for key, value in fields.items())
        given = ", ".join(f"quantization.{key} {requested[key]}" for key in clashes)
        raise QlitError(
            f"{given} conflicts with model '{name}', whose config.json stores it as {stored_as} "
            f"(quantization_config.quant_method {method}): leave the quantization block out to load it as stored, "
            f"or set {', '.join(f'quantization.{key} {value}' for key, value in fields.items())}."
        )
    return Quantization(**{**requested, **fields})


def _checkpoint_file(name: str, revision: str | None) -> Callable[[str], str | None]:
    """A reader of another file of checkpoint ``name`` (a local one, or one the hub has or has cached)."""

    def read(filename: str) -> str | None:
        source = resolve_pretrained(name)
        if Path(source).is_dir():
            path: str | None = str(Path(source) / filename) if (Path(source) / filename).is_file() else None
        else:
            from transformers.utils import cached_file

            with offline_unless_reachable():
                path = cached_file(
                    source,
                    filename,
                    revision=revision,
                    _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False,
                )
        return Path(path).read_text(encoding="utf-8") if path else None

    return read


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of model ``name``, with a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(
        AutoTokenizer, name, "tokenizer", revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name: str,
    *,
    quantization: Quantization,
    dtype: str,
    device: torch.device,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load ``name`` onto ``device`` with the weights stored as ``quantization``'s backend says.

    The whole model goes onto the one device Lightning assigned to this process (never ``device_map="auto"``,
    which would spread it over every GPU and break DDP/FSDP).
    """
    from transformers import AutoModelForCausalLM

    quantization = checkpoint_quantization(name, quantization, revision=revision, trust_remote_code=trust_remote_code)
    backend = quantization.backend
    backend.check_device(device)
    kwargs: dict[str, Any] = dict(
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=quantization.weights_dtype(dtype),
        **backend.load_kwargs(device),
    )
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = _from_pretrained(AutoModelForCausalLM, name, "weights", **kwargs)
    return backend.after_load(model, device)
