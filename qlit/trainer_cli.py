"""QlitCLI: LightningCLI with every component chosen by class_path, and qlit's defaults."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import lazy_instance
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import LightningDeprecationWarning, rank_zero_info

from qlit import sharding  # noqa: F401 (importing it registers --trainer.strategy qlit_fsdp2 with Lightning)
from qlit.callbacks import ALWAYS_ON
from qlit.callbacks.progress import progress_bar
from qlit.callbacks.timing import TrainingTimeMonitor
from qlit.checkpoint_io import AtomicCheckpointIO, is_sharded_checkpoint, read_checkpoint
from qlit.data.base import QLitDataModule
from qlit.errors import QlitError
from qlit.module import CHECKPOINT_BASE_KEY, QLitModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": lazy_instance(TensorBoardLogger, save_dir="logs", name="qlit"),
    # Lightning's summary counts a packed 4-bit weight at half its size and shows a FLOPs column it cannot fill for
    # peft models; the params callback prints the counts instead (4-bit weights at their logical size, as peft does).
    "enable_model_summary": False,
}

#: Trainer options that Lightning accepts below these values and then fails on mid-run (accumulating over 0 batches
#: divides by zero) or silently misuses (a negative clipping norm flips every gradient): (option, smallest allowed).
#: Lightning checks max_steps, max_epochs and the limit_*_batches itself.
TRAINER_LEAST: tuple[tuple[str, float], ...] = (
    ("accumulate_grad_batches", 1),
    ("check_val_every_n_epoch", 1),
    ("log_every_n_steps", 0),
    ("num_sanity_val_steps", -1),
    ("min_epochs", 0),
    ("min_steps", 0),
    ("gradient_clip_val", 0),
)

#: Choices of ``--matmul_precision`` (:func:`matmul_precision`).
MatmulPrecision = Literal["auto", "highest", "high", "medium"]

#: What a run directory holds before its first batch: removed again when the run fails that early.
_SET_UP_FILES = ("config.yaml", "hparams.yaml")
# Modules whose deprecation notices address their own callers' developers, not someone running `qlit`.
_LIBRARIES = r"(torch|transformers|peft|lightning|pytorch_lightning|torchmetrics|bitsandbytes|datasets|accelerate)"
# Lightning's info lines that say nothing about this run.
_LIGHTNING_NOISE = ("💡 Tip:", "TPU available: False", "HPU available: False", "Loading `train_dataloader` to estimate")


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_LIGHTNING_NOISE)


class _Once(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_console() -> None:
    """Keep the libraries' notes to their own developers off the console of a ``qlit`` run (README, "The console").

    Deprecation notices raised inside PyTorch, transformers, peft, Lightning and the rest go (Lightning's own
    ``LightningDeprecationWarning``, about options a config may use, stays), unless ``python -W`` or
    ``PYTHONWARNINGS`` asks for warnings; transformers' bar over the weights it loads goes (the hub's download bars
    stay); Lightning's advert and its lines about absent TPUs go; bitsandbytes' note that an 8-bit layer casts its
    inputs to float16, logged at every call, shows once; Liger's notes that its back-ends for other hardware could
    not be imported go; so do Lightning's hints that do not fit a qlit run (:data:`_LIGHTNING_HINTS`) and PyTorch's
    note that it set a thread's CUDA context for cuBLAS itself.
    """
    if not sys.warnoptions:
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=_LIBRARIES + r"(\.|$)")
        warnings.filterwarnings("default", category=LightningDeprecationWarning)
        for hint in _LIGHTNING_HINTS:
            warnings.filterwarnings("ignore", message=hint)
        # PyTorch's note that a thread on which CUDA's primary context was not current (autograd's worker thread for
        # the device, which PyTorch gives the device without making its context current) ran cuBLAS: PyTorch makes
        # the primary context current itself, which is what the thread needed, and says so once.
        warnings.filterwarnings("ignore", message=r"Attempting to run cuBLAS, but there was no current CUDA context")
    from transformers.utils import logging as hf_logging

    hf_logging.set_tqdm_hook(lambda factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_noise not in rank_zero.filters:
        rank_zero.addFilter(_not_noise)
    int8 = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in int8.filters):
        int8.addFilter(_Once())
    liger = logging.getLogger("liger_kernel.backends.registry")
    if _not_other_hardware not in liger.filters:
        liger.addFilter(_not_other_hardware)


#: Lightning's hints (warnings) that address no qlit user, as regular expressions of their start:
_LIGHTNING_HINTS = (
    # qlit tokenises a dataset once, before training, into memory (and its cache); a batch is then a collation of
    # ready token ids, microseconds of work, and the hint that loader worker processes would speed it up is wrong.
    # A config may still set data.num_workers.
    r"The '\w+' does not have many workers",
    # Lightning logs every log_every_n_steps optimizer steps of the whole fit, not of each epoch: with short epochs
    # the training metrics are still logged, over several epochs. A fit too short to log at all is said by qlit,
    # which logs at its last step instead (:class:`_LogInterval`).
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)

#: Liger's optional kernel back-ends for other hardware or extra packages (Ascend NPUs, NVIDIA's CuTe DSL): each
#: logs that it could not be imported at the first use of its op; its Triton kernels, the ones qlit uses, run.
_OPTIONAL_LIGER_BACKENDS = ("._ascend.", "._cutedsl.")


def _not_other_hardware(record: logging.LogRecord) -> bool:
    path = record.args[0] if isinstance(record.args, tuple) and record.args else ""
    return not (isinstance(path, str) and any(part in path for part in _OPTIONAL_LIGER_BACKENDS))


def fit_summary(trainer: Trainer, module: Any) -> list[str]:
    """Where a finished fit left its run and its last checkpoint, then its result and where its trained weights went
    (:func:`fit_result`): three lines."""
    run = Path(trainer.log_dir or trainer.default_root_dir)
    checkpoint = trainer.checkpoint_callback
    last = checkpoint and (getattr(checkpoint, "last_model_path", "") or checkpoint.best_model_path)
    return [
        f"Run:        {_shown(run)} (qlit board {_shown(run.parent)})",
        f"Checkpoint: {_shown(Path(last)) if last else 'none written'}",
        fit_result(trainer, module, Path(last) if last else None),
    ]


def fit_result(trainer: Trainer, module: Any, checkpoint: Path | None = None) -> str:
    """One line: the run's name, the metrics it is judged by as last logged (the task's main metrics and the
    checkpoint's monitored one; the training loss where nothing was validated), how long it trained, and where its
    trained weights went, e.g. ``demo: val/accuracy 0.963, val/loss 0.071 after 3 epochs (240 steps, 21 s); adapter
    in logs/demo/version_0/adapter (peft format)``."""
    logged = trainer.callback_metrics
    task = getattr(module, "task", None)
    specs = getattr(task, "metric_specs", ())
    names = [f"val/{spec.name}" for spec in specs if spec.main] or [f"val/{spec.name}" for spec in specs]
    monitor = getattr(trainer.checkpoint_callback, "monitor", None)
    names = [n for n in dict.fromkeys([*names, monitor]) if n and n in logged]
    names = names or [n for n in ("train/loss",) if n in logged]
    metrics = ", ".join(f"{name} {float(logged[name]):.3f}" for name in names) or "no metric logged"
    steps = f"{trainer.global_step} step{'s' if trainer.global_step != 1 else ''}"
    timing = [c.last_metrics for c in trainer.callbacks if isinstance(c, TrainingTimeMonitor)]
    seconds = timing[0].get("time/fit_seconds") if timing else None
    took = f", {seconds:.0f} s" if seconds is not None else ""
    epochs = trainer.current_epoch
    if trainer.max_epochs is not None and 0 < epochs == trainer.max_epochs:
        when = f"after {epochs} epoch{'s' if epochs != 1 else ''} ({steps}{took})"
    else:
        when = f"after {steps}" + (f" ({seconds:.0f} s)" if seconds is not None else "")
    saved = getattr(module, "saved_to", None)
    if saved is not None and getattr(module, "has_adapter", False):
        weights = f"adapter in {_shown(saved)} (peft format)"
    elif saved is not None:
        weights = f"model in {_shown(saved)}"
    else:
        weights = f"weights in {_shown(checkpoint)}" if checkpoint is not None else "weights not saved"
    name = trainer.loggers[0].name if trainer.loggers and trainer.loggers[0].name else "qlit"
    return f"{name}: {metrics} {when}; {weights}"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it, else absolute."""
    path = path.resolve()
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


