"""What every qlit DataModule shares: loading, schema checks, prompt formatting, loss masks, caching, collation.

A dataset file subclasses :class:`QLitDataModule` and says only what is particular to it: its default source,
its columns, how a row becomes a prompt and an answer, and its task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Sampler

from qlit.data.loader import EpochSeededSampler, ResumableDataLoader
from qlit.errors import QlitError
from qlit.hub import looks_local, offline_unless_reachable
from qlit.models.loading import load_tokenizer
from qlit.models.tiny import cache_root
from qlit.tasks import Task

log = logging.getLogger(__name__)

SAMPLES_PREFIX = "qlit-samples/"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
# Bump when tokenisation or formatting changes, so stale caches are not reused.
_FORMAT_VERSION = "2"
# `datasets`' packaged builders that read local files, and the file endings that name them.
_BUILDERS = ("json", "csv", "parquet", "arrow", "text")
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_STATS_FILE = "qlit_stats.json"
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


@dataclass
class _Rows:
    """The rows of one split as used, with where they came from (for error messages that name the file's row)."""

    rows: Any  # datasets.Dataset
    source: str  # the split of the source they were read from ('train' for a carved validation split)
    index: np.ndarray  # row numbers in that source split


def resolve_source(path: str) -> str:
    """``qlit-samples/<name>`` → the bundled sample directory; anything else is a hub id or a path."""
    if path.startswith(SAMPLES_PREFIX):
        local = SAMPLES_DIR / path[len(SAMPLES_PREFIX) :]
        if not local.is_dir():
            names = sorted(str(p.parent.relative_to(SAMPLES_DIR)) for p in SAMPLES_DIR.rglob("*.jsonl"))
            raise QlitError(
                f"Unknown bundled sample '{path}': qlit ships "
                f"{', '.join(SAMPLES_PREFIX + n for n in dict.fromkeys(names))}."
            )
        return str(local)
    return path


def infer_builder(files: str | Sequence[str] | Mapping[str, str | Sequence[str]]) -> str:
    """The ``datasets`` builder (``json``, ``csv``, ``parquet``, ``arrow``) that reads ``files``, from their endings."""
    found = set()
    for one in _flatten(files):
        name = one.lower()
        for suffix in _COMPRESSIONS:
            name = name.removesuffix(suffix)
        builder = _EXTENSIONS.get(Path(name).suffix)
        if builder is None:
            raise QlitError(
                f"Cannot tell the format of data file '{one}' from its ending: use .jsonl, .json, .csv, .parquet or "
                f".arrow, or set data.init_args.path to the format (json, csv, parquet)."
            )
        found.add(builder)
    if len(found) != 1:
        raise QlitError(f"data_files mix formats ({', '.join(sorted(found))}): use one format for every split.")
    return found.pop()


def _flatten(files: str | Sequence[str] | Mapping[str, str | Sequence[str]]) -> list[str]:
    values = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, Mapping) else files
    return [one for v in values for one in ([v] if isinstance(v, str) else v)]


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
        batch_size: training batch size per device.
        eval_batch_size: validation/test/predict batch size per device (defaults to ``batch_size``).
        generate_val_samples: how many rows of each validation (and test) pass are answered by greedy generation
            for the generation-based metrics (the first N rows of the split over all devices); ``None``: every row.
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
    columns: Mapping[str, type | tuple[type, ...]] = {}

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
        eval_batch_size: int | None = None,
        generate_val_samples: int | None = 32,
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
        for option, value in [
            ("limit_train_samples", limit_train_samples),
            ("limit_val_samples", limit_val_samples),
            ("limit_test_samples", limit_test_samples),
            ("generate_val_samples", generate_val_samples),
        ]:
            if value is not None and value < 0:
                raise QlitError(f"data.{option} must be 0 or more (or null for no limit), got {value}.")
        if not path and data_files is None:
            raise QlitError("data.init_args.path is empty: set a hub dataset id, a local directory or data_files.")
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
    def required_columns(self, present: Sequence[str]) -> Mapping[str, type | tuple[type, ...]]:
        """Columns every row must have, with their types; ``present`` are the source's columns."""
        return self.columns

    def check_row(self, row: Mapping[str, Any]) -> tuple[str, str] | None:
        """Dataset-specific check of one row: ``(column, problem)`` when it breaks the schema, else ``None``."""
        return None

    def to_example(self, row: Mapping[str, Any]) -> Example | None:
        """Turn one checked row into prompt and answer text; ``None`` skips the row (a documented policy)."""
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
    def _load_source(self) -> Any:
        """The whole source as a ``DatasetDict``, or a :class:`QlitError` that says how to get it."""
        import datasets

        kwargs: dict[str, Any] = {}
        if self.data_files is not None:
            missing = [f for f in _flatten(self.data_files) if not Path(f).expanduser().exists()]
            if missing:
                raise QlitError(f"Data file '{missing[0]}' of {self.dataset_name} does not exist.")
            # Local files carry no hub config or revision: only their format matters.
            source = self.path if self.path in _BUILDERS else infer_builder(self.data_files)
            files = self.data_files
            kwargs["data_files"] = (
                {k: _expand(v) for k, v in files.items()} if isinstance(files, Mapping) else _expand(files)
            )
        else:
            if self.path in _BUILDERS:
                raise QlitError(f"data.init_args.path is the format '{self.path}': set data.init_args.data_files too.")
            source = resolve_source(self.path)
            bundled = self.path.startswith(SAMPLES_PREFIX)
            if looks_local(source) and not Path(source).expanduser().exists():
                raise QlitError(f"Data path '{source}' of {self.dataset_name} does not exist.")
            # A bundled sample is one JSON Lines file per split: hub configs, revisions and folders do not apply.
            if not bundled:
                kwargs.update(name=self.name, data_dir=self.data_dir)
                if not looks_local(source):
                    kwargs["revision"] = self.revision
        with offline_unless_reachable() as online:
            try:
                loaded = datasets.load_dataset(source, **kwargs)
            except (ConnectionError, FileNotFoundError, OSError, ValueError, RuntimeError) as err:
                hint = "" if online else "the Hugging Face Hub is unreachable, and "
                first = str(err).splitlines()[0] if str(err) else ""
                raise QlitError(
                    f"Could not load {self.dataset_name} '{self.path or source}': {hint}{type(err).__name__}: {first} "
                    f"— download it where the hub is reachable and point data.init_args.path at the local directory, "
                    f"or set data.init_args.data_files."
                ) from None
        if not isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.DatasetDict({self.train_split: loaded})
        return loaded

    def _load_raw(self, wanted: Sequence[str]) -> dict[str, _Rows]:
        """The rows of each wanted split: drawn, carved and limited as the options say, with their row numbers."""
        loaded = self._load_source()
        have = ", ".join(loaded)
        val_carved = self.val_split not in loaded
        out: dict[str, _Rows] = {}
        train_order: np.ndarray | None = None
        n_val = 0
        if self.train_split in wanted or (self.val_split in wanted and val_carved):
            if self.train_split not in loaded:
                raise QlitError(
                    f"{self.dataset_name} '{self.path or self.data_files}' has no split '{self.train_split}' "
                    f"(it has {have}): set data.init_args.train_split."
                )
            n = len(loaded[self.train_split])
            train_order = np.random.default_rng(self.seed).permutation(n)
            if val_carved:
                n_val = max(1, math.ceil(n * self.val_fraction))
                if n - n_val < 1:
                    raise QlitError(f"{self.dataset_name} split '{self.train_split}' has too few rows ({n}) to carve.")
        for split in wanted:
            if split == self.train_split:
                assert train_order is not None
                index, source = train_order[n_val:], self.train_split
                limit = self.limit_train_samples
            elif split == self.val_split:
                if val_carved:
                    assert train_order is not None
                    index, source = train_order[:n_val], self.train_split
                    _info(
                        "%s has no '%s' split: carved %d rows from '%s' (seed %d)",
                        self.dataset_name,
                        split,
                        n_val,
                        source,
                        self.seed,
                    )
                else:
                    index, source = np.arange(len(loaded[split])), split
                limit = self.limit_val_samples
            else:
                if split not in loaded:
                    raise QlitError(
                        f"{self.dataset_name} '{self.path or self.data_files}' has no split '{split}' (it has {have}): "
                        f"set data.init_args.test_split."
                    )
                index, source, limit = np.arange(len(loaded[split])), split, self.limit_test_samples
            if limit is not None:
                index = index[:limit]
            if len(index) == 0:
                raise QlitError(f"{self.dataset_name} split '{split}' has no rows (after its limit).")
            out[split] = _Rows(loaded[source].select(index), source, index)
        return out

    # ----- checking, formatting and tokenising ----------------------------------------------------------------------
    def _check(self, rows: _Rows) -> None:
        """Every row against :attr:`columns` and :meth:`check_row`; the first problem is a :class:`QlitError`."""
        present = rows.rows.column_names
        required = self.required_columns(present)
        for column in required:
            if column not in present:
                raise QlitError(
                    f"{self.dataset_name} split '{rows.source}' has no column '{column}' "
                    f"(columns: {', '.join(sorted(present))})."
                )
        for i, row in zip(rows.index, _iter_rows(rows.rows), strict=True):
            for column, kind in required.items():
                value = row[column]
                kinds = kind if isinstance(kind, tuple) else (kind,)
                if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                    raise QlitError(
                        f"{self.dataset_name} split '{rows.source}' row {i} column '{column}': expected "
                        f"{' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__} {value!r:.60}."
                    )
            problem = self.check_row(row)
            if problem is not None:
                column, why = problem
                raise QlitError(f"{self.dataset_name} split '{rows.source}' row {i} column '{column}': {why}.")

    def use_chat(self) -> bool:
        if self.chat_template is None:
            return bool(getattr(self.tokenizer, "chat_template", None))
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise QlitError(f"data.chat_template is true but the tokenizer of '{self.tokenizer_name}' has none.")
        return self.chat_template

    def prompt_text(self, example: Example) -> str:
        """The exact text before the (last) answer: chat template with a generation prompt, or the plain prompt."""
        if example.messages is not None:
            return self.render(example.messages[:-1], add_generation_prompt=True)
        if self.use_chat():
            messages = [{"role": "system", "content": example.system}] if example.system else []
            messages.append({"role": "user", "content": example.prompt})
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return example.prompt

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """A conversation as text: the chat template, or ``User: …`` / ``Assistant: …`` lines for base models."""
        if self.use_chat():
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
        return content if self.use_chat() else f" {content}"

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

    def encode(self, example: Example, learn_all_turns: bool = False) -> dict[str, Any]:
        """Token ids with labels -100 everywhere but on the answer(s) and their end token.

        The pieces are tokenised one by one, so a label boundary never falls inside a token; the prompt for
        generation is everything before the last answer.
        """
        tok = self.tokenizer
        chat = self.use_chat()
        input_ids: list[int] = []
        labels: list[int] = []
        prompt_length = 0
        for k, (text, learned) in enumerate(self.pieces(example, learn_all_turns)):
            # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. a BOS).
            ids = tok(text, add_special_tokens=k == 0 and not chat)["input_ids"] if text else []
            if learned:
                prompt_length = len(input_ids)
                ids = ids + [tok.eos_token_id]
            input_ids += ids
            labels += ids if learned else [-100] * len(ids)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "prompt_length": prompt_length,
            "reference": example.answer.strip(),
            "instruction": example.prompt,
            **example.extra,
        }

    def encode_row(self, example: Example) -> dict[str, Any]:
        """:meth:`encode` with this dataset's options (a conversation dataset chooses which turns are learned)."""
        return self.encode(example)

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

    def _tokenized(self, split: str, rows: _Rows) -> Any:
        import datasets

        cache_dir = cache_root() / "tokenized" / f"{type(self).__name__}-{self._fingerprint(split, rows.rows)}"
        if self.cache and (cache_dir / "dataset_info.json").is_file():
            self.cache_hits += 1
            stats = cache_dir / _STATS_FILE
            self._report_skipped(split, json.loads(stats.read_text()) if stats.is_file() else {})
            return datasets.load_from_disk(str(cache_dir))
        self._check(rows)
        encoded: list[dict[str, Any]] = []
        skipped = {"policy": 0, "too_long": 0}
        for row in _iter_rows(rows.rows):
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
        if self.cache:
            # Written beside the target and renamed, so an interrupted run never leaves a half cache behind.
            tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            out.save_to_disk(str(tmp))
            (tmp / _STATS_FILE).write_text(json.dumps(skipped))
            try:
                tmp.rename(cache_dir)
            except OSError:  # written meanwhile by another process (another rank): identical content
                shutil.rmtree(tmp, ignore_errors=True)
            out = datasets.load_from_disk(str(cache_dir))
        return out

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
        rows = self.datasets[split].with_format(None)
        # The train order depends only on (seed, epoch) and the loader's position goes into checkpoints, so a run
        # resumed mid-epoch sees exactly the batches the uninterrupted run would have.
        sampler: Sampler[int] = EpochSeededSampler(len(rows), self.seed, shuffle=shuffle)
        world = self.trainer.world_size if self.trainer is not None else 1
        if not shuffle and 1 < world <= len(rows):
            # Lightning's default DistributedSampler repeats rows to even out the ranks, so some would be scored (and
            # generated for) twice; evaluation needs no equal batch counts, so every row goes to exactly one rank.
            rank = self.trainer.global_rank
            sampler = UnrepeatedDistributedSampler(rows, num_replicas=world, rank=rank, shuffle=False)
        return ResumableDataLoader(
            rows,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            batches_done=self._batches_done if shuffle else None,
        )

    def _batches_done(self) -> int:
        """Batches of the running training epoch already trained (what a checkpoint resumes after)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Pad to the longest row (right for teacher forcing; prompts left-padded for generation).

        Every further field travels along: ints and floats as tensors (``row_index``, class labels, prices),
        anything else as a list (``reference``, ``instruction``, gold answers).
        """
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
            if key not in ("input_ids", "labels", "prompt_length"):
                values = [r[key] for r in rows]
                batch[key] = torch.tensor(values) if isinstance(values[0], int | float) else values
        return batch


def _expand(files: str | list[str]) -> str | list[str]:
    return str(Path(files).expanduser()) if isinstance(files, str) else [str(Path(f).expanduser()) for f in files]


def _iter_rows(rows: Any, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Rows of a ``datasets.Dataset`` as dicts, read a batch at a time (much faster than indexing row by row)."""
    for batch in rows.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            yield dict(zip(keys, values, strict=True))


@rank_zero_only
def _warn(msg: str, *args: Any) -> None:
    log.warning(msg, *args)


@rank_zero_only
def _info(msg: str, *args: Any) -> None:
    log.info(msg, *args)
