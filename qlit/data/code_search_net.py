"""CodeSearchNet, Python (Husain et al. 2019): a function ↔ its docstring, judged by perplexity and BLEU.

The hub repository ``code-search-net/code_search_net`` holds a loading script, which recent ``datasets`` refuse to
run; its Parquet export (revision ``refs/convert/parquet``, one folder per language) has the same columns and is the
default source.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Mapping
from typing import Any, Literal

from qlit.data.base import QLitDataModule
from qlit.data.render import Example
from qlit.tasks import BLEUTask

# Fallback when the tokenizer gives up (Python 2 code, a function cut mid-string): the first triple-quoted string.
_TRIPLE_QUOTED = re.compile(r"[ \t]*[rRuUbB]{0,2}(\"\"\"|''')[\s\S]*?\1[ \t]*\n?")


def strip_docstring(code: str) -> str:
    """``code`` without the docstring of its (first) function, so that code → docstring is not a copy task.

    ``func_code_string`` includes the docstring; ``func_code_tokens`` leave it out but lose the layout.
    """
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return _TRIPLE_QUOTED.sub("", code, count=1)
    lines = code.splitlines(keepends=True)
    in_def = False
    for k, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.string in ("def", "class"):
            in_def = True
        elif in_def and tok.type == tokenize.NEWLINE:
            # The first statement of the body: a docstring if it is a lone string.
            rest = [t for t in tokens[k + 1 :] if t.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT)]
            if len(rest) >= 2 and rest[0].type == tokenize.STRING and rest[1].type in (tokenize.NEWLINE,):
                start, end = rest[0].start[0], rest[1].end[0]
                return "".join(lines[: start - 1] + lines[end:])
            return code
    return code


def first_paragraph(doc: str) -> str:
    """The docstring's summary: its first paragraph with lines joined (what ``func_documentation_tokens`` cover)."""
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


class CodeSearchNetDataModule(QLitDataModule):
    """Python functions and their docstrings, code → docstring by default, with completion-only loss.

    For code → docstring the docstring is removed from the code shown to the model. Validation generates for
    ``generate_val_samples`` rows and reports BLEU against the reference.

    Args:
        path: hub id of a copy with the CodeSearchNet columns (``func_code_string``, ``func_documentation_string``,
            optionally ``func_name``), a local directory or files, or ``qlit-samples/code_search_net``.
        revision: hub revision; ``refs/convert/parquet`` is the hub's Parquet export of the script-based repository.
        data_dir: folder of the language inside the repository (``python`` in the Parquet export).
        direction: ``code_to_doc`` (write the docstring of a function) or ``doc_to_code`` (write the function of a
            docstring and name).
        docstring: learn the docstring's ``summary`` (first paragraph, the usual code-summarisation target) or the
            ``full`` docstring.
        **kwargs: the options of :class:`~qlit.data.base.QLitDataModule`.
    """

    dataset_name = "CodeSearchNet"
    columns = {"func_code_string": str, "func_documentation_string": str}

    def __init__(
        self,
        path: str = "code-search-net/code_search_net",
        revision: str | None = "refs/convert/parquet",
        data_dir: str | None = "python",
        direction: Literal["code_to_doc", "doc_to_code"] = "code_to_doc",
        docstring: Literal["summary", "full"] = "summary",
        **kwargs: Any,
    ) -> None:
        super().__init__(path=path, revision=revision, data_dir=data_dir, **kwargs)
        self.direction = direction
        self.docstring = docstring

    def check_row(self, row: Mapping[str, Any]) -> tuple[str, str] | None:
        if not row["func_code_string"].strip():
            return "func_code_string", "empty code"
        if not row["func_documentation_string"].strip():
            return "func_documentation_string", "empty docstring"
        return None

    def to_example(self, row: Mapping[str, Any]) -> Example:
        doc = row["func_documentation_string"].strip()
        doc = first_paragraph(doc) if self.docstring == "summary" else doc
        code = strip_docstring(row["func_code_string"]).strip("\n")
        if self.direction == "code_to_doc":
            what = "a one-paragraph summary docstring" if self.docstring == "summary" else "the docstring"
            user = f"Write {what} for this Python function.\n\n```python\n{code}\n```"
            return self.renderer.example(user, doc, "Docstring:")
        name = row.get("func_name") or ""
        user = "Write a Python function" + (f" named {name}" if name else "") + f" that does this:\n\n{doc}"
        return self.renderer.example(user, code, "Code:\n")

    def format_options(self) -> dict[str, Any]:
        return {"chat": self.use_chat(), "direction": self.direction, "docstring": self.docstring}

    def build_task(self) -> BLEUTask:
        return BLEUTask()
