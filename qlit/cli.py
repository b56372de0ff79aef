"""The ``qlit`` command: the Trainer's subcommands through :class:`~qlit.trainer_cli.QlitCLI`, plus ``export``,
``eval`` and ``compare``, every user error in one sentence.

Importing this module loads neither PyTorch nor Lightning, so ``qlit --help`` answers at once; a subcommand loads
what it needs.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from qlit.errors import QlitError, qlit_error_in
from qlit.parse_errors import concise_parse_error
from qlit.subcommands import SUBCOMMANDS

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


def _config_file_problem(value: str) -> str | None:
    """What is wrong with the config file ``value`` (a ``--config`` argument), in one sentence, or None.

    jsonargparse reports a YAML syntax error without the file's name ('in "<unicode string>", line 3') and an empty
    file as 'Unexpected config'; a config that is not a file path (an inline YAML string) is left to it.
    """
    import yaml

    path = Path(value).expanduser()
    if not path.exists():
        looks_inline = any(c in value for c in "{}:\n")
        return None if looks_inline else f"config file '{value}' does not exist."
    if path.is_dir():
        return f"config file '{value}' is a directory, not a YAML file."
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return f"config file '{value}' cannot be read: {getattr(err, 'strerror', None) or err}."
    try:
        content = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"config file '{value}' is not valid YAML: {err.problem or err.context}{where}."
    except yaml.YAMLError as err:
        return f"config file '{value}' is not valid YAML: {str(err).splitlines()[0]}."
    if content is None:
        return f"config file '{value}' is empty: it needs at least one section (trainer:, model:, data:, ...)."
    if not isinstance(content, dict):
        kind = type(content).__name__
        return f"config file '{value}' holds a YAML {kind}, not sections (trainer:, model:, data:, ...)."
    return None


def _config_files_problem(argv: list[str]) -> str | None:
    """The first ``--config`` file that is missing, unreadable, not YAML or empty, in one sentence, or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.partition("=")[2]
        else:
            continue
        problem = _config_file_problem(value)
        if problem is not None:
            return problem
    return None


def _yaml_file_in(argv: list[str]) -> str | None:
    """The problem of the first file argument in ``argv`` that is not valid YAML (a YAML file given to any option,
    e.g. ``--trainer trainer.yaml``), for a parse error that names no file."""
    for arg in argv:
        value = arg.partition("=")[2] if arg.startswith("--") else arg
        if value.endswith((".yaml", ".yml", ".json")) and Path(value).expanduser().is_file():
            problem = _config_file_problem(value)
            if problem is not None:
                return problem.replace("config file", "file", 1)
    return None


def _trainer_setting_error(err: BaseException) -> str | None:
    """Lightning's ValueError for a trainer setting the data cannot honour, as qlit's sentence (else ``None``)."""
    found = re.search(
        r"`val_check_interval` \((\d+)\) must be less than or equal to the number of the training "
        r"batches \((\d+)\)",
        str(err),
    )
    if found is None:
        return None
    interval, batches = found.groups()
    return (
        f"trainer.val_check_interval ({interval}) is more than the {batches} training batches of an epoch: lower it, "
        "give a fraction of the epoch (0.5), or set trainer.check_val_every_n_epoch: null to count batches across "
        "epochs."
    )


def main(args: Any = None) -> None:
    """Entry point of the ``qlit`` command."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        raise SystemExit(0 if argv else 2)
    _quiet_third_party()
    if argv[0] == "board":  # TensorBoard with the study's cards pinned; handles its own errors, loads no PyTorch
        from qlit.study.board import main as board_main

        board_main(argv[1:])
        return
    if argv[0] == "eval":  # handles its own errors; its --help loads neither PyTorch nor Lightning
        from qlit.evaluate import main as eval_main

        eval_main(argv[1:])
        return
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        if argv[0] == "export":  # not a Trainer method, so not a LightningCLI subcommand
            from qlit.export import export_main

            export_main(argv[1:])
            return
        if argv[0] == "compare":  # reads finished runs' logs; handles its own errors
            from qlit.study.compare import main as compare_main

            compare_main(argv[1:])
            return
        if argv[0] == "sweep":  # runs each cell as its own `qlit fit` process; handles its own errors
            from qlit.study.sweep import main as sweep_main

            sweep_main(argv[1:])
            return
        problem = _config_files_problem(argv)
        if problem is not None:  # a usage error, like any other the parser finds
            print(f"qlit: error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        from qlit.trainer_cli import QlitCLI, quiet_console

        quiet_console()
        QlitCLI(args=args)
    except (QlitError, ValueError) as err:
        # jsonargparse re-raises what a constructor refuses (QLitModule's checks) as a ValueError about Union
        # subtypes; the QlitError it wraps is the sentence for the user.
        cause = qlit_error_in(err) or _trainer_setting_error(err)
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
        message = str(err)
        if '"<unicode string>"' in message:  # a YAML syntax error in a file given to some option
            message = _yaml_file_in(argv) or message
        sentence = concise_parse_error(message)
        if re.search(r"unrecognized arguments: --(optimizer|lr_scheduler)\b", sentence):
            sentence += " (the optimizer and its schedule are options of the model: --model.init_args.optimizer...)"
        print(f"qlit: error: {sentence} (see `{command} --help`)", file=sys.stderr)
        raise SystemExit(2) from None
