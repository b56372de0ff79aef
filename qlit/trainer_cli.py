"""QlitCLI: LightningCLI with every component chosen by class_path, and qlit's defaults."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import LightningDeprecationWarning, rank_zero_info

from qlit.callbacks import ALWAYS_ON
from qlit.checkpointing import AtomicCheckpointIO
from qlit.data.base import QLitDataModule
from qlit.module import QLitModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": lazy_instance(TensorBoardLogger, save_dir="logs", name="qlit"),
    # Lightning's summary counts a packed 4-bit weight at half its size and shows a FLOPs column it cannot fill for
    # peft models; the params callback prints the counts instead (4-bit weights at their logical size, as peft does).
    "enable_model_summary": False,
}

# Modules whose deprecation notices address their own callers' developers, not someone running `qlit`.
_LIBRARIES = r"(torch|transformers|peft|lightning|pytorch_lightning|torchmetrics|bitsandbytes|datasets|accelerate)"
# Lightning's info lines that say nothing about this run.
_LIGHTNING_NOISE = ("💡 Tip:", "TPU available: False", "HPU available: False", "Loading `train_dataloader` to estimate")


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_LIGHTNING_NOISE)


def quiet_console() -> None:
    """Keep the libraries' notes to their own developers off the console of a ``qlit`` run (README, "The console").

    Deprecation notices raised inside PyTorch, transformers, peft, Lightning and the rest go (Lightning's own
    ``LightningDeprecationWarning``, about options a config may use, stays), unless ``python -W`` or
    ``PYTHONWARNINGS`` asks for warnings; transformers' bar over the weights it loads goes (the hub's download bars
    stay); Lightning's advert and its lines about absent TPUs go.
    """
    if not sys.warnoptions:
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=_LIBRARIES + r"(\.|$)")
        warnings.filterwarnings("default", category=LightningDeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_tqdm_hook(lambda factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_noise not in rank_zero.filters:
        rank_zero.addFilter(_not_noise)


def fit_summary(trainer: Trainer, module: Any) -> list[str]:
    """Where a finished fit left its run, its trained weights and its last checkpoint: three lines."""
    run = Path(trainer.log_dir or trainer.default_root_dir)
    label = "Adapter" if getattr(module, "has_adapter", False) else "Model"
    saved = getattr(module, "saved_to", None)
    if saved is not None:
        weights = _shown(saved) + (" (peft format)" if label == "Adapter" else "")
    else:
        weights = "not saved apart: its weights are in the checkpoint"
    checkpoint = trainer.checkpoint_callback
    last = checkpoint and (getattr(checkpoint, "last_model_path", "") or checkpoint.best_model_path)
    return [
        f"Run:        {_shown(run)} (tensorboard --logdir {_shown(run.parent)})",
        f"{label + ':':<12}{weights}",
        f"Checkpoint: {_shown(Path(last)) if last else 'none written'}",
    ]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it, else absolute."""
    path = path.resolve()
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


class QlitCLI(LightningCLI):
    """``qlit fit|validate|test|predict --config experiment.yaml``: a YAML file is an experiment."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # QLitModule wires optimizer + scheduler itself
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

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            for line in fit_summary(self.trainer, self.model):
                rank_zero_info(line)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic writes and weights_only loads, unless the config chose its own CheckpointIO plugin.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer
