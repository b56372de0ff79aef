"""SST-2 (Socher et al. 2013): movie-review sentences → "positive" / "negative", judged by accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qlit.data.base import QLitDataModule
from qlit.data.render import Example
from qlit.tasks import LabelWordTask

_INSTRUCTION = "Is the sentiment of this movie review positive or negative? Answer with one word."


class SST2DataModule(QLitDataModule):
    """SST-2 sentiment classification as instruction → label word, with completion-only loss.

    The hub's ``test`` split has no labels (all -1), so validation is the default evaluation split.

    Args:
        path: hub id (``stanfordnlp/sst2``; ``nyu-mll/glue`` with ``name: sst2`` works too), a local directory
            of split files with columns ``idx``, ``sentence``, ``label``, or ``qlit-samples/sst2``.
        label_words: the answer word for label 0 and for label 1.
        **kwargs: the options of :class:`~qlit.data.base.QLitDataModule`.
    """

    dataset_name = "SST-2"
    columns = {"sentence": str, "label": int}

    def __init__(
        self,
        path: str = "stanfordnlp/sst2",
        label_words: tuple[str, str] = ("negative", "positive"),
        **kwargs: Any,
    ) -> None:
        super().__init__(path=path, **kwargs)
        self.label_words = tuple(label_words)

    def check_row(self, row: Mapping[str, Any]) -> tuple[str, str] | None:
        if row["label"] not in (0, 1):
            return "label", f"expected 0 or 1, got {row['label']}"
        if not row["sentence"].strip():
            return "sentence", "empty sentence"
        return None

    def to_example(self, row: Mapping[str, Any]) -> Example:
        user = f"{_INSTRUCTION}\n\nReview: {row['sentence']}"
        return self.renderer.example(user, self.label_words[row["label"]], "Sentiment:", {"class_label": row["label"]})

    def format_options(self) -> dict[str, Any]:
        return {"label_words": self.label_words, "chat": self.use_chat()}

    def build_task(self) -> LabelWordTask:
        answers = [self.to_example({"sentence": "x", "label": i}).answer for i in (0, 1)]
        first = [self.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers]
        return LabelWordTask(self.label_words, first)
