"""Data loading that a checkpoint can resume exactly: per-epoch seeded order, and a position within the epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``, so a resumed run sees the same order as the original.

    ``RandomSampler`` with a generator carries hidden state from epoch to epoch, which a fresh process after a
    resume cannot reproduce. Lightning calls :meth:`set_epoch` at every epoch start.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch goes into Lightning checkpoints (the ``_Stateful`` protocol).

    A run resumed from a mid-epoch checkpoint continues with the batch after the last one trained, instead of
    replaying the epoch from its start. The position is read from ``batches_done`` (the trainer's count of
    processed batches) rather than counted here, because Lightning fetches one batch ahead of training.
    Skipped batches are fetched and dropped: tokenised rows cost only their padding to skip.

    Args:
        batches_done: returns how many batches of the current epoch have been trained.
        *args, **kwargs: the arguments of ``torch.utils.data.DataLoader``.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        iterator = super().__iter__()
        # A checkpoint taken on an epoch's last batch resumes at the start of the next epoch: nothing to skip.
        if not skip or skip >= len(self):
            return iterator
        return self._skipping(iterator, skip)

    @staticmethod
    def _skipping(iterator: Iterator[Any], skip: int) -> Iterator[Any]:
        for index, batch in enumerate(iterator):
            if index >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self.batches_done() if self.batches_done is not None else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_done", 0))
