"""What every quantization backend answers: the one place the rest of qlit asks about a quantization mode."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from qlit.errors import QlitError

_BACKENDS: dict[str, type[QuantBackend]] = {}

#: How a study names a run's compute dtype (``full fine-tuning (fp32)``).
_DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class QuantSpec(Protocol):
    """What a backend reads of its spec, :class:`qlit.models.quantization.Quantization`, which sits above the
    backends (its modes are theirs)."""

    mode: str
    compute_dtype: str
    quant_storage: str
    int8_threshold: float
    skip_modules: list[str] | None
    bits: int | None
    group_size: int | None
    axis: int | None
    scheme: str | None

    @property
    def uses_double_quant(self) -> bool: ...


class PackedLayer(NamedTuple):
    """A quantized layer whose parameters and buffers misstate what it stores (:meth:`QuantBackend.packed_layers`)."""

    #: Its parameters or buffers that hold packed weights (their ``numel`` is not the weights they stand for).
    packed: tuple[torch.Tensor, ...]
    #: The parameters the layer stands for (``out × in``, plus its bias where ``hidden`` holds it).
    numel: int
    #: What it keeps outside any parameter or buffer (scales, zero points, a bias): counted in the weights' size.
    hidden: tuple[torch.Tensor, ...]


class TrainedModel(NamedTuple):
    """What the end of ``fit`` did with the trained model (:meth:`QuantBackend.finish_fit`)."""

    #: Where the model was saved in the backend's own format (``None``: not saved).
    saved_to: Path | None = None
    #: Metrics to log at the last step (what a conversion cost, say).
    metrics: Mapping[str, float] | None = None
    #: One line for the console about it.
    line: str | None = None


class QuantBackend:
    """How one family of quantization modes stores, trains, saves and exports the base model.

    A subclass declares the ``modes`` it serves and is found by its mode alone: a module in ``qlit.models.quant``
    that defines one is all a new mode needs. The defaults describe a base whose weights transformers loads as they
    are and that trains like any model.

    Args:
        spec: the quantization spec this backend serves.
    """

    modes: ClassVar[tuple[str, ...]] = ()
    #: The base computes in ``Quantization.compute_dtype``, not in the module's dtype.
    quantized: ClassVar[bool] = True
    #: The base weights cannot train: an adapter is required.
    needs_adapter: ClassVar[bool] = False
    #: peft's ``prepare_model_for_kbit_training`` (fp32 norms, input gradients) is the recipe for this base.
    kbit_training: ClassVar[bool] = False
    #: The weights are stored in 4 bits with quantization constants (double_quant, quant_storage).
    is_4bit: ClassVar[bool] = False
    #: Several weights share one stored element, so a layer's weight has no ``(out, in)`` shape.
    packs_weights: ClassVar[bool] = False

    # ----- the fast paths this base may take (each was checked on it; a new backend starts without them) ------------
    #: The decoder layers may be recorded as CUDA graphs (``QLitModule.cuda_graphs``).
    allows_cuda_graphs: ClassVar[bool] = False
    #: LoRA may run as qlit's fused autograd function over the stored weights (``QLitModule.fused_lora``).
    allows_fused_lora: ClassVar[bool] = False
    #: The base may be sharded over the ranks by FSDP2 (``--trainer.strategy qlit_fsdp2``, :mod:`qlit.sharding`).
    allows_sharding: ClassVar[bool] = False

    #: The spec's mode-specific fields this backend reads (``bits``, ``group_size``, ``axis``, ``scheme``); setting
    #: any other is refused when the spec is built. :meth:`check_options` checks their values.
    options: ClassVar[tuple[str, ...]] = ()

    #: The built-in study strategies this backend brings to ``qlit sweep``: a name, and the ``quantization`` fields
    #: that make it plus ``"lora": True`` where a LoRA (the QLoRA recipe's: r 16, alpha 32, every linear layer)
    #: trains on the base, e.g. ``{"qlora": {"mode": "nf4", "double_quant": True, "lora": True}}``.
    strategies: ClassVar[dict[str, dict[str, Any]]] = {}

    #: How a study names the base stored in each of ``modes`` (``8-bit``, ``NF4``; ``""``: the base as it is); a mode
    #: missing here is named as it is.
    labels: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for mode in cls.modes:
            if mode in _BACKENDS:
                raise TypeError(f"quantization mode '{mode}' is served by both {_BACKENDS[mode]} and {cls}.")
        _BACKENDS.update(dict.fromkeys(cls.modes, cls))

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec

    # ----- how a study names it ---------------------------------------------------------------------------------------
    @classmethod
    def base_label(
        cls, mode: str, *, double_quant: bool | None = None, bits: int | None = None, scheme: str | None = None
    ) -> str:
        """How a study names a base stored in ``mode`` (``NF4 + DQ``, ``8-bit``; ``""`` for the base as it is);
        ``bits``, ``scheme``: the spec's as the run recorded them, for the modes that offer several."""
        label = cls.labels.get(mode, mode)
        return f"{label} + DQ" if double_quant and cls.is_4bit else label

    @classmethod
    def technique_label(
        cls,
        mode: str,
        adapter: str | None,
        *,
        double_quant: bool | None = None,
        dtype: str | None = None,
        bits: int | None = None,
        scheme: str | None = None,
    ) -> str | None:
        """The name of the technique that trains a base stored in ``mode`` with ``adapter`` (a peft config's class
        name, ``full`` for none), where it has one of its own (``QLoRA (NF4 + DQ)``, ``full fine-tuning (fp32)``);
        ``None``: a study calls it the adapter's method on :meth:`base_label`.

        Args:
            mode: the quantization mode, one of ``modes``.
            adapter: the peft config's class name (``LoraConfig``, ``LoraConfig+dora``), ``full`` or ``None``.
            double_quant: whether the quantization constants are quantized too.
            dtype: the dtype the run trained in (``float32``).
            bits: the spec's ``bits`` (``None``: not set, the mode's default), for the modes that offer several.
            scheme: the spec's ``scheme`` (``None``: not set, the mode's default), for the modes that have several.
        """
        if adapter == "full":
            return "full fine-tuning" + (f" ({_DTYPE_LABELS[dtype]})" if dtype in _DTYPE_LABELS else "")
        return None

    # ----- before any weight is loaded --------------------------------------------------------------------------------
    def check_options(self) -> None:
        """Refuse values of :attr:`options` this backend cannot store (one sentence naming the field), when the
        config is read."""

    def check_full_fine_tuning(self) -> None:
        """Refuse training without an adapter when the base cannot train."""
        if self.needs_adapter:
            raise QlitError(
                f"quantization mode '{self.spec.mode}' stores frozen k-bit weights that cannot be fully "
                "fine-tuned: set model.init_args.adapter (e.g. class_path: peft.LoraConfig) or quantization.mode none."
            )

    def adapter_refusal(self, adapter: Any) -> str | None:
        """Why peft cannot train ``adapter`` on this base (one sentence), or ``None`` when it can."""
        from peft.tuners.lycoris_utils import LycorisConfig

        if isinstance(adapter, LycorisConfig) and self.packs_weights:
            # peft has no quantized layer for LoHa/LoKr: it wraps a packed layer (bitsandbytes' Linear4bit, BitNet's
            # PackedBitLinear) as a plain nn.Linear and reshapes its update to the packed weight's shape, which fails.
            return (
                f"{type(adapter).__name__} cannot train on a {self.spec.mode} base, because peft reshapes its update "
                "to the packed weight's shape: use quantization.mode int8 or none."
            )
        return None

    def check_device(self, device: torch.device) -> None:
        """Refuse what the device cannot run, before any weight is loaded."""
        if device.type == "cpu" and self.quantized and self.spec.compute_dtype == "float16":
            raise QlitError("quantization.compute_dtype float16 is not supported on CPU: use bfloat16 or float32.")

    # ----- how a LoRA adapter may start on it -------------------------------------------------------------------------
    #: The LoRA initialisations (``LoraConfig.init_lora_weights``) that start on this base, each checked on it, by
    #: family: ``default`` (``true``, ``gaussian``), ``pissa`` (and ``pissa_niter_<n>``), ``olora``, ``eva``, ``corda``,
    #: ``loftq``; any other is refused when the config is read (:mod:`qlit.models.adapters` says why). A new backend
    #: starts with peft's default alone.
    lora_inits: ClassVar[tuple[str, ...]] = ("default",)
    #: The families of :attr:`lora_inits` that this backend runs itself (:meth:`init_lora`), because peft's own
    #: initialisation cannot run on this base's layers; peft builds the adapter with its default start first.
    own_lora_inits: ClassVar[tuple[str, ...]] = ()

    def init_lora(self, model: Any, init: str, weights: Path) -> None:
        """Start the LoRA adapter of the peft model ``model`` as ``init`` (an ``init_lora_weights`` value of a family in
        :attr:`own_lora_inits`), reading the unquantized weights from the checkpoint's safetensors in ``weights``."""
        raise NotImplementedError(f"{type(self).__name__} runs no LoRA initialisation itself.")

    # ----- a checkpoint stored quantized ------------------------------------------------------------------------------
    #: The mode names a quantization the checkpoint is stored in (its ``config.json``'s ``quantization_config``), not
    #: one applied while loading: it loads no other checkpoint, and an adapter trained on it loads onto no other base.
    stored_format: ClassVar[bool] = False
    #: The mode stands for whatever quantization the checkpoint is stored in (as the default mode does).
    adopts_stored: ClassVar[bool] = False

    @classmethod
    def stored_spec(
        cls, stored: Mapping[str, Any], *, name: str, read_file: Callable[[str], str | None]
    ) -> dict[str, Any] | None:
        """The spec's fields (``mode`` first) for model ``name``, stored quantized as ``stored`` (its
        ``quantization_config``) says, where this backend loads such a checkpoint as it is stored; ``None`` where it
        does not. ``read_file`` reads another file of the checkpoint (``None`` where it has none of that name). A
        checkpoint of this backend's kind that it cannot load is one sentence (``QlitError``)."""
        return None

    # ----- loading and training ---------------------------------------------------------------------------------------
    def load_kwargs(self, device: torch.device) -> dict[str, Any]:
        """What ``from_pretrained`` needs besides the dtype to load the base stored this way on ``device``."""
        return {}

    def after_load(self, model: Any, device: torch.device) -> Any:
        """The loaded model, on ``device`` and ready to train."""
        return model.to(device)

    def empty_layout(
        self, model: Any, placeholder: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        """For a sharded run that loads each rank's rows alone (:mod:`qlit.sharding`): give ``model``, built from its
        config with every parameter on the meta device, the layers this format trains with, their parameters that
        are stored in another layout than the checkpoint's made with ``placeholder(shape, dtype)``; return, by
        parameter name, how each of those is made from its whole checkpoint tensor (the other parameters are stored
        as the checkpoint holds them). ``None`` (the default): the format cannot be built without its weights, and
        every rank loads the whole base before it is sharded."""
        return None

    def convert(self, model: Any, *, has_adapter: bool) -> None:
        """Change the loaded model's layers in place, before peft wraps it (nothing for a base loaded as stored)."""

    def adapter_config(self, adapter: Any, model: Any) -> Any:
        """The peft config that wraps the converted ``model``: ``adapter`` itself, unless this base's layers need
        it spelled out (peft's ``target_modules: all-linear`` finds ``nn.Linear`` layers only)."""
        return adapter

    def packed_layers(self, model: Any) -> list[PackedLayer]:
        """The layers of ``model`` whose parameters and buffers misstate what they store, for the weights' count
        and size (``params/total``, ``params/weight_gib``); none by default (bitsandbytes' 4-bit tensors carry
        their shape and constants in ``quant_state``, which the count reads)."""
        return []

    # ----- fidelity: what the stored base computes with ---------------------------------------------------------------
    #: The base has an unquantized original to measure it against (the same checkpoint loaded as it is); a checkpoint
    #: that is stored quantized has none.
    has_original: ClassVar[bool] = True

    def dequantized_weight(self, module: torch.nn.Module) -> torch.Tensor | None:
        """The ``(out, in)`` weight a layer this backend quantized computes with, or ``None`` for any other module
        (the fidelity callback compares it with the original weight)."""
        return None

    # ----- after training ---------------------------------------------------------------------------------------------
    def save_trained(self, model: Any, log_dir: Path) -> Path | None:
        """Save a model at the end of ``fit`` in this backend's own format, when it has one; where it was saved."""
        return None

    def finish_fit(
        self, model: Any, log_dir: Path, *, adapter_saved: bool, validation_loss: Callable[[Any], float | None]
    ) -> TrainedModel:
        """The end of ``fit`` for the trained ``model``, after its adapter (if any) was saved in peft format: by
        default a model trained without a saved adapter is saved in this backend's own format (:meth:`save_trained`).

        A base trained in another form than the one it is deployed in (QAT's fake quantization) is converted here,
        and the backend may say what that cost: ``validation_loss(m)`` is the token-weighted validation loss of a
        model ``m`` fed as the trained one is (``None`` without validation data).
        """
        return TrainedModel(None if adapter_saved else self.save_trained(model, log_dir))

    def check_export(self, adapter: str, *, dequantize: bool) -> None:
        """Refuse merging adapter ``adapter`` into this base when a plain transformers model cannot hold it."""

    def dequantize(self, model: Any) -> Any:
        """The loaded base as plain ``nn.Linear`` layers holding the weights its kernels computed with."""
        if getattr(model, "hf_quantizer", None) is None:
            return model
        # transformers' own inverse of its quantized loading: the layers become nn.Linear holding the weights the
        # k-bit kernels computed with, and quantization_config leaves the config.
        return model.dequantize()


def backend_class(mode: str) -> type[QuantBackend]:
    """The backend class serving ``mode``."""
    return _BACKENDS[mode]


def described_backend(mode: object) -> type[QuantBackend]:
    """The backend class serving ``mode`` as a run's config records it, or :class:`QuantBackend` itself for a mode no
    backend serves (any more): its defaults name it as it is."""
    return _BACKENDS.get(mode, QuantBackend) if isinstance(mode, str) else QuantBackend


def backend_strategies() -> dict[str, dict[str, Any]]:
    """Every backend's built-in study strategies (:attr:`QuantBackend.strategies`), in the order of the modes."""
    out: dict[str, dict[str, Any]] = {}
    for cls in dict.fromkeys(_BACKENDS.values()):
        for name, strategy in vars(cls).get("strategies", {}).items():  # declared here, not inherited
            if name in out:
                raise TypeError(f"study strategy '{name}' is declared by two backends, the second {cls}.")
            out[name] = strategy
    return out


def stored_quantization(
    stored: Mapping[str, Any], *, name: str, read_file: Callable[[str], str | None]
) -> dict[str, Any] | None:
    """The spec's fields for model ``name`` stored quantized as ``stored`` says, from the first backend that loads
    such a checkpoint (:meth:`QuantBackend.stored_spec`); ``None`` where none does."""
    for cls in dict.fromkeys(_BACKENDS.values()):
        fields = cls.stored_spec(stored, name=name, read_file=read_file)
        if fields is not None:
            return fields
    return None


def backend_modes() -> tuple[str, ...]:
    """Every mode some backend serves, in the order they were declared."""
    return tuple(_BACKENDS)
