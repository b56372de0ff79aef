"""The ``qlit`` command: the Trainer's subcommands through :class:`~qlit.trainer_cli.QlitCLI`, plus ``export`` and
``compare``, every user error in one sentence.

Importing this module loads neither PyTorch nor Lightning, so ``qlit --help`` answers at once; a subcommand loads
what it needs.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

from qlit.errors import QlitError

SUBCOMMANDS = {
    "fit": "train: qlit fit --config configs/demo.yaml",
    "validate": "evaluate a checkpoint on the validation split (--ckpt_path)",
    "test": "evaluate a checkpoint on the test split (--ckpt_path)",
    "predict": "generate for a split or a prompt file; writes predictions.jsonl",
    "export": "merge a trained adapter into a plain transformers model",
    "compare": "runs side by side: a table, CSV and plots",
}

HELP = (
    "usage: qlit {" + ",".join(SUBCOMMANDS) + "} [--config FILE] [options]\n\n"
    "Fine-tune quantized Hugging Face language models with PEFT adapters, one YAML file per experiment.\n\n"
    "subcommands:\n"
    + "".join(f"  {name:<10}{what}\n" for name, what in SUBCOMMANDS.items())
    + "\nEach subcommand lists its options: qlit <subcommand> --help.\n"
)


def _quiet_third_party() -> None:
    """Settings the libraries read when they are imported (README, "The console"); the rest is
    :func:`qlit.trainer_cli.quiet_console`."""
    warnings.filterwarnings("ignore", message=".*loftq_config.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # datasets draws a bar for every split it converts and caches (seconds, even for a large dataset's cache).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


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
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        raise SystemExit(0 if argv else 2)
    _quiet_third_party()
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        if argv[0] == "export":  # not a Trainer method, so not a LightningCLI subcommand
            from qlit.export import export_main

            export_main(argv[1:])
            return
        if argv[0] == "compare":  # reads finished runs' logs; handles its own errors
            from qlit.compare import main as compare_main

            compare_main(argv[1:])
            return
        from qlit.trainer_cli import QlitCLI, quiet_console

        quiet_console()
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
