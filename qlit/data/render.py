"""How a row is rendered as text: the chat template for instruct models, a plain prompt for base models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qlit.errors import QlitError

# Role names of the plain (no chat template) rendering of a conversation, for base models.
_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass
class Example:
    """One row turned into text.

    Single-turn rows set ``prompt`` (a user message for chat models, or the plain prompt text) and ``answer``.
    Conversations set ``messages`` (``role``/``content`` dicts ending with an assistant turn); ``prompt`` and
    ``answer`` are then its last user message and last assistant message (use :meth:`conversation`).

    Attributes:
        prompt: the user's text (what ``qlit predict`` reports as the instruction).
        answer: the text that is learned and that generations are compared with.
        extra: further fields that travel into batches (ints become tensors), e.g. a class label.
        system: a system message for the chat template (single-turn rows only).
        messages: the whole conversation, for rows that are one.
    """

    prompt: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    messages: list[dict[str, str]] | None = None

    @classmethod
    def conversation(cls, messages: Sequence[Mapping[str, str]], extra: dict[str, Any] | None = None) -> Example:
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        user = [m["content"] for m in turns if m["role"] == "user"]
        return cls(user[-1] if user else "", turns[-1]["content"], extra or {}, messages=turns)


class Renderer:
    """Examples as text for one tokenizer: through its chat template, or as plain prompts.

    Args:
        tokenizer: the model's tokenizer.
        chat_template: use the tokenizer's chat template; ``None`` uses it when the tokenizer has one.
        tokenizer_name: the tokenizer's name, in error messages.
        dataset_name: the dataset's name, in error messages.
    """

    def __init__(self, tokenizer: Any, chat_template: bool | None, tokenizer_name: str, dataset_name: str) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.tokenizer_name = tokenizer_name
        self.dataset_name = dataset_name

    @property
    def chat(self) -> bool:
        """Whether examples go through the chat template (read on every use: the tokenizer's template may change)."""
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if self.chat_template is None:
            return has_template
        if self.chat_template and not has_template:
            raise QlitError(f"data.chat_template is true but the tokenizer of '{self.tokenizer_name}' has none.")
        return self.chat_template

    def example(
        self, user: str, answer: str, cue: str, extra: dict[str, Any] | None = None, *, inline: bool = False
    ) -> Example:
        """A single-turn row in the format in use: the one place that chooses between chat and plain layout.

        With a chat template, ``user`` is the user message and ``answer`` the reply. A plain prompt is ``user``, a
        line break and the ``cue`` that asks for the answer (``Sentiment:``); the answer follows after a space, or
        on the next line when the cue ends with one.

        Args:
            user: the user's text.
            answer: the text to learn.
            cue: the words of a plain prompt that the answer follows.
            extra: further fields that travel into batches.
            inline: ``user`` is the row's own text up to the cue, its layout included, and the answer runs on
                right after the cue (``…\\n\\nPrice is $`` + ``120.00``). With a chat template the cue then opens
                the reply, and the user message is ``user`` without its surrounding whitespace.
        """
        extra = extra or {}
        if inline:
            return Example(user.strip(), cue + answer, extra) if self.chat else Example(user + cue, answer, extra)
        if self.chat:
            return Example(user, answer, extra)
        return Example(f"{user}\n{cue}", answer if cue.endswith("\n") else f" {answer}", extra)

    def prompt_text(self, example: Example) -> str:
        """The exact text before the (last) answer: chat template with a generation prompt, or the plain prompt."""
        if example.messages is not None:
            return self.render(example.messages[:-1], add_generation_prompt=True)
        if self.chat:
            messages = [{"role": "system", "content": example.system}] if example.system else []
            messages.append({"role": "user", "content": example.prompt})
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return example.prompt

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """A conversation as text: the chat template, or ``User: …`` / ``Assistant: …`` lines for base models."""
        if self.chat:
            try:
                return self.tokenizer.apply_chat_template(
                    list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
                )
            except Exception as err:  # jinja2's TemplateError: e.g. a template that has no system role
                raise QlitError(
                    f"The chat template of '{self.tokenizer_name}' refuses a {self.dataset_name} conversation "
                    f"({err}): drop the system message, or set data.init_args.chat_template: false."
                ) from None
        text = "".join(f"{_PLAIN_ROLES[m['role']]}: {m['content']}\n\n" for m in messages)
        return text + "Assistant:" if add_generation_prompt else text

    def learned_text(self, content: str) -> str:
        """The text learned for an assistant turn of a conversation (plain format: after ``Assistant:`` + space)."""
        return content if self.chat else f" {content}"

    def pieces(self, example: Example, learn_all_turns: bool = False) -> list[tuple[str, bool]]:
        """The example's text in order, as ``(text, learned)`` pieces; an end token follows every learned piece.

        Args:
            example: the row as text.
            learn_all_turns: for a conversation, learn every assistant turn rather than only the last. Needs a
                chat template that renders a conversation as its prefixes' renderings followed by the new turns
                (ChatML, Llama 3, and the plain format do); otherwise the masks could not be exact.
        """
        if example.messages is None:
            return [(self.prompt_text(example), False), (example.answer, True)]
        if not learn_all_turns:
            return [(self.prompt_text(example), False), (self.learned_text(example.answer), True)]
        messages = example.messages
        full = self.render(messages)
        eos = self.tokenizer.eos_token or ""
        out: list[tuple[str, bool]] = []
        pos = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            learned = self.learned_text(message["content"])
            if not full.startswith(before) or not full.startswith(learned, len(before)) or len(before) < pos:
                raise QlitError(
                    f"The chat template of '{self.tokenizer_name}' renders a conversation differently from its "
                    f"prefixes, so earlier assistant turns cannot be masked exactly: set data.init_args.train_on: last."
                )
            out += [(full[pos : len(before)], False), (learned, True)]
            pos = len(before) + len(learned)
            if eos and full.startswith(eos, pos):  # the end token is appended to the learned piece instead
                pos += len(eos)
        return out
