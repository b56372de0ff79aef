"""QlitCLI: LightningCLI with every component chosen by class_path, and qlit's defaults."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from qlit.data.base import QLitDataModule
from qlit.errors import QlitError
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
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})


def _quiet_third_party() -> None:
    # bitsandbytes logs a warning on every CPU import about an optional kernels package it can do without.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*loftq_config.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(args: Any = None) -> None:
    """Entry point of the ``qlit`` command."""
    _quiet_third_party()
    try:
        QlitCLI(args=args)
    except QlitError as err:
        print(f"qlit: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
