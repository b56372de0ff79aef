"""IndicVault, Hinglish (``maya-research/IndicVault``, config ``Hinglish``): conversational SFT in Hinglish."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from qlit.data.base import QLitDataModule
from qlit.data.render import Example
from qlit.errors import QlitError
from qlit.tasks import GenerationTask

# The API-failure texts some rows hold instead of an answer: "ERROR: ...", "No API keys available",
# "Error: rate limit exceeded, please retry".
DEFAULT_ERROR_PATTERN = r"^\s*error\b|no api keys available|rate limit exceeded"


class IndicVaultDataModule(QLitDataModule):
    """Question → response as one chat turn (the model's chat template; plain ``User:``/``Assistant:`` for base models).

    Rows whose response is an API error rather than an answer are skipped, and their count logged once per split.
    The hub has only a train split: validation is carved from it (``val_fraction``). Validation logs a few
    generations as TensorBoard text (``val/samples``) beside loss and perplexity.

    Args:
        path: hub id (``maya-research/IndicVault``), a local directory or files with columns ``question`` and
            ``response``, or ``qlit-samples/indicvault_hinglish``.
        name: the hub config: the language (``Hinglish``).
        system_prompt: a system message put before every question (``None``: none, the template's default).
        error_pattern: regular expression (case-insensitive) that marks a response as an API error to skip.
        text_samples: how many generations are logged as text per validation pass.
        **kwargs: the options of :class:`~qlit.data.base.QLitDataModule`.
    """

    dataset_name = "IndicVault"
    columns = {"question": str, "response": str}

    def __init__(
        self,
        path: str = "maya-research/IndicVault",
        name: str | None = "Hinglish",
        system_prompt: str | None = None,
        error_pattern: str = DEFAULT_ERROR_PATTERN,
        text_samples: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(path=path, name=name, **kwargs)
        self.system_prompt = system_prompt
        try:
            self.error_pattern = re.compile(error_pattern, re.IGNORECASE)
        except re.error as err:
            msg = f"data.init_args.error_pattern '{error_pattern}' is not a regular expression: {err}."
            raise QlitError(msg) from None
        self.text_samples = text_samples

    def check_row(self, row: Mapping[str, Any]) -> tuple[str, str] | None:
        if not row["question"].strip():
            return "question", "empty question"
        if not row["response"].strip():
            return "response", "empty response"
        return None

    def is_error(self, response: str) -> bool:
        return self.error_pattern.search(response) is not None

    def to_example(self, row: Mapping[str, Any]) -> Example | None:
        if self.is_error(row["response"]):
            return None
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages += [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["response"]}]
        return Example.conversation(messages)

    def skip_reason(self) -> str:
        return "API error text instead of a response"

    def format_options(self) -> dict[str, Any]:
        return {"chat": self.use_chat(), "system": self.system_prompt, "errors": self.error_pattern.pattern}

    def build_task(self) -> GenerationTask:
        return GenerationTask(text_samples=self.text_samples)
