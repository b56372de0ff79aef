"""Batching: tokenised rows → padded batches (:class:`Collator`) or packed rows by a token budget
(:class:`PackingCollator`, :class:`TokenBudgetBatchSampler`), in an order a checkpoint can resume exactly.

The order depends only on ``(seed, epoch)`` and the loader's position goes into checkpoints, so a run resumed
mid-epoch sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from qlit.batch import IGNORE_INDEX, TOKEN_KEYS, Batch


class Collator:
    """Pads rows to the longest one: right-padded for teacher forcing, prompts left-padded for generation.

    Every further field of a row travels along: ints and floats as tensors (``row_index``, class labels, prices),
    anything else as a list (``reference``, ``instruction``, gold answers).

    Args:
        pad_token_id: the tokenizer's padding token.
        pad_to_multiple_of: pad to a multiple of this (8 helps tensor cores); ``None`` pads to the longest row.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> Batch:
        pad = self.pad_token_id
        length = max(len(r["input_ids"]) for r in rows)
        plength = max(r["prompt_length"] for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length, plength = -(-length // m) * m, -(-plength // m) * m
        n = len(rows)
        input_ids = torch.full((n, length), pad, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        prompt_ids = torch.full((n, plength), pad, dtype=torch.long)
        prompt_mask = torch.zeros((n, plength), dtype=torch.long)
        for i, r in enumerate(rows):
            ids, k = r["input_ids"], r["prompt_length"]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(r["labels"])
            attention[i, : len(ids)] = 1
            if k:
                prompt_ids[i, plength - k :] = torch.tensor(ids[:k])
                prompt_mask[i, plength - k :] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "prompt_input_ids": prompt_ids,
            "prompt_attention_mask": prompt_mask,
        }
        for key in rows[0]:
            if key not in TOKEN_KEYS:
                values = [r[key] for r in rows]
                batch[key] = torch.tensor(values) if isinstance(values[0], int | float) else values
        return batch


class PackingCollator:
    """Concatenates rows into one padding-free row: position ids restart at every sample, and the sample bounds
    travel as ``cu_seq_lens`` (cumulative lengths, flash-attention's convention) so attention stays within a sample.

    The label of every sample's first token is :data:`IGNORE_INDEX`: the model predicts position ``t`` from position
    ``t - 1``, which for a sample's first token is the previous sample's last token. A sample's own first label is
    never learned unpacked either (nothing precedes it), so packed and unpacked samples learn the same tokens.
    """

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> Batch:
        lengths = [len(r["input_ids"]) for r in rows]
        input_ids = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.long)
        labels = torch.tensor([t for r in rows for t in r["labels"]], dtype=torch.long)
        starts = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        labels[starts[:-1].long()] = IGNORE_INDEX
        positions = torch.cat([torch.arange(n) for n in lengths])
        return {
            "input_ids": input_ids.unsqueeze(0),
            "labels": labels.unsqueeze(0),
            "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long),
            "position_ids": positions.unsqueeze(0),
            "cu_seq_lens": starts,
            "max_length": max(lengths),
        }


class TokenBudgetBatchSampler(DistributedSampler):
    """Batches of whole rows holding at most ``max_tokens`` tokens together, in an order fixed by ``(seed, epoch)``.

    Rows are taken in the epoch's shuffled order and a batch closes when the next row would overflow the budget, so
    memory is bounded by the budget rather than by the longest row, and a resumed run sees the same batches.

    Under several processes every rank plans the same batches (the order depends only on the seed and the epoch, the
    budget only on the split) and takes every ``world_size``-th. Every rank must take as many batches as the others,
    or one would wait forever in a gradient all-reduce the others never join; so when the epoch's batch count is not a
    multiple of ``world_size``, the batches with the most tokens are split in two (each half is within the budget)
    until it is. Every sample is then trained exactly once per epoch, neither dropped nor repeated; only an epoch
    with fewer rows than processes repeats its first batches to fill the last round.

    It yields one list of row numbers per batch and is a ``DistributedSampler``, so that a DataLoader built around it
    with ``batch_size=None`` is left as it is by Lightning, which otherwise re-creates a multi-process training
    loader around its own row sampler (which a token budget's batches cannot go through). Lightning calls
    :meth:`set_epoch` at every epoch start.

    Args:
        lengths: tokens of each row.
        max_tokens: the budget; at least the longest row.
        seed: seed of the order.
        shuffle: shuffle per epoch; ``False`` keeps the split's order.
        world_size: processes training together.
        rank: this process's rank.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        seed: int,
        shuffle: bool = True,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(list(lengths), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.world_size = world_size
        self._plan: tuple[int, list[list[int]]] | None = None

    def order(self) -> list[int]:
        """The epoch's row order (``EpochSeededSampler``'s: one permutation seeded by ``seed + epoch``)."""
        rows = EpochSeededSampler(len(self.lengths), self.seed, self.shuffle)
        rows.set_epoch(self.epoch)
        return list(rows)

    def plan(self) -> list[list[int]]:
        """Every rank's batches of the epoch, in order: batch ``i`` goes to rank ``i % world_size``."""
        batches: list[list[int]] = []
        current: list[int] = []
        tokens = 0
        for index in self.order():
            n = self.lengths[index]
            if current and tokens + n > self.max_tokens:
                batches.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += n
        if current:
            batches.append(current)
        return self._even_out(batches)

    def _even_out(self, batches: list[list[int]]) -> list[list[int]]:
        while len(batches) % self.world_size:
            splittable = [i for i, batch in enumerate(batches) if len(batch) > 1]
            if not splittable:
                # Fewer rows than processes: the last round repeats the first batches.
                short = -len(batches) % self.world_size
                return batches + [batches[i % len(batches)] for i in range(short)]
            i = max(splittable, key=lambda i: (sum(self.lengths[j] for j in batches[i]), i))
            half = len(batches[i]) // 2
            batches[i : i + 1] = [batches[i][:half], batches[i][half:]]
        return batches

    def _batches(self) -> list[list[int]]:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.plan()[self.rank :: self.world_size])
        return self._plan[1]

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        # Planned at the first batch, not when iter() is called: Lightning creates a resumed run's iterator before it
        # sets the epoch.
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


