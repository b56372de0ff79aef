"""QlitCLI: LightningCLI with every component chosen by class_path, and qlit's defaults."""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

from jsonargparse import ArgumentError, lazy_instance
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qlit.callbacks import ALWAYS_ON
from qlit.checkpointing import AtomicCheckpointIO
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


def _quiet_third_party() -> None:
    warnings.filterwarnings("ignore", message=".*loftq_config.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)


def concise_parse_error(message: str) -> str:
    """One sentence from jsonargparse's nested report: the full key of the offending option and what is wrong.

    jsonargparse explains a bad value once per candidate type of each enclosing Union (e.g. ``QLitModule | None``);
    only the innermost reason names the user's mistake.
    """
    keys: list[str] = []
    reasons: list[str] = []
    for raw in message.splitlines():
        line = raw.strip().lstrip("- ").strip()
        if not line or line.startswith(_NOISE):
            continue
        match = re.match(r'(?:Parser key|Problem with given class_path [^:]+:)\s*"?([^":]*)"?:?$', line)
        if line.startswith("Parser key"):
            key, _, rest = line.partition('":')
            keys.append(key.split('"')[1])
            if rest.strip():  # 'Parser key "config": File does not exist: ...' carries its reason on the line
                reasons.append(rest.strip())
        elif match:
            continue
        else:
            reasons.append(line)
    reason = reasons[-1] if reasons else message.strip().splitlines()[0]
    reason = re.sub(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", r"got '\2', expected one of \1", reason)
    key = ".".join(k for k in keys if k)
    return f"{key}: {reason}" if key else reason


def _qlit_error_in(err: BaseException | None) -> QlitError | None:
    """The QlitError that ``err`` is or was raised from, if any."""
    while err is not None and not isinstance(err, QlitError):
        err = err.__cause__ or err.__context__
    return err


def main(args: Any = None) -> None:
    """Entry point of the ``qlit`` command."""
    _quiet_third_party()
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv[:1] == ["export"]:  # not a Trainer method, so not a LightningCLI subcommand
            from qlit.export import export_main

            export_main(argv[1:])
            return
        if argv[:1] == ["compare"]:  # reads finished runs' logs; handles its own errors
            from qlit.compare import main as compare_main

            compare_main(argv[1:])
            return
        QlitCLI(args=args)
    except (QlitError, ValueError) as err:
        # jsonargparse re-raises what a constructor refuses (QLitModule's checks) as a ValueError about Union
        # subtypes; the QlitError it wraps is the sentence for the user.
        cause = _qlit_error_in(err)
        if cause is None:
            raise
        print(f"qlit: error: {cause}", file=sys.stderr)
        raise SystemExit(1) from None
    except SIGTERMException:
        print("qlit: interrupted: stopped after the running batch (see the checkpoint path above)", file=sys.stderr)
        raise SystemExit(143) from None
    except MisconfigurationException as err:  # Lightning's word for a trainer setting this machine cannot honour
        print(f"qlit: error: trainer: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(1) from None
    except ArgumentError as err:
        command = "qlit export" if argv[:1] == ["export"] else "qlit"
        print(f"qlit: error: {concise_parse_error(str(err))} (see `{command} --help`)", file=sys.stderr)
        raise SystemExit(2) from None
