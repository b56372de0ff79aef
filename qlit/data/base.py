"""What every qlit DataModule shares: loading, schema checks, prompt formatting, loss masks, caching, collation.

A dataset file subclasses :class:`QLitDataModule` and says only what is particular to it: its default source,
its columns, how a row becomes a prompt and an answer, and its task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from qlit.errors import QlitError
from qlit.hub import looks_local, offline_unless_reachable
from qlit.models.loading import load_tokenizer
from qlit.models.tiny import cache_root
from qlit.tasks import Task

log = logging.getLogger(__name__)

SAMPLES_PREFIX = "qlit-samples/"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
# Bump when tokenisation or formatting changes, so stale caches are not reused.
_FORMAT_VERSION = "1"


@dataclass
class Example:
    """One row turned into text: ``prompt`` is a user message (chat models) or plain prompt text."""

    prompt: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)
    system: str | None = None


def resolve_source(path: str) -> str:
    """``qlit-samples/<name>`` → the bundled sample directory; anything else is a hub id or a path."""
    if path.startswith(SAMPLES_PREFIX):
        local = SAMPLES_DIR / path[len(SAMPLES_PREFIX) :]
        if not local.is_dir():
            names = sorted(p.name for p in SAMPLES_DIR.iterdir() if p.is_dir())
            raise QlitError(
                f"Unknown bundled sample '{path}': qlit ships {', '.join(SAMPLES_PREFIX + n for n in names)}."
            )
        return str(local)
    return path


class QLitDataModule(pl.LightningDataModule):
    """Base DataModule: hub id or local files → checked rows → prompt/answer → tokens with a loss mask.

    Args:
        tokenizer: the model's name or directory; linked from ``model.init_args.pretrained`` by the CLI.
        path: a hub dataset id, a local directory of split files, a file format name (``json``, ``csv``,
            ``parquet``) used with ``data_files``, or ``qlit-samples/<name>`` for a bundled offline sample.
        name: the hub config name.
        revision: the hub revision (branch, tag or commit).
        data_files: local files in the dataset's schema: one path, or a mapping split → path(s).
        train_split: split to train on.
        val_split: split to validate on; carved from the train split (``val_fraction``, seeded) when absent.
        val_fraction: fraction of train carved out as validation where the source has no validation split.
        limit_train_samples: keep only the first N training rows (after shuffling with ``seed``).
        limit_val_samples: keep only the first N validation rows.
        max_length: longest tokenised example; longer rows are skipped and counted (never cut mid-answer).
        batch_size: training batch size per device.
        eval_batch_size: validation/predict batch size per device (defaults to ``batch_size``).
        chat_template: format prompts with the tokenizer's chat template; ``None`` uses it when the tokenizer
            has one (instruct models) and a plain prompt otherwise (base models).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory for faster host-to-GPU copies.
        pad_to_multiple_of: pad batches to a multiple of this (8 helps tensor cores); ``None`` pads to the longest.
        seed: seed of the train shuffle, the validation carve-out and the sample limits.
        cache: reuse tokenised data from an earlier run with the same source, tokenizer and options.
    """

    #: Human name used in error messages.
    dataset_name: str = "dataset"
    #: Column → accepted Python type(s), checked on every row before tokenising.
    columns: Mapping[str, type | tuple[type, ...]] = {}

    def __init__(
        self,
        tokenizer: str = "",
        path: str = "",
        name: str | None = None,
        revision: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        val_fraction: float = 0.05,
        limit_train_samples: int | None = None,
        limit_val_samples: int | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
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
        self.tokenizer_name = tokenizer
        self.path = path
        self.name = name
        self.revision = revision
        self.data_files = data_files
        self.train_split = train_split
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.limit_train_samples = limit_train_samples
        self.limit_val_samples = limit_val_samples
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
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

    # ----- what a dataset file provides -------------------------------------------------------------------------
    def check_row(self, row: Mapping[str, Any]) -> tuple[str, str] | None:
        """Dataset-specific check of one row: ``(column, problem)`` when it breaks the schema, else ``None``."""
        return None

    def to_example(self, row: Mapping[str, Any]) -> Example | None:
        """Turn one checked row into prompt and answer text; ``None`` skips the row (a documented policy)."""
        raise NotImplementedError

    def build_task(self) -> Task:
        """The task this dataset is judged by; called once the tokenizer is loaded."""
        return Task()

    # ----- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            if not self.tokenizer_name:
                raise QlitError("data.init_args.tokenizer is empty: set model.init_args.pretrained (it is linked).")
            self.tokenizer = load_tokenizer(self.tokenizer_name)
            self.task = self.build_task()
        needed = [self.train_split, self.val_split] if stage in (None, "fit") else [self.val_split]
        missing = [s for s in needed if s not in self.datasets]
        if missing:
            raw = self._load_raw()
            for split in missing:
                self.datasets[split] = self._tokenized(split, raw[split])

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, self.eval_batch_size, shuffle=False)

    # ----- loading ------------------------------------------------------------------------------------------------
    def _load_raw(self) -> dict[str, Any]:
        import datasets

        source = resolve_source(self.path)
        kwargs: dict[str, Any] = {"name": self.name, "revision": self.revision}
        if self.data_files is not None:
            files = self.data_files
            for f in [files] if isinstance(files, str) else files.values() if isinstance(files, dict) else files:
                for one in [f] if isinstance(f, str) else f:
                    if not Path(one).expanduser().exists():
                        raise QlitError(f"Data file '{one}' of {self.dataset_name} does not exist.")
            kwargs["data_files"] = files
        elif looks_local(source) and not Path(source).expanduser().exists():
            raise QlitError(f"Data path '{source}' of {self.dataset_name} does not exist.")
        with offline_unless_reachable() as online:
            try:
                loaded = datasets.load_dataset(source, **kwargs)
            except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
                hint = "" if online else "the Hugging Face Hub is unreachable, and "
                raise QlitError(
                    f"Could not load {self.dataset_name} '{self.path}': {hint}{type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''} — download it where the hub is reachable and "
                    f"point data.init_args.path at the local directory, or set data.init_args.data_files."
                ) from None
        if self.train_split not in loaded:
            raise QlitError(
                f"{self.dataset_name} '{self.path}' has no split '{self.train_split}' (it has {', '.join(loaded)})."
            )
        train = loaded[self.train_split].shuffle(seed=self.seed)
        if self.val_split in loaded:
            val = loaded[self.val_split]
        else:
            parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
            train, val = parts["train"], parts["test"]
            log.info(
                "%s has no '%s' split: carved %d rows from train (seed %d)",
                self.dataset_name,
                self.val_split,
                len(val),
                self.seed,
            )
        if self.limit_train_samples is not None:
            train = train.select(range(min(self.limit_train_samples, len(train))))
        if self.limit_val_samples is not None:
            val = val.select(range(min(self.limit_val_samples, len(val))))
        return {self.train_split: train, self.val_split: val}

    # ----- checking, formatting and tokenising ----------------------------------------------------------------------
    def _check(self, split: str, rows: Any) -> None:
        present = set(rows.column_names)
        for column in self.columns:
            if column not in present:
                raise QlitError(
                    f"{self.dataset_name} split '{split}' has no column '{column}' "
                    f"(columns: {', '.join(sorted(present))})."
                )
        for i, row in enumerate(rows):
            for column, kind in self.columns.items():
                value = row[column]
                if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
                    raise QlitError(
                        f"{self.dataset_name} split '{split}' row {i} column '{column}': expected "
                        f"{_type_name(kind)}, got {type(value).__name__} {value!r:.60}."
                    )
            problem = self.check_row(row)
            if problem is not None:
                raise QlitError(f"{self.dataset_name} split '{split}' row {i} column '{problem[0]}': {problem[1]}.")

    def use_chat(self) -> bool:
        if self.chat_template is None:
            return bool(getattr(self.tokenizer, "chat_template", None))
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise QlitError(f"data.chat_template is true but the tokenizer of '{self.tokenizer_name}' has none.")
        return self.chat_template

    def prompt_text(self, example: Example) -> str:
        """The exact text before the answer: the chat template with a generation prompt, or the plain prompt."""
        if self.use_chat():
            messages = [{"role": "system", "content": example.system}] if example.system else []
            messages.append({"role": "user", "content": example.prompt})
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return example.prompt

    def encode(self, example: Example) -> dict[str, Any]:
        """Token ids with labels masked to -100 on the prompt, so only the answer and its end token are learned."""
        tok = self.tokenizer
        chat = self.use_chat()
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. a BOS).
        prompt_ids = tok(self.prompt_text(example), add_special_tokens=not chat)["input_ids"]
        answer_ids = tok(example.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {
            "input_ids": prompt_ids + answer_ids,
            "labels": [-100] * len(prompt_ids) + answer_ids,
            "prompt_length": len(prompt_ids),
            "reference": example.answer,
            **example.extra,
        }

    def _fingerprint(self, split: str, rows: Any) -> str:
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        ident = backend.to_str() if backend is not None else f"{tok.name_or_path}:{len(tok)}"
        payload = json.dumps(
            {
                "format": _FORMAT_VERSION,
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "rows": rows._fingerprint,
                "split": split,
                "tokenizer": hashlib.sha256(ident.encode()).hexdigest(),
                "chat_template": tok.chat_template if self.use_chat() else None,
                "special": [tok.eos_token_id, tok.pad_token_id, tok.bos_token_id],
                "options": self.format_options(),
                "max_length": self.max_length,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def format_options(self) -> dict[str, Any]:
        """Options of a subclass that change the text of examples (part of the tokenised-cache key)."""
        return {}

    def _tokenized(self, split: str, rows: Any) -> Any:
        import datasets

        cache_dir = cache_root() / "tokenized" / f"{type(self).__name__}-{self._fingerprint(split, rows)}"
        if self.cache and (cache_dir / "dataset_info.json").is_file():
            self.cache_hits += 1
            return datasets.load_from_disk(str(cache_dir))
        self._check(split, rows)
        encoded, skipped, too_long = [], 0, 0
        for row in rows:
            example = self.to_example(row)
            if example is None:
                skipped += 1
                continue
            item = self.encode(example)
            if len(item["input_ids"]) > self.max_length:
                too_long += 1
                continue
            encoded.append(item)
        if skipped:
            log.warning("%s split '%s': skipped %d rows (%s)", self.dataset_name, split, skipped, self.skip_reason())
        if too_long:
            log.warning(
                "%s split '%s': skipped %d rows longer than max_length=%d tokens",
                self.dataset_name,
                split,
                too_long,
                self.max_length,
            )
        if not encoded:
            raise QlitError(f"{self.dataset_name} split '{split}' has no usable rows (max_length={self.max_length}).")
        out = datasets.Dataset.from_list(encoded)
        if self.cache:
            # Written beside the target and renamed, so an interrupted run never leaves a half cache behind.
            tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            out.save_to_disk(str(tmp))
            try:
                tmp.rename(cache_dir)
            except OSError:  # written meanwhile by another process (another rank): identical content
                shutil.rmtree(tmp, ignore_errors=True)
            out = datasets.load_from_disk(str(cache_dir))
        return out

    def skip_reason(self) -> str:
        return "rows the dataset's policy skips"

    # ----- batching -----------------------------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise QlitError(f"{self.dataset_name} split '{split}' was not set up.")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.datasets[split].with_format(None),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator if shuffle else None,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Pad to the longest row (right for teacher forcing; prompts left-padded for generation)."""
        pad = self.tokenizer.pad_token_id
        length = max(len(r["input_ids"]) for r in rows)
        plength = max(r["prompt_length"] for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length, plength = -(-length // m) * m, -(-plength // m) * m
        n = len(rows)
        input_ids = torch.full((n, length), pad, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        prompt_ids = torch.full((n, plength), pad, dtype=torch.long)
        prompt_mask = torch.zeros((n, plength), dtype=torch.long)
        for i, r in enumerate(rows):
            ids, k = r["input_ids"], r["prompt_length"]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(r["labels"])
            attention[i, : len(ids)] = 1
            prompt_ids[i, plength - k :] = torch.tensor(ids[:k])
            prompt_mask[i, plength - k :] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "prompt_input_ids": prompt_ids,
            "prompt_attention_mask": prompt_mask,
            "reference": [r["reference"] for r in rows],
        }
        for key in rows[0]:
            if key not in ("input_ids", "labels", "prompt_length", "reference"):
                values = [r[key] for r in rows]
                batch[key] = torch.tensor(values) if isinstance(values[0], int | float) else values
        return batch


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
