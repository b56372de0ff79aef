"""Every command in README.md and docs/*.md is checked, every relative link and repository path they name exists.

The convention a page follows:

- A fenced block marked ``bash``, ``sh`` or ``shell`` holds commands: each line that is not empty or a comment is
  one command, a line ending in ``\\`` goes on on the next, and ``# ...`` after a command is a comment. In a
  ``console`` block only the lines that start with ``$ `` are commands; the others are their output. ``&&``, ``;``
  and ``|`` (written between spaces) separate commands; ``> FILE`` is dropped.
- Output, file contents and anything else that is not to be run goes in a block marked otherwise (``text``,
  ``yaml``, ...).
- A command is checked by what it names, for real but cheaply: nothing trains, loads weights or downloads.
    - ``qlit SUBCOMMAND ...`` (also ``.venv/bin/qlit``, ``python -m qlit``, or after ``srun`` or ``torchrun ... -m``):
      parsed in this process by the subcommand's own parser, which is stopped right after it has parsed (an unknown
      option, a bad value or a missing ``--config`` file fails; ``--help`` prints and exits 0). A ``qlit sweep``
      study file is loaded as a study too (every cell of the shipped studies is parsed by ``tests/test_sweep.py``).
    - ``make TARGET [VAR=value]``: the target and the variable are the Makefile's.
    - ``python tools/X.py ...``: the script exists and its argparse parser accepts the options (a script without one
      takes none).
    - ``python -c CODE``: the code compiles. ``pip install -e ".[extra]"``: pyproject declares the extra.
      ``pytest -m MARKER``: pyproject registers the marker. ``source .venv/bin/activate``: the environment ``make``
      creates.
    - the commands of :data:`ALLOWED` (other programs' own commands), as they are.
  Any other command fails the test: give it a check here, or show it in a ``text`` block.
- Every argument that names a path in the repository's own folders (:data:`REPO_DIRS`) must exist, and so must every
  such path anywhere in a page (``<name>`` placeholders match any name); every ``qlit.…`` or ``peft.…`` name in
  inline code or a ``class_path`` must import.
- Every relative link ``[text](target)`` points at a file, and its ``#anchor`` at a heading of that page.
- The README is a guide: at most :data:`README_MAX_LINES` lines, linking every page of docs/.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import jsonargparse
import pytest
from helpers import ROOT

README_MAX_LINES = 250
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_BLOCKS = ("bash", "sh", "shell", "console")
#: Other programs' commands, shown as they are: their options are not qlit's to check.
ALLOWED = {"hf", "tensorboard"}
#: Folders of the repository: a path into them that a page names must exist.
REPO_DIRS = ("configs", "docs", "qlit", "tests", "tools")
#: Roots of dotted names (``qlit.data.SST2DataModule``) that a page's inline code must be able to import.
IMPORTED_ROOTS = ("qlit", "peft")

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_REPO_PATH = re.compile(r"(?<![\w./<>-])((?:" + "|".join(REPO_DIRS) + r")/[\w./<>*-]*)")
_DOTTED = re.compile(r"`((?:" + "|".join(IMPORTED_ROOTS) + r")(?:\.\w+)+)`|class_path:\s*((?:qlit|peft)(?:\.\w+)+)")
_ENV = re.compile(r"^[A-Za-z_]\w*=")


# ----- reading a page -------------------------------------------------------------------------------------------------
def blocks(text: str) -> Iterator[tuple[str, int, list[str]]]:
    """Each fenced block of a Markdown page: (its language, the line number of its first line, its lines)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language = match.group(1), match.group(2).lower()
        start = i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        yield language, start + 1, lines[start:i]
        i += 1


def prose(text: str, keep: tuple[str, ...] = ()) -> str:
    """The page without its fenced blocks, but for those of the languages in ``keep`` (``"*"``: all but commands)."""
    kept, inside = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if inside is None and match:
            inside, language = match.group(1), match.group(2).lower()
            shown = language in keep or ("*" in keep and language not in COMMAND_BLOCKS)
        elif inside is not None and line.strip().startswith(inside):
            inside = None
        elif inside is None or shown:
            kept.append(line)
    return "\n".join(kept)


def commands(text: str) -> Iterator[tuple[int, str]]:
    """Each command of the page's command blocks: (its line number, the command as written)."""
    for language, first, lines in blocks(text):
        if language not in COMMAND_BLOCKS:
            continue
        pending, at = "", first
        for offset, line in enumerate(lines):
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not pending:
                at = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command, pending = (pending + line).strip(), ""
            if command and not command.startswith("#"):
                yield at, command


def split_command(command: str) -> list[list[str]]:
    """The words of each simple command in ``command``: comments, environment assignments and ``> FILE`` dropped."""
    words = shlex.split(command, comments=True)
    parts: list[list[str]] = [[]]
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in ("&&", ";", "|", "||"):
            parts.append([])
        elif word in (">", ">>", "2>", "2>&1", "<"):
            skip_next = word != "2>&1"
        elif not parts[-1] and _ENV.match(word):
            continue
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in prose(page.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


# ----- checking a command ---------------------------------------------------------------------------------------------
class _Parsed(Exception):
    """Raised by the patched parsers once the outermost parse of a command line has succeeded."""


@contextlib.contextmanager
def parse_only() -> Iterator[None]:
    """argparse and jsonargparse parsers that stop the program right after a successful parse (nothing else runs)."""
    depth = [0]

    def stopping(original):
        def parse_args(self, *args, **kwargs):
            depth[0] += 1
            try:
                namespace = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(namespace)
            return namespace

        return parse_args

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stopping(argparse.ArgumentParser.parse_args))
        patch.setattr(jsonargparse.ArgumentParser, "parse_args", stopping(jsonargparse.ArgumentParser.parse_args))
        yield


def parses(call, argv: list[str]) -> str | None:
    """None when ``call(argv)`` parses ``argv`` (or prints its help and exits 0), else what went wrong."""
    out = io.StringIO()
    try:
        with parse_only(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            call(argv)
    except _Parsed:
        return None
    except SystemExit as exit_:
        if not exit_.code:
            return None
        lines = [line for line in out.getvalue().splitlines() if line.strip()]
        return f"exits {exit_.code}: {lines[-1] if lines else ''}"
    except Exception as err:  # whatever went wrong is the finding
        return f"{type(err).__name__}: {err}"
    return "ran without parsing any command line"


def check_qlit(args: list[str]) -> str | None:
    from qlit.cli import main

    problem = parses(main, args)
    if problem is None and args[:1] == ["sweep"]:
        studies = [a for a in args[1:] if not a.startswith("-") and a.endswith((".yaml", ".yml"))]
        if studies:
            from qlit.study.sweep import load_study

            try:
                load_study(studies[0])
            except Exception as err:  # the study's own sentence, or whatever went wrong
                return f"study {studies[0]}: {err}"
    return problem


def check_make(args: list[str]) -> str | None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.MULTILINE))
    variables = set(re.findall(r"^([A-Za-z_]\w*)\s*[?:+]?=", makefile, re.MULTILINE))
    for arg in args:
        name = arg.partition("=")[0]
        if "=" in arg and name not in variables:
            return f"the Makefile has no variable {name}"
        if "=" not in arg and arg not in targets:
            return f"the Makefile has no target {arg}"
    return None


def check_tool(script: str, args: list[str]) -> str | None:
    path = ROOT / script
    if not path.is_file():
        return f"{script} does not exist"
    if "parse_args" not in path.read_text():
        return f"{script} takes no options, given {args}" if args else None
    spec = importlib.util.spec_from_file_location(f"_doc_tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return parses(module.main, args)


def check_python(args: list[str]) -> str | None:
    while args and args[0] == "-W":
        args = args[2:]
    if args[:2] == ["-m", "qlit"]:
        return check_qlit(args[2:])
    if args[:2] == ["-m", "pytest"]:
        return check_pytest(args[2:])
    if args[:1] == ["-c"]:
        try:
            compile(args[1], "<python -c>", "exec")
        except SyntaxError as err:
            return f"python -c: {err}"
        return None
    if args and args[0].endswith(".py"):
        return check_tool(args[0], args[1:])
    return f"no check for python {' '.join(args)}"


def check_pip(args: list[str]) -> str | None:
    if args[:2] != ["install", "-e"] or len(args) != 3:
        return f"no check for pip {' '.join(args)}"
    extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", args[2])
    if extras is None:
        return f"pip install -e {args[2]}: not this project"
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    declared = set(re.findall(r"^([\w-]+)\s*=", section, re.MULTILINE))
    missing = [e for e in (extras.group(1) or "").split(",") if e and e not in declared]
    return f"pyproject declares no extra {missing[0]}" if missing else None


def check_pytest(args: list[str]) -> str | None:
    section = (ROOT / "pyproject.toml").read_text().split("markers = [")[1].split("]")[0]
    markers = set(re.findall(r'"(\w+):', section))
    for flag, value in zip(args, args[1:], strict=False):
        named = set(re.findall(r"\w+", value)) - {"and", "or", "not"}
        if flag == "-m" and not named <= markers:
            return f"pytest marker {value} is not registered"
    return None


def check_command(words: list[str]) -> str | None:
    """None when the command ``words`` is right, else what is wrong with it."""
    program, args = Path(words[0]).name if words[0].startswith(".venv/") else words[0], words[1:]
    for arg in args:
        value = arg.partition("=")[2] if arg.startswith("--") and "=" in arg else arg
        if _REPO_PATH.fullmatch(value) and not repo_path_exists(value):
            return f"{value} does not exist"
    if program == "qlit":
        return check_qlit(args)
    if program in ("python", "python3"):
        return check_python(args)
    if program == "make":
        return check_make(args)
    if program == "pip":
        return check_pip(args)
    if program == "pytest":
        return check_pytest(args)
    if program == "srun":
        return check_command(args)
    if program == "torchrun":
        return check_python(args[args.index("-m") :]) if "-m" in args else "torchrun without -m qlit"
    if program == "source":
        return None if args == [".venv/bin/activate"] else f"no check for source {' '.join(args)}"
    if program in ALLOWED:
        return None
    return f"no check for `{program}`: add one to tests/test_docs.py or show it in a text block"


# ----- checking a page ------------------------------------------------------------------------------------------------
def repo_path_exists(path: str) -> bool:
    path = path.rstrip(".,;:")
    pattern = re.sub(r"<[^>]*>", "*", path).rstrip("/")
    return any(ROOT.glob(pattern)) if "*" in pattern else (ROOT / pattern).exists()


def importable(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def problems(text: str, page: Path) -> list[str]:
    """Every problem of the Markdown ``text`` of ``page``: its commands, links, repository paths and dotted names."""
    found = []
    for line, command in commands(text):
        try:
            parts = split_command(command)
        except ValueError as err:
            found.append(f"line {line}: `{command}`: {err}")
            continue
        for words in parts:
            problem = check_command(words)
            if problem is not None:
                found.append(f"line {line}: `{command}`: {problem}")
    for target in _LINK.findall(prose(text)):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            found.append(f"link {target}: {file} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            found.append(f"link {target}: {linked.name} has no heading #{anchor}")
    rest = prose(text, keep=("*",))  # the commands' own paths were checked with them
    for path in _REPO_PATH.findall(rest):
        if not repo_path_exists(path):
            found.append(f"{path} does not exist")
    for name in {a or b for a, b in _DOTTED.findall(rest)}:
        if not importable(name):
            found.append(f"{name} does not import")
    return found


# ----- the tests ------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the pages' commands and paths are written from the repository's root
    monkeypatch.setattr("sys.argv", ["qlit"])  # LightningCLI warns when pytest's own arguments are there too


@pytest.mark.slow  # a second or so per command: each is parsed by its real parser
@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_command_link_and_path_of_a_page_checks_out(page):
    assert problems(page.read_text(), page) == []


def test_the_readme_is_a_guide_that_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _LINK.findall(readme)}
    pages = set((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 9
    assert {p.resolve() for p in pages} <= linked, sorted(p.name for p in pages if p.resolve() not in linked)


def test_pages_have_commands_to_check():
    # The convention is followed at all: the README and most pages show commands in bash blocks.
    counts = {page.name: len(list(commands(page.read_text()))) for page in PAGES}
    assert counts["README.md"] >= 5 and sum(counts.values()) >= 50, counts


def test_command_lines_are_read_as_a_shell_would():
    text = (
        "```bash\n"
        "make demo   # a comment\n"
        "qlit fit --config configs/demo.yaml \\\n"
        "  --trainer.max_epochs 1\n"
        "# a comment line\n"
        "```\n"
        "```console\n"
        "$ PYTHONWARNINGS=default qlit fit --config configs/demo.yaml --print_config > out.yaml\n"
        "some output\n"
        "```\n"
        "```text\n"
        "qlit not a command\n"
        "```\n"
    )
    found = [(line, split_command(command)) for line, command in commands(text)]
    assert found == [
        (2, [["make", "demo"]]),
        (3, [["qlit", "fit", "--config", "configs/demo.yaml", "--trainer.max_epochs", "1"]]),
        (8, [["qlit", "fit", "--config", "configs/demo.yaml", "--print_config"]]),
    ]
    assert slug("BitNet b1.58 (`quantization.mode: bitnet`)") == "bitnet-b158-quantizationmode-bitnet"


BAD = [
    ("qlit fit --config configs/demo.yaml --trainer.max_step 5", "max_step"),
    ("qlit fit --config configs/no_such_config.yaml", "no_such_config"),
    ("qlit validate --config configs/demo.yaml --model.init_args.quantization.mode nf5", "nf5"),
    ("qlit compare logs --sortt val/loss", "exits 2"),
    ("qlit eval --adapter logs/x/adapter --tasks mmlu --no_such_option 3", "exits 2"),
    ("qlit export --adapter logs/x/adapter --output out --no_such_option 3", "no_such_option"),
    ("qlit board logs --no-such-flag", "exits 2"),
    ("qlit sweep configs/studies/no_such_study.yaml", "no_such_study"),
    ("qlit sweep configs/studies/qwen_ranks_offline.yaml --dry-runn", "exits 2"),
    ("make no_such_target", "no target"),
    ("make demo NO_SUCH_VARIABLE=1", "no variable"),
    ("python tools/bench.py --no-such-flag", "exits 2"),
    ("python tools/no_such_tool.py", "does not exist"),
    ("python tools/bench_bitnet.py --tokens 4", "takes no options"),
    ("python -c 'import (('", "python -c"),
    ('pip install -e ".[no_such_extra]"', "no extra"),
    ("pytest -m no_such_marker", "not registered"),
    ("frobnicate --all", "no check"),
]


@pytest.mark.parametrize(("command", "expected"), BAD, ids=[c for c, _ in BAD])
def test_a_wrong_command_is_found(command, expected):
    found = problems(f"```bash\n{command}\n```\n", ROOT / "docs" / "page.md")
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("See [the data page](data.md#no-such-heading).", "no heading"),
        ("See [a page](no_such_page.md).", "does not exist"),
        ("![a plot](studies/no_such_plot.png)", "does not exist"),
        ("The code is in `qlit/no_such_module.py`.", "qlit/no_such_module.py does not exist"),
        ("The callbacks are `qlit/callbacks/<key>.py` and `qlit/no_such/<key>.py`.", "qlit/no_such/<key>.py"),
        ("Use `qlit.data.NoSuchDataModule`.", "does not import"),
        ("```yaml\nmodel:\n  class_path: qlit.module.NoSuchModule\n```", "does not import"),
    ],
)
def test_a_wrong_link_path_or_name_is_found(text, expected):
    found = problems(text, ROOT / "docs" / "page.md")
    assert len(found) == 1 and expected in found[0], found


def test_a_right_page_has_no_problems():
    text = (
        "See [data](data.md#packed-batches), [the README](../README.md) and `qlit/callbacks/<key>.py`.\n"
        "```bash\nqlit fit --config configs/demo.yaml --trainer.max_epochs 1\nmake demo CONFIG=configs/demo.yaml\n```\n"
    )
    assert problems(text, ROOT / "docs" / "page.md") == []
