"""``qlit export``: merge a trained adapter into its base and save a plain ``transformers`` model.

The result loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` where neither qlit, peft nor bitsandbytes is
installed. A base that trained quantized is de-quantized first, to the very weights the adapter was trained against
(the 4-bit NF4/FP4 grid, not the original checkpoint), so the merged model computes what base + adapter computed
in training: the QLoRA-faithful merge.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlit.checkpoint_io import adapter_weight_names, is_sharded_checkpoint, read_checkpoint
from qlit.errors import QlitError
from qlit.hub import looks_local
from qlit.io import atomic_dir
from qlit.models.adapters import load_adapter
from qlit.models.loading import load_causal_lm, load_tokenizer, resolve_pretrained
from qlit.models.quantization import DTypeName, Quantization, to_dtype
from qlit.module import QLitModule
from qlit.paths import QLIT_BASE_FILE

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class _Base:
    """The base an adapter trained on: where its weights are and how they were stored in training."""

    pretrained: str
    revision: str | None
    dtype: str
    quantization: Quantization


def export_merged(
    adapter: str | Path,
    output: str | Path,
    *,
    dtype: DTypeName | None = None,
    dequantize: bool = True,
    base: str | None = None,
    quantization: Quantization | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    run_config: str | Path | None = None,
) -> Path:
    """Merge the adapter in ``adapter`` into its base and save the merged model and tokenizer in ``output``.

    The base is read from ``qlit_base.json`` beside the adapter (written by ``qlit fit``); an adapter trained
    elsewhere falls back to ``base_model_name_or_path`` of its ``adapter_config.json``, unquantized. Adapter and
    base are merged in float32, so the weights are rounded to ``dtype`` once. This needs about 4 bytes of memory
    per parameter on ``device``.

    Args:
        adapter: directory of a trained adapter in peft format (e.g. ``logs/demo/version_0/adapter``), or a
            checkpoint of a qlit run with an adapter (e.g. ``logs/demo/version_0/checkpoints/last.ckpt``).
        output: directory to write the merged model to; it must not exist or be empty, unless ``overwrite``.
        dtype: dtype of the saved weights (``None``: the dtype the adapter computed in during training, i.e. the
            quantization's compute dtype for a quantized base, else the base's dtype).
        dequantize: merge into the de-quantized k-bit weights the adapter trained against (``True``), or into the
            base checkpoint's original full-precision weights (``False``: closer to the original model, further
            from what the adapter learned to correct). LLM.int8() also quantizes activations at run time, so an
            int8-trained adapter is matched up to that rounding either way.
        base: hub id or local directory of the base to use instead of the recorded one (e.g. a local copy of a hub
            model); the recorded revision is then ignored.
        quantization: how the base was stored in training, instead of the recorded one (e.g. ``mode: nf4`` for an
            adapter trained with QLoRA outside qlit).
        device: where to load and merge (``cpu``, ``cuda``, ``cuda:1``).
        trust_remote_code: run model code shipped in the base's hub repository; off unless you trust its author.
        overwrite: replace the contents of an existing non-empty ``output``.
        run_config: for a checkpoint, the ``config.yaml`` of the run that wrote it (``None``: the one in the run's
            log directory, two levels above the checkpoint, where ``qlit fit`` puts it).

    Returns:
        The directory the merged model was saved in.

    Raises:
        QlitError: when the adapter is missing or cannot be merged (prompt learning), ``output`` is taken, or the
            adapter does not fit the base.
    """
    source, out_dir = Path(adapter).expanduser(), Path(output).expanduser()
    if (source / ADAPTER_CONFIG).is_file():
        _refuse_prompt_learning(read_peft_config(source, str(adapter)), str(adapter))
    check_trained(source, str(adapter), plain_model="it is a plain model already, with nothing to merge")
    _refuse_overwriting(out_dir, source)
    if out_dir.exists() and not out_dir.is_dir():
        raise QlitError(f"Output '{output}' is a file, not a directory.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise QlitError(f"Output directory '{output}' exists and is not empty: choose another or pass --overwrite.")
    merge = functools.partial(
        _merge_into_base,
        name=str(adapter),
        out_dir=out_dir,
        dtype=dtype,
        dequantize=dequantize,
        base=base,
        quantization=quantization,
        device=torch.device(device),
        trust_remote_code=trust_remote_code,
    )
    if source.is_dir() and not is_sharded_checkpoint(source):
        return merge(source)
    with tempfile.TemporaryDirectory(prefix="qlit-export-") as staged:
        config = Path(run_config).expanduser() if run_config else source.resolve().parent.parent / "config.yaml"
        _adapter_from_checkpoint(source, config, staged)
        return merge(Path(staged))


def _merge_into_base(
    adapter_dir: Path,
    *,
    name: str,
    out_dir: Path,
    dtype: str | None,
    dequantize: bool,
    base: str | None,
    quantization: Quantization | None,
    device: torch.device,
    trust_remote_code: bool,
) -> Path:
    peft_config = read_peft_config(adapter_dir, name)
    _refuse_prompt_learning(peft_config, name)
    spec = _read_base(adapter_dir, name, peft_config, base, quantization)
    spec.quantization.backend.check_export(name, dequantize=dequantize)
    if looks_local(spec.pretrained):
        _refuse_overwriting(out_dir, Path(resolve_pretrained(spec.pretrained)))

    load_as = spec.quantization if dequantize else Quantization()
    model = load_causal_lm(
        spec.pretrained,
        quantization=load_as,
        dtype=spec.dtype,
        device=device,
        revision=spec.revision,
        trust_remote_code=trust_remote_code,
    )
    out_dtype = to_dtype(dtype or spec.quantization.training_dtype(spec.dtype) or _dtype_name(model.dtype))
    model = load_as.backend.dequantize(model)
    merged = _merge(model.to(torch.float32), adapter_dir, name, spec).to(out_dtype)
    tokenizer = _tokenizer(adapter_dir, spec, trust_remote_code)
    # An interrupted export never leaves a half-written model where a loader would take it for a whole one.
    with atomic_dir(out_dir) as staging:
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    return out_dir


def _refuse_prompt_learning(peft_config: Any, name: str) -> None:
    if peft_config.is_prompt_learning:
        raise QlitError(
            f"Adapter '{name}' is {peft_config.peft_type.value}, which learns virtual tokens fed beside the input "
            "rather than a change of weights, so there is nothing to merge: load it with peft.PeftModel instead."
        )


def _read_base(
    adapter_dir: Path, name: str, peft_config: Any, base: str | None, quantization: Quantization | None
) -> _Base:
    spec_file = adapter_dir / QLIT_BASE_FILE
    if spec_file.is_file():
        try:
            recorded = json.loads(spec_file.read_text())
        except json.JSONDecodeError as err:
            raise QlitError(f"'{spec_file}' is not valid JSON ({err.msg}, line {err.lineno}).") from None
        fields = {f.name for f in dataclasses.fields(Quantization)}
        spec = _Base(
            pretrained=recorded.get("pretrained") or "",
            revision=recorded.get("revision"),
            dtype=recorded.get("dtype", "auto"),
            quantization=Quantization(**{k: v for k, v in (recorded.get("quantization") or {}).items() if k in fields}),
        )
    else:  # an adapter trained outside qlit: peft records the base, not how it was stored
        spec = _Base(
            pretrained=peft_config.base_model_name_or_path or "",
            revision=peft_config.revision,
            dtype="auto",
            quantization=Quantization(),
        )
    if base is not None:
        spec.pretrained, spec.revision = base, None
    if quantization is not None:
        spec.quantization = quantization
    if not spec.pretrained:
        raise QlitError(f"Adapter '{name}' does not name its base model: pass --base with its hub id or directory.")
    return spec


def check_trained(source: Path, name: str, *, plain_model: str) -> None:
    """Refuse, before any weight is loaded, what is not a readable adapter directory or qlit checkpoint.

    Args:
        source: an adapter directory (peft format) or a checkpoint file of a qlit run.
        name: how the sentence names it (as the user gave it).
        plain_model: what to say of a directory that holds a plain model (``config.json``) instead of an adapter.

    Raises:
        QlitError: a missing path, an empty, truncated or foreign checkpoint, an empty directory, a directory without
            ``adapter_config.json`` (or with one peft cannot read), or adapter weights that are missing or corrupt.
    """
    if source.is_file() or is_sharded_checkpoint(source):
        read_checkpoint(source, f"Checkpoint '{name}'", tensors=False)
        return
    if not source.is_dir():
        raise QlitError(
            f"'{name}' does not exist: pass an adapter directory (with {ADAPTER_CONFIG}) or a run's checkpoint (.ckpt)."
        )
    if not (source / ADAPTER_CONFIG).is_file():
        inside = [p for p in (source / "adapter", source / "checkpoints" / "last.ckpt") if p.exists()]
        if inside:
            hint = f"did you mean '{inside[0]}'?"
        elif (source / "config.json").is_file():
            hint = f"it holds a model (config.json), not an adapter: {plain_model}."
        elif not any(source.iterdir()):
            hint = "it is empty."
        else:
            hint = "it is not an adapter in peft format."
        raise QlitError(f"Adapter directory '{name}' holds no {ADAPTER_CONFIG}: {hint}")
    read_peft_config(source, name)
    adapter_weight_names(source, f"Adapter '{name}'")


def _adapter_from_checkpoint(ckpt: Path, run_config: Path, directory: str, device: torch.device | None = None) -> None:
    # A checkpoint holds only the adapter's tensors (QLitModule.on_save_checkpoint); which adapter and base they
    # belong to is in the run's config, so the run's module is rebuilt from it to write them in peft format.
    import yaml
    from jsonargparse import ArgumentError, ArgumentParser

    checkpoint = read_checkpoint(ckpt, f"Checkpoint '{ckpt}'")  # before any weight of the base is loaded
    if not run_config.is_file():
        raise QlitError(
            f"No run config '{run_config}' beside checkpoint '{ckpt}': pass --run_config with the run's config.yaml."
        )
    try:
        config = yaml.safe_load(run_config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise QlitError(f"Run config '{run_config}' is not valid YAML: {str(err).splitlines()[0]}.") from None
    model_config = config.get("model") if isinstance(config, dict) else None
    if model_config is None:
        raise QlitError(f"Run config '{run_config}' has no model section.")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(QLitModule, "model", required=True)
    try:
        module = parser.instantiate(parser.parse_object({"model": model_config})).model
    except ArgumentError as err:
        from qlit.parse_errors import concise_parse_error

        raise QlitError(
            f"The model section of run config '{run_config}' is not a qlit model: {concise_parse_error(str(err))}."
        ) from None
    if not module.has_adapter:
        raise QlitError(f"Checkpoint '{ckpt}' is of a full fine-tuning run: it holds no adapter to merge.")
    if device is not None:
        module.to(device)  # configure_model loads the base onto the module's device
    module.configure_model()
    try:
        module.on_load_checkpoint(checkpoint)
    except QlitError as err:  # without a trainer the module knows the file as "the checkpoint"
        raise QlitError(str(err).replace("the checkpoint", f"checkpoint '{ckpt}'", 1)) from None
    unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False).unexpected_keys
    if unexpected:
        raise QlitError(f"Checkpoint '{ckpt}' holds '{unexpected[0]}', which the model of '{run_config}' lacks.")
    module.save_adapter_to(directory)


def _refuse_overwriting(out_dir: Path, reads: Path) -> None:
    # The output is emptied before the merged model moves in: it must not be, or hold, what the export reads.
    if out_dir.resolve() == reads.resolve() or out_dir.resolve() in reads.resolve().parents:
        raise QlitError(f"Output directory '{out_dir}' would overwrite '{reads}', which the export reads.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _merge(model: Any, adapter_dir: Path, name: str, spec: _Base) -> Any:
    peft_model = load_adapter(model, adapter_dir, spec.pretrained, what=f"Adapter '{name}'", is_trainable=False)
    try:
        # safe_merge: peft checks the merged weights for NaN/inf before they replace the base's.
        return peft_model.merge_and_unload(safe_merge=True)
    except (RuntimeError, ValueError, NotImplementedError) as err:
        reason = str(err).strip().splitlines()[0]
        raise QlitError(f"peft could not merge adapter '{name}': {reason}") from None


def _tokenizer(adapter_dir: Path, spec: _Base, trust_remote_code: bool) -> Any:
    # The tokenizer saved with the adapter is the one training used (its pad token included).
    if (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=trust_remote_code)
    return load_tokenizer(spec.pretrained, revision=spec.revision, trust_remote_code=trust_remote_code)


def export_main(argv: list[str] | None = None) -> Path:
    """``qlit export --adapter DIR --output DIR [--dtype bfloat16] [--base ID_OR_DIR]``: :func:`export_merged`.

    Args:
        argv: the arguments after ``export`` (``None``: ``sys.argv``).

    Returns:
        The directory the merged model was saved in.
    """
    from jsonargparse import auto_cli

    from qlit.trainer_cli import quiet_console

    quiet_console()
    out = auto_cli(
        export_merged,
        args=argv,
        as_positional=False,
        # Parse errors reach qlit.cli.main, which reports them in one line like every other qlit command.
        prog="qlit export",
        exit_on_error=False,
    )
    print(f"qlit export: merged model saved to {out}")
    return out


def read_peft_config(adapter_dir: Path, name: str) -> Any:
    """The adapter's ``PeftConfig``; one sentence naming the adapter (``name``) where peft cannot read it."""
    from peft import PeftConfig

    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = f"{err.msg}, line {err.lineno}" if isinstance(err, json.JSONDecodeError) else str(err).splitlines()[0]
        raise QlitError(f"The adapter config of '{name}' ({ADAPTER_CONFIG}) is not valid JSON ({reason}).") from None
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # e.g. a peft_type this peft does not know
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QlitError(f"peft cannot read the adapter config of '{name}': {reason}") from None
