"""Your own data: JSON Lines (or JSON, CSV, Parquet) rows of ``prompt``/``completion`` or chat ``messages``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from qlit.data.base import QLitDataModule
from qlit.data.render import Example
from qlit.tasks import GenerationTask

_ROLES = ("system", "user", "assistant")


class JSONLDataModule(QLitDataModule):
    """Generic supervised fine-tuning data in one of two row formats.

    - completion: ``{"prompt": "...", "completion": "..."}``. With a chat template the prompt is the user message
      and the completion the assistant's answer; without one (base models) the two are concatenated as they are,
      so put any separator (``"\\nAnswer:"``, a leading space) in the data. The completion is learned.
    - messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: an optional
      leading system message, then user/assistant turns, ending with an assistant turn. Rendered with the chat
      template (plain ``User:``/``Assistant:`` lines for base models). By default every assistant turn is learned
      (``train_on: all``), each with its end token, and nothing else; ``train_on: last`` learns only the final
      turn, the earlier ones being context. Validation and ``predict`` always answer the last user turn.

    Validation logs a few generations as TensorBoard text (``val/samples``) beside loss and perplexity.

    Args:
        path: a local directory of ``<split>.jsonl`` files, a hub id with such columns, ``json`` (with
            ``data_files``), or ``qlit-samples/jsonl/completion`` / ``qlit-samples/jsonl/chat``.
        data_files: e.g. ``{train: train.jsonl, validation: val.jsonl}``; a single file is the train split and
            validation is carved from it.
        format: ``completion``, ``messages``, or ``auto`` (``messages`` when that column exists).
        prompt_column: column of the prompt (completion format).
        completion_column: column of the completion (completion format).
        messages_column: column of the conversation (messages format).
        train_on: which assistant turns of a conversation are learned: ``all`` or the ``last``.
        text_samples: how many generations are logged as text per validation pass.
        **kwargs: the options of :class:`~qlit.data.base.QLitDataModule`.
    """

    dataset_name = "JSONL"

    def __init__(
        self,
        path: str = "json",
        format: Literal["auto", "completion", "messages"] = "auto",
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        messages_column: str = "messages",
        train_on: Literal["all", "last"] = "all",
        text_samples: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(path=path, **kwargs)
        self.format = format
        self.prompt_column = prompt_column
        self.completion_column = completion_column
        self.messages_column = messages_column
        self.train_on = train_on
        self.text_samples = text_samples
        self._format: str | None = None if format == "auto" else format
        self._prompts_only = False

    def setup(self, stage: str | None = None) -> None:
        # `qlit predict` on a file of prompts: rows need no completion (there is nothing to learn or compare with).
        self._prompts_only = stage == "predict"
        super().setup(stage)

    def required_columns(self, present: Sequence[str]) -> Mapping[str, type | tuple[type, ...]]:
        if self.format == "auto":
            self._format = "messages" if self.messages_column in present else "completion"
        if self._format == "messages":
            return {self.messages_column: list}
        if self._prompts_only and self.completion_column not in present:
            return {self.prompt_column: str}
        return {self.prompt_column: str, self.completion_column: str}

    def _row_format(self, row: Mapping[str, Any]) -> str:
        if self._format is None:
            self._format = "messages" if self.messages_column in row else "completion"
        return self._format

    def check_row(self, row: Mapping[str, Any]) -> tuple[str, str] | None:
        if self._row_format(row) == "completion":
            if not row[self.prompt_column].strip():
                return self.prompt_column, "empty prompt"
            if self._prompts_only and self.completion_column not in row:
                return None
            if not row[self.completion_column].strip():
                return self.completion_column, "empty completion"
            return None
        column, messages = self.messages_column, row[self.messages_column]
        if not messages:
            return column, "empty conversation"
        for k, m in enumerate(messages):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return column, f"message {k} is not a {{role: str, content: str}} object: {m!r:.60}"
            if m["role"] not in _ROLES:
                return column, f"message {k} has role {m['role']!r}, not one of {', '.join(_ROLES)}"
            if m["role"] == "system" and k != 0:
                return column, f"message {k} is a system message; only the first message may be one"
            if m["role"] != "system" and not m["content"].strip():
                return column, f"message {k} ({m['role']}) is empty"
        turns = [m["role"] for m in messages if m["role"] != "system"]
        if not turns or turns[0] != "user":
            return column, "the first message after the system message must be a user message"
        if turns[-1] != "assistant":
            return column, "the conversation must end with an assistant message (the answer to learn)"
        return None

    def to_example(self, row: Mapping[str, Any]) -> Example:
        if self._row_format(row) == "messages":
            return Example.conversation(row[self.messages_column])
        return Example(row[self.prompt_column], row.get(self.completion_column) or "")

    def encode_row(self, example: Example) -> dict[str, Any]:
        return self.encode(example, learn_all_turns=self.train_on == "all")

    def format_options(self) -> dict[str, Any]:
        return {
            "chat": self.use_chat(),
            "format": self.format,
            "columns": [self.prompt_column, self.completion_column, self.messages_column],
            "train_on": self.train_on,
            "prompts_only": self._prompts_only,
        }

    def build_task(self) -> GenerationTask:
        return GenerationTask(text_samples=self.text_samples)
