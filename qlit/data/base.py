"""What every qlit DataModule shares, as glue between the parts of the data layer.

Rows come from :mod:`qlit.data.sources`, are checked by :mod:`qlit.data.schema`, rendered as text by
:mod:`qlit.data.render`, tokenised with their loss mask by :mod:`qlit.data.encode`, kept by :mod:`qlit.data.cache`
and batched by :mod:`qlit.data.batching`. A dataset file subclasses :class:`QLitDataModule` and says only what is
particular to it: its default source, its columns, how a row becomes a prompt and an answer, and its task.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from qlit.data import cache
from qlit.data.batching import Collator, PackingCollator, data_loader
from qlit.data.encode import encode
from qlit.data.render import Example, Renderer
from qlit.data.schema import Columns, check_rows
from qlit.data.sources import Rows, check_data_files, iter_rows, load_source, select_splits
from qlit.errors import QlitError
from qlit.models.loading import load_tokenizer
from qlit.tasks import AUTO_GENERATION_SHARE, Task

__all__ = ["Example", "QLitDataModule"]

log = logging.getLogger(__name__)


class QLitDataModule(pl.LightningDataModule):
    """Base DataModule: hub id or local files → checked rows → prompt/answer → tokens with a loss mask.

    A row that breaks the dataset's schema stops set-up with an error naming the dataset, the split, the row
    (its 0-based number in the source split, i.e. in file order) and the column. Rows that a dataset's policy
    skips and rows longer than ``max_length`` are counted, and the counts logged once per split.

    Args:
        tokenizer: the model's name or directory; linked from ``model.init_args.pretrained`` by the CLI.
        path: a hub dataset id, a local directory of split files, a file format (``json``, ``csv``, ``parquet``)
            used with ``data_files``, or ``qlit-samples/<name>`` for a bundled offline sample.
        name: the hub config name (not used for bundled samples and ``data_files``).
        revision: the hub revision (branch, tag or commit); hub ids only.
        data_dir: a directory inside the hub repository or local directory to read (not used for bundled samples).
        data_files: local files in the dataset's schema (JSON Lines, JSON, CSV, Parquet): one path or a list
            (all read as the train split), or a mapping split → path(s). Their format comes from ``path`` when it
            names one (``json``, ``csv``, ``parquet``), else from the file endings.
        train_split: split to train on.
        val_split: split to validate on; carved from the train split (``val_fraction``, seeded) when absent.
        test_split: split for ``test`` and ``predict``; ``None`` uses the validation split.
        val_fraction: fraction of train carved out as validation where the source has no validation split.
        limit_train_samples: keep only N training rows, drawn at random with ``seed`` (e.g. 1 % of a dataset).
        limit_val_samples: keep only the first N validation rows.
        limit_test_samples: keep only the first N test/predict rows.
        max_length: longest tokenised example; longer rows are skipped and counted (never cut mid-answer).
        batch_size: training batch size per device: rows per batch; with packing, the batch's token budget is
            ``batch_size`` × ``max_length`` unless ``max_tokens`` says otherwise.
        packing: train on padding-free packed batches (:class:`~qlit.data.batching.PackingCollator`): whole samples
            back to back in one row, attention kept within each sample. ``None``: :attr:`packing_default`, which
            ``QLitModule`` sets: on where its variable-length attention kernel runs (CUDA), off for prompt-learning
            adapters; ``true`` insists. Under several processes every rank plans the same packed batches and trains
            every N-th, with as many batches per rank (the largest batches are split to even out the last round, so
            every sample trains once per epoch). Validation, test and predict batches are always padded rows.
        max_tokens: with packing, the token budget of one batch (bounds its memory); ``None``: ``batch_size`` ×
            ``max_length``, the most tokens ``batch_size`` padded rows can hold — the same memory bound, filled with
            real tokens instead of padding (as sample packing in Axolotl or TRL does). A step then trains more
            samples than ``batch_size``: lower the learning rate or ``batch_size`` if a recipe was tuned for rows.
        eval_batch_size: validation/test/predict batch size per device (defaults to ``batch_size``).
        generate_val_samples: how many rows of each validation (and test) pass are answered by greedy generation
            for the generation-based metrics (the first N rows of the split over all devices); ``None``: every row;
            ``auto``: every row where generating for them is estimated to take under a tenth of the training time
            between two validations, else the most rows that fit it (planned at the first validation of a fit and
            kept; ``validate`` and ``test`` take every row; :class:`~qlit.tasks.GenerationTask`).
        chat_template: format prompts with the tokenizer's chat template; ``None`` uses it when the tokenizer
            has one (instruct models) and a plain prompt otherwise (base models).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory for faster host-to-GPU copies (only where CUDA is available).
        pad_to_multiple_of: pad batches to a multiple of this (8 helps tensor cores); ``None`` pads to the longest.
        seed: seed of the train row draw and of the validation carve-out.
        cache: reuse tokenised data from an earlier run with the same rows, tokenizer and options (kept under
            ``$QLIT_CACHE/tokenized``).
    """

    #: Human name used in error messages.
    dataset_name: str = "dataset"
    #: Column → accepted Python type(s), checked on every row before tokenising.
    columns: Columns = {}

    def __init__(
        self,
        tokenizer: str = "",
        path: str = "",
        name: str | None = None,
        revision: str | None = None,
        data_dir: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str | None = None,
        val_fraction: float = 0.05,
        limit_train_samples: int | None = None,
        limit_val_samples: int | None = None,
        limit_test_samples: int | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        packing: bool | None = None,
        max_tokens: int | None = None,
        eval_batch_size: int | None = None,
        generate_val_samples: int | Literal["auto"] | None = "auto",
        chat_template: bool | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        pad_to_multiple_of: int | None = None,
        seed: int = 42,
        cache: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise QlitError(f"data.val_fraction must be between 0 and 1, got {val_fraction}.")
        # (option, value, smallest allowed): counts start at 1, limits at 0; null means "none" or "no limit".
        for option, value, least in [
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("max_length", max_length, 1),
            ("max_tokens", max_tokens, 1),
            ("limit_train_samples", limit_train_samples, 0),
            ("limit_val_samples", limit_val_samples, 0),
            ("limit_test_samples", limit_test_samples, 0),
            ("generate_val_samples", None if generate_val_samples == "auto" else generate_val_samples, 0),
        ]:
            if option == "generate_val_samples" and isinstance(value, str):
                raise QlitError(f"data.generate_val_samples must be a number of rows, auto or null, got {value!r}.")
            if value is not None and value < least:
                unless = "" if least else " (or null for no limit)"
                raise QlitError(f"data.{option} must be {least} or more{unless}, got {value}.")
        if max_tokens is not None and max_tokens < max_length:
            raise QlitError(
                f"data.max_tokens ({max_tokens}) is below data.max_length ({max_length}): a batch must hold the "
                "longest row, so raise max_tokens or lower max_length."
            )
        if not path and data_files is None:
            raise QlitError("data.init_args.path is empty: set a hub dataset id, a local directory or data_files.")
        check_data_files(
            self.dataset_name, path, data_files, train_split=train_split, val_split=val_split, test_split=test_split
        )
        self.tokenizer_name = tokenizer
        self.path = path
        self.name = name
        self.revision = revision
        self.data_dir = data_dir
        self.data_files = data_files
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.val_fraction = val_fraction
        self.limit_train_samples = limit_train_samples
        self.limit_val_samples = limit_val_samples
        self.limit_test_samples = limit_test_samples
        self.max_length = max_length
        self.batch_size = batch_size
        self.packing = packing
        #: What ``packing: null`` means; the LightningModule sets it once it knows the device and the adapter.
        self.packing_default = True
        self.max_tokens = max_tokens
        self.eval_batch_size = eval_batch_size or batch_size
        self.generate_val_samples = generate_val_samples
        self.chat_template = chat_template
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.cache = cache
        self.tokenizer: Any = None
        self.task: Task = Task()
        self.datasets: dict[str, Any] = {}
        #: How many splits were read from the tokenised cache rather than tokenised (tests read this).
        self.cache_hits = 0
        #: Split → {reason: rows skipped}, for the splits set up so far.
        self.skipped: dict[str, dict[str, int]] = {}

    # ----- what a dataset file provides -------------------------------------------------------------------------
    def required_columns(self, present: Sequence[str]) -> Columns:
        """Columns every row must have, with their types; ``present`` are the source's columns."""
        return self.columns

    def check_row(self, row: Mapping[str, Any]) -> tuple[str, str] | None:
        """Dataset-specific check of one row: ``(column, problem)`` when it breaks the schema, else ``None``."""
        return None

    def to_example(self, row: Mapping[str, Any]) -> Example | None:
        """Turn one checked row into prompt and answer text; ``None`` skips the row (a documented policy).

        A single-turn row goes through :meth:`Renderer.example <qlit.data.render.Renderer.example>` (of
        :attr:`renderer`), which lays it out for the chat template or as a plain prompt.
        """
        raise NotImplementedError

    def build_task(self) -> Task:
        """The task this dataset is judged by; called once the tokenizer is loaded."""
        return Task()

    def skip_reason(self) -> str:
        """Why :meth:`to_example` skips rows, for the log line that counts them."""
        return "rows the dataset's policy skips"

    def format_options(self) -> dict[str, Any]:
        """Options of a subclass that change the text of examples (part of the tokenised-cache key)."""
        return {}

    # ----- Lightning hooks ----------------------------------------------------------------------------------------
    @property
    def eval_split(self) -> str:
        """The split that ``test`` and ``predict`` read."""
        return self.test_split or self.val_split

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            if not self.tokenizer_name:
                raise QlitError("data.init_args.tokenizer is empty: set model.init_args.pretrained (it is linked).")
            self.tokenizer = load_tokenizer(self.tokenizer_name)
            self.task = self.build_task()
            if self.generate_val_samples == "auto":
                self.task.generation_share = AUTO_GENERATION_SHARE  # the task plans its rows (start_pass)
            else:
                self.task.max_generate_rows = self.generate_val_samples
        if stage in (None, "fit"):
            needed = [self.train_split, self.val_split]
        elif stage == "validate":
            needed = [self.val_split]
        else:
            needed = [self.eval_split]
        missing = list(dict.fromkeys(s for s in needed if s not in self.datasets))
        if missing:
            for split, rows in self._load_raw(missing).items():
                self.datasets[split] = self._tokenized(split, rows)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_split, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.eval_split, self.eval_batch_size, shuffle=False)

    # ----- loading ------------------------------------------------------------------------------------------------
    def _load_raw(self, wanted: Sequence[str]) -> dict[str, Rows]:
        """The rows of each wanted split: drawn, carved and limited as the options say, with their row numbers."""
        loaded = load_source(
            self.dataset_name,
            self.path,
            name=self.name,
            revision=self.revision,
            data_dir=self.data_dir,
            data_files=self.data_files,
            train_split=self.train_split,
        )
        return select_splits(
            loaded,
            wanted,
            dataset_name=self.dataset_name,
            origin=self.path or self.data_files,
            train_split=self.train_split,
            val_split=self.val_split,
            val_fraction=self.val_fraction,
            limits={"train": self.limit_train_samples, "val": self.limit_val_samples, "test": self.limit_test_samples},
            seed=self.seed,
        )

    # ----- rendering and tokenising -------------------------------------------------------------------------------
    @property
    def renderer(self) -> Renderer:
        """Renders this dataset's examples for the loaded tokenizer (:meth:`Renderer.example` for a single turn)."""
        return Renderer(self.tokenizer, self.chat_template, self.tokenizer_name, self.dataset_name)

    def use_chat(self) -> bool:
        """Whether examples go through the tokenizer's chat template (else plain prompts)."""
        return self.renderer.chat

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """A conversation as text (see :meth:`Renderer.render <qlit.data.render.Renderer.render>`)."""
        return self.renderer.render(messages, add_generation_prompt)

    def encode(self, example: Example, learn_all_turns: bool = False) -> dict[str, Any]:
        """Token ids and labels of an example (see :func:`qlit.data.encode.encode`)."""
        return encode(self.renderer, example, learn_all_turns)

    def encode_row(self, example: Example) -> dict[str, Any]:
        """:meth:`encode` with this dataset's options (a conversation dataset chooses which turns are learned)."""
        return self.encode(example)

    def _tokenized(self, split: str, rows: Rows) -> Any:
        import datasets

        folder = cache.cache_dir(
            type(self),
            split,
            rows.rows,
            self.tokenizer,
            chat=self.use_chat(),
            options=self.format_options(),
            max_length=self.max_length,
        )
        cached = cache.load(folder) if self.cache else None
        if cached is not None:
            self.cache_hits += 1
            out, skipped = cached
            self._report_skipped(split, skipped)
            return out
        check_rows(self.dataset_name, rows, self.required_columns(rows.rows.column_names), self.check_row)
        encoded: list[dict[str, Any]] = []
        skipped = {"policy": 0, "too_long": 0}
        for row in iter_rows(rows.rows):
            example = self.to_example(row)
            if example is None:
                skipped["policy"] += 1
                continue
            item = self.encode_row(example)
            if len(item["input_ids"]) > self.max_length:
                skipped["too_long"] += 1
                continue
            # Position in the tokenised split: a stable id that picks the rows to generate for on every device.
            item["row_index"] = len(encoded)
            encoded.append(item)
        self._report_skipped(split, skipped)
        if not encoded:
            raise QlitError(
                f"{self.dataset_name} split '{split}' has no usable rows: {skipped['policy']} skipped "
                f"({self.skip_reason()}), {skipped['too_long']} longer than max_length={self.max_length}."
            )
        out = datasets.Dataset.from_list(encoded)
        return cache.save(folder, out, skipped) if self.cache else out

    def _report_skipped(self, split: str, skipped: Mapping[str, int]) -> None:
        self.skipped[split] = dict(skipped)
        if skipped.get("policy"):
            reason = self.skip_reason()
            _warn("%s split '%s': skipped %d rows (%s)", self.dataset_name, split, skipped["policy"], reason)
        if skipped.get("too_long"):
            _warn(
                "%s split '%s': skipped %d rows longer than max_length=%d tokens",
                self.dataset_name,
                split,
                skipped["too_long"],
                self.max_length,
            )

    # ----- batching -----------------------------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise QlitError(f"{self.dataset_name} split '{split}' was not set up.")
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rows = self.datasets[split].with_format(None)
        packed = shuffle and self.packs()
        return data_loader(
            rows,
            PackingCollator() if packed else Collator(self.tokenizer.pad_token_id, self.pad_to_multiple_of),
            batch_size=batch_size,
            max_tokens=self._token_budget(rows) if packed else None,
            shuffle=shuffle,
            seed=self.seed,
            world_size=world,
            rank=trainer.global_rank if trainer is not None else 0,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            batches_done=self._batches_done if shuffle else None,
        )

    def packs(self) -> bool:
        """Whether training batches are packed (``packing``, or its default where ``None``).

        The same under several processes: each rank trains its own share of the packed batches (see
        :class:`~qlit.data.batching.TokenBudgetBatchSampler`).
        """
        return self.packing if self.packing is not None else self.packing_default

    def _token_budget(self, rows: Any) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        longest = max((len(ids) for ids in rows["input_ids"]), default=self.max_length)
        return max(longest, self.batch_size * self.max_length)

    def _batches_done(self) -> int:
        """Batches of the running training epoch already trained (what a checkpoint resumes after)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


@rank_zero_only
def _warn(msg: str, *args: Any) -> None:
    log.warning(msg, *args)