class _RowsByBatch(Dataset):
    """A split read one batch at a time: indexed by the list of row numbers :class:`TokenBudgetBatchSampler` yields."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: list[int]) -> list[Any]:
        getitems = getattr(self.rows, "__getitems__", None)  # a datasets.Dataset reads the rows in one go
        return getitems(list(indices)) if getitems is not None else [self.rows[i] for i in indices]


def data_loader(
    rows: Any,
    collator: Collator,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    max_tokens: int | None = None,
    world_size: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    batches_done: Callable[[], int] | None = None,
) -> DataLoader:
    """The loader of one tokenised split.

    Args:
        rows: the tokenised split (a ``datasets.Dataset`` without a format: rows come as dicts of lists).
        collator: turns a list of rows into a batch.
        batch_size: rows per batch (without ``max_tokens``).
        max_tokens: batch by a token budget instead (:class:`TokenBudgetBatchSampler`): as many whole rows as fit;
            under several processes each rank trains its own share of the batches.
        shuffle: train order (seeded per epoch); ``False``: the split's order.
        seed: seed of the train order.
        world_size: processes that train or evaluate together; each evaluation row goes to exactly one of them.
        rank: this process's rank among them.
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory for faster host-to-GPU copies.
        batches_done: returns how many batches of the running training epoch were trained (train loaders only).
    """
    loader_kwargs: dict[str, Any] = dict(
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        batches_done=batches_done,
    )
    if max_tokens is not None:
        lengths = [len(ids) for ids in _column(rows, "input_ids")]
        budget = TokenBudgetBatchSampler(lengths, max_tokens, seed, shuffle, world_size=world_size, rank=rank)
        # batch_size=None: the sampler's items are whole batches, which the collator receives as lists of rows.
        return ResumableDataLoader(_RowsByBatch(rows), sampler=budget, batch_size=None, **loader_kwargs)
    sampler: Sampler[int] = EpochSeededSampler(len(rows), seed, shuffle=shuffle)
    if not shuffle and 1 < world_size <= len(rows):
        # Lightning's default DistributedSampler repeats rows to even out the ranks, so some would be scored (and
        # generated for) twice; evaluation needs no equal batch counts, so every row goes to exactly one rank.
        sampler = UnrepeatedDistributedSampler(rows, num_replicas=world_size, rank=rank, shuffle=False)
    return ResumableDataLoader(rows, batch_size=batch_size, sampler=sampler, **loader_kwargs)


def _column(rows: Any, name: str) -> Any:
    # A datasets.Dataset reads one column without decoding the others; a list of dicts is read row by row.
    return rows[name] if hasattr(rows, "column_names") else [row[name] for row in rows]


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

    The position is stored with its epoch and applies only to that epoch: when the checkpoint closed its epoch (the
    last batch, or the last under ``limit_train_batches``), Lightning resumes with the next epoch, from its start.
    The decision waits for the first batch, because Lightning creates a resumed run's iterator before it sets the
    epoch of the sampler.

    Args:
        batches_done: returns how many batches of the current epoch have been trained.
        *args, **kwargs: the arguments of ``torch.utils.data.DataLoader``.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done
        self._resume: tuple[int | None, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        return self._batches(resume)

    def _batches(self, resume: tuple[int | None, int] | None) -> Iterator[Any]:
        skip = 0
        if resume is not None:
            epoch, done = resume
            # A checkpoint without its epoch (an older one) skips unless it was taken on the epoch's last batch.
            same_epoch = self.epoch == epoch if epoch is not None else done < len(self)
            skip = done if same_epoch else 0
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                yield batch

    @property
    def epoch(self) -> int | None:
        """The epoch whose order the sampler draws (``None`` for a sampler without epochs)."""
        for source in (self.batch_sampler, self.sampler):
            epoch = getattr(source, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return None

    def state_dict(self) -> dict[str, int]:
        state = {"batches_done": self.batches_done() if self.batches_done is not None else 0}
        if self.epoch is not None:
            state["epoch"] = self.epoch
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch = state.get("epoch")
        self._resume = (int(epoch) if epoch is not None else None, int(state.get("batches_done", 0)))
