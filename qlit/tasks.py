"""What a dataset is judged by: the task travels with the DataModule, so one LightningModule serves them all.

A task builds its torchmetrics collection and updates it from a validation batch. The LightningModule owns
loss and perplexity (every task has them) and asks the task for the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

# Generates greedy continuations for the prompts of a batch and returns their decoded text.
GenerateFn = Callable[[dict[str, Any]], list[str]]


class Task:
    """Language modelling only: loss and perplexity, which the LightningModule logs for every task."""

    #: How many of the validation rows a generation-based task generates for (bounded, so validation stays cheap).
    needs_generation: bool = False

    def metrics(self) -> MetricCollection:
        return MetricCollection({})

    def update(
        self, metrics: MetricCollection, batch: dict[str, Any], logits: torch.Tensor, generate: GenerateFn
    ) -> None:
        """Update ``metrics`` from one validation batch (``logits`` of the teacher-forced forward)."""

    def parse(self, generation: str) -> Any:
        """The prediction a generated text stands for (what ``qlit predict`` writes beside the text)."""
        return generation.strip()

    def epoch_end(self, module: Any, prefix: str) -> None:
        """Called after the epoch's metrics are logged (``prefix`` is ``val`` or ``test``): log text samples."""


class LabelWordTask(Task):
    """Classification as a label word: the class whose word's first token the model scores highest wins.

    Scoring the first answer token from the teacher-forced logits costs nothing beyond the loss forward and
    cannot produce an unparseable answer; it is the "scored label word" protocol of instruction-tuning evals.

    Args:
        label_words: the word of each class, in class-index order.
        first_token_ids: the first token id of each class's answer as the DataModule tokenises it; they
            must differ, or the classes could not be told apart from one token.
    """

    def __init__(self, label_words: Sequence[str], first_token_ids: Sequence[int]) -> None:
        if len(set(first_token_ids)) != len(first_token_ids):
            raise ValueError(f"label words {list(label_words)} share their first token: they cannot be scored apart")
        self.label_words = list(label_words)
        self.first_token_ids = torch.tensor(list(first_token_ids))

    def metrics(self) -> MetricCollection:
        return MetricCollection({"accuracy": MulticlassAccuracy(num_classes=len(self.label_words), average="micro")})

    def update(
        self, metrics: MetricCollection, batch: dict[str, Any], logits: torch.Tensor, generate: GenerateFn
    ) -> None:
        labels = batch["labels"]
        # Index of the first learned token in each row; the logits one position earlier predict it.
        first = (labels != -100).int().argmax(dim=1)
        rows = torch.arange(labels.size(0), device=labels.device)
        scores = logits[rows, first - 1][:, self.first_token_ids.to(logits.device)]
        metrics["accuracy"].update(scores.argmax(dim=-1), batch["class_label"])

    def parse(self, generation: str) -> Any:
        """The class word that the generation starts with, case-insensitively; ``None`` if it names none."""
        text = generation.strip().lower()
        for word in self.label_words:
            if text.startswith(word.lower()):
                return word
        return None
