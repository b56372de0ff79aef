"""SQuAD v1.1 (Rajpurkar et al. 2016): context + question → the answer span, judged by exact match and F1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qlit.data.base import QLitDataModule
from qlit.data.render import Example
from qlit.tasks import SQuADTask

_INSTRUCTION = "Answer the question with a short span copied from the context."


class SQuADDataModule(QLitDataModule):
    """Extractive question answering as generation, with completion-only loss on the first gold answer.

    Validation generates answers greedily for ``generate_val_samples`` rows and scores them against every gold
    answer of the row (SQuAD's exact match and F1).

    Args:
        path: hub id (``rajpurkar/squad``), a local directory or files with columns ``id``, ``title``, ``context``,
            ``question``, ``answers`` = {``text``: [str], ``answer_start``: [int]}, or ``qlit-samples/squad``.
        **kwargs: the options of :class:`~qlit.data.base.QLitDataModule`.
    """

    dataset_name = "SQuAD"
    columns = {"id": str, "context": str, "question": str, "answers": dict}

    def __init__(self, path: str = "rajpurkar/squad", **kwargs: Any) -> None:
        super().__init__(path=path, **kwargs)

    def check_row(self, row: Mapping[str, Any]) -> tuple[str, str] | None:
        if not row["context"].strip():
            return "context", "empty context"
        if not row["question"].strip():
            return "question", "empty question"
        answers = row["answers"]
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return "answers.text", f"expected a list of strings, got {texts!r:.60}"
        if not isinstance(starts, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in starts):
            return "answers.answer_start", f"expected a list of ints, got {starts!r:.60}"
        if not texts:
            return "answers.text", "no answer"
        if len(texts) != len(starts):
            return "answers.answer_start", f"{len(starts)} starts for {len(texts)} answer texts"
        for k, (text, start) in enumerate(zip(texts, starts, strict=True)):
            if not text.strip():
                return "answers.text", f"answer {k} is empty"
            found = row["context"][start : start + len(text)]
            if found != text:
                return (
                    "answers.answer_start",
                    f"answer {k} starts at {start}, where the context reads {found!r:.60}, not {text!r:.60}",
                )
        return None

    def to_example(self, row: Mapping[str, Any]) -> Example:
        answers = list(row["answers"]["text"])
        user = f"{_INSTRUCTION}\n\nContext: {row['context']}\n\nQuestion: {row['question']}"
        return self.renderer.example(user, answers[0], "Answer:", {"gold_answers": answers})

    def format_options(self) -> dict[str, Any]:
        return {"chat": self.use_chat()}

    def build_task(self) -> SQuADTask:
        return SQuADTask()