class _Parser(LightningArgumentParser):
    """Writes a run's ``config.yaml`` without validating the config once more: it was validated when parsed."""

    def save(self, cfg: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("skip_validation", True)
        super().save(cfg, *args, **kwargs)


class QlitCLI(LightningCLI):
    """``qlit fit|validate|test|predict --config experiment.yaml``: a YAML file is an experiment."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        argv = sys.argv[1:] if args is None else args
        # The parser of the subcommand asked for alone: building all four is a quarter of a command's start-up.
        self._requested = argv[0] if isinstance(argv, list | tuple) and argv else None
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # QLitModule wires optimizer + scheduler itself
        # That support dumps the whole config once more for save_hyperparameters(), which qlit does not call (a run's
        # config is its config.yaml): a second of every command's start-up for nothing.
        kwargs.setdefault("load_from_checkpoint_support", False)
        kwargs.setdefault("parser_class", _Parser)
        # Parse errors are raised, not printed with the whole usage: main() turns them into one sentence.
        # No abbreviations: `--trainer.max_step 5` must be an error, not max_steps.
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False, "allow_abbrev": False})
        super().__init__(
            QLitModule,
            QLitDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        every = LightningCLI.subcommands()
        requested = getattr(self, "_requested", None)
        return {requested: every[requested]} if requested in every else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The tokenizer is the model's: named once, in the model section.
        parser.link_arguments("model.init_args.pretrained", "data.init_args.tokenizer", apply_on="parse")
        # Always-on callbacks, each configurable under its own key (e.g. --checkpoint.every_n_train_steps 50).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": "val/loss", "checkpoint.mode": "min"})
        # qlit's own: the interrupt checkpoint, the measurements of a quantization study (README: "What is logged")
        # and the predictions writer.
        for key, callback in ALWAYS_ON.items():
            parser.add_lightning_class_args(callback, key)
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_argument(
            "--matmul_precision",
            type=MatmulPrecision,
            default="auto",
            help="internal precision of float32 matrix products (torch.set_float32_matmul_precision): auto is high "
            "(TF32 tensor cores) on a CUDA device and leaves other devices as they are; highest, high or medium "
            "everywhere.",
        )

    def before_instantiate_classes(self) -> None:
        trainer = self._get(self.config, "trainer")
        for option, least in TRAINER_LEAST:
            value = trainer.get(option)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < least:
                raise QlitError(f"trainer.{option} must be {least} or more, got {value}.")
        interval = trainer.get("val_check_interval")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval <= 0:
            raise QlitError(f"trainer.val_check_interval must be above 0, got {interval}.")

    def after_fit(self) -> None:
        # Every rank builds the summary, since it reads trainer.log_dir, a broadcast from rank 0 (asked from rank 0
        # alone, it waits for ranks that have finished); rank_zero_info prints it once.
        for line in fit_summary(self.trainer, self.model):
            rank_zero_info(line)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic writes and weights_only loads, unless the config chose its own CheckpointIO plugin.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        self._started = _Started()
        trainer.callbacks += [self._started, _LogInterval()]
        self._matmul_precision = matmul_precision(self._get(self.config, "matmul_precision", default="auto"), trainer)
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # qlit's progress display, unless the config names a progress bar or turns it off.
        named = config.get("callbacks") or []
        named = named if isinstance(named, list) else [named]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in [*named, *callbacks]
        ):
            callbacks = [*callbacks, progress_bar()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint here (for hyper-parameters, which qlit checkpoints do not hold): a file
        # that cannot be read would end the parse in torch's traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._ckpt_base = read_ckpt_path(ckpt_path, subcommand) if ckpt_path is not None else None
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        check_base = getattr(self.model, "check_checkpoint_base", None)
        if self._ckpt_base is not None and callable(check_base):
            check_base(self._ckpt_base, self._get(self.config_init, "ckpt_path"))
        run_dir = _new_run_dir(self.trainer)
        # Set for this run only, and set before Lightning sets up the device (which otherwise advises it on a GPU with
        # tensor cores); restored after, so that a run inside a larger program leaves its precision as it was.
        before = torch.get_float32_matmul_precision()
        if self._matmul_precision is not None:
            torch.set_float32_matmul_precision(self._matmul_precision)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            # A run that fails before its first batch (a model that does not load, a checkpoint that does not fit)
            # leaves no run directory behind: it would hold nothing but its config, and show up among real runs.
            if run_dir is not None and not self._started.started:
                _remove_unstarted(*run_dir)
            raise
        finally:
            torch.set_float32_matmul_precision(before)


def matmul_precision(choice: MatmulPrecision, trainer: Trainer) -> str | None:
    """The float32 matrix-product precision a run sets (``None``: it leaves the process's own).

    ``auto``: ``high`` on a CUDA device, where float32 products (LoRA weights, fp32 runs) then use TF32 tensor cores
    at about 10 mantissa bits, as Lightning advises and most training recipes do; elsewhere it is left as it is
    (on a CPU ``high`` may switch products to a bfloat16-based algorithm).
    """
    if choice != "auto":
        return choice
    return "high" if isinstance(trainer.accelerator, CUDAAccelerator) else None


class _LogInterval(Callback):
    """A fit with fewer optimizer steps than ``trainer.log_every_n_steps`` would log no training metric at all: it
    logs them at its last step instead, and says so in one line."""

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        interval, steps = trainer.log_every_n_steps, trainer.estimated_stepping_batches
        if not trainer.loggers or interval <= 0 or not math.isfinite(steps) or not 0 < steps < interval:
            return
        trainer.log_every_n_steps = int(steps)
        rank_zero_info(
            f"This fit has {int(steps)} optimizer steps, fewer than trainer.log_every_n_steps ({interval}): its "
            f"training metrics are logged every {int(steps)} steps instead."
        )


class _Started(Callback):
    """Whether this process has run a batch of training, validation (past the sanity check), test or predict."""

    def __init__(self) -> None:
        self.started = False

    def on_train_batch_end(self, *args: Any) -> None:
        self.started = True

    def on_validation_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.started = self.started or not trainer.sanity_checking

    def on_test_batch_end(self, *args: Any) -> None:
        self.started = True

    def on_predict_batch_end(self, *args: Any) -> None:
        self.started = True


def _new_run_dir(trainer: Trainer) -> tuple[Path, Path] | None:
    """The run directory this run is about to create, and its nearest folder that exists already; ``None`` where it
    exists already, is shared (loggers without versioned folders), or belongs to another rank to handle."""
    if (
        trainer.global_rank != 0
        or not trainer.loggers
        or not isinstance(trainer.loggers[0], TensorBoardLogger | CSVLogger)
    ):
        return None
    run_dir = Path(trainer.loggers[0].log_dir).absolute()
    if run_dir.exists():
        return None
    existing = next(parent for parent in run_dir.parents if parent.exists())
    return run_dir, existing


def _remove_unstarted(run_dir: Path, existing: Path) -> None:
    """Remove ``run_dir`` if it holds only what set-up writes (config, hparams, event files), then the folders above
    it up to ``existing`` that are left empty."""
    if not run_dir.is_dir():
        return
    files = [p for p in run_dir.rglob("*") if not p.is_dir()]
    if any(p.name not in _SET_UP_FILES and not p.name.startswith("events.out.tfevents.") for p in files):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        if parent == existing or not parent.is_relative_to(existing):
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


#: ckpt_path values that Lightning resolves itself rather than reading as a file.
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")


def read_ckpt_path(ckpt_path: Any, subcommand: str) -> dict[str, Any] | None:
    """Refuse, before any run directory or weight exists, a ``ckpt_path`` that cannot be loaded by ``subcommand``;
    return what it records of its base (the part of the checkpoint ``QLitModule.check_checkpoint_base`` reads).

    The checkpoint is memory-mapped, so its tensors are not read: checking a large one costs little.
    """
    name = str(ckpt_path)
    if name in _LIGHTNING_CKPT_NAMES or name.startswith("registry") or "://" in name:
        return None
    path = Path(name).expanduser()
    if not path.exists():
        raise QlitError(f"ckpt_path '{name}' does not exist.")
    if path.is_dir() and not is_sharded_checkpoint(path):
        inside = next((c for c in (path / "last.ckpt", path / "checkpoints" / "last.ckpt") if c.is_file()), None)
        hint = f"did you mean '{inside}'?" if inside else "give one of the .ckpt files in it."
        raise QlitError(f"ckpt_path '{name}' is a directory, not a checkpoint file: {hint}")
    hint = "a trained adapter in peft format is loaded with model.init_args.adapter_path"
    checkpoint = read_checkpoint(path, f"ckpt_path '{name}'", hint=hint, tensors=False)
    if subcommand == "fit" and "optimizer_states" not in checkpoint:
        raise QlitError(
            f"ckpt_path '{name}' holds weights only (no optimizer state), so fit cannot resume from it: evaluate it "
            "with validate, test or predict."
        )
    return {CHECKPOINT_BASE_KEY: checkpoint[CHECKPOINT_BASE_KEY]} if CHECKPOINT_BASE_KEY in checkpoint else {}
