"""QlitCLI: LightningCLI with every component chosen by class_path, and qlit's defaults."""

from __future__ import annotations

from typing import Any

from jsonargparse import lazy_instance
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from qlit.callbacks import ALWAYS_ON
from qlit.checkpoint_io import AtomicCheckpointIO
from qlit.data.base import QLitDataModule
from qlit.module import QLitModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": lazy_instance(TensorBoardLogger, save_dir="logs", name="qlit"),
}


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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic writes and weights_only loads, unless the config chose its own CheckpointIO plugin.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer
