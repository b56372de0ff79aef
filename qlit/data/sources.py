"""Where rows come from: a bundled sample, a hub id or local files, and the splits carved and limited from them."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from qlit.data.files import Location, diagnose, digest, first_line, locate, precheck
from qlit.errors import QlitError
from qlit.hub import looks_local, offline_unless_reachable
from qlit.paths import SAMPLES_DIR, cache_root

log = logging.getLogger(__name__)

SAMPLES_PREFIX = "qlit-samples/"
# `datasets`' packaged builders that read local files, and the file endings that name them.
BUILDERS = ("json", "csv", "parquet", "arrow", "text")
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")

DataFiles = str | list[str] | dict[str, str | list[str]]
# The option that reads a split usually so named (for the hint of an error, not as aliases).
_SPLIT_OPTIONS = {
    **dict.fromkeys(("train", "training"), "train_split"),
    **dict.fromkeys(("val", "valid", "validation", "dev", "eval", "evaluation"), "val_split"),
    **dict.fromkeys(("test", "testing", "predict"), "test_split"),
}


@dataclass
class Source:
    """A whole source as read: its splits, and for local files which files each split was read from."""

    splits: Any  # datasets.DatasetDict
    files: dict[str, list[str]] = field(default_factory=dict)  # split → its local files, in row order
    builder: str = ""  # the format of the local files (json, csv, parquet, arrow, text)
    digests: dict[str, str] = field(default_factory=dict)  # split → the content hash of its files


@dataclass
class Rows:
    """The rows of one split as used, with where they came from (for error messages that name the file's row)."""

    rows: Any  # datasets.Dataset
    source: str  # the split of the source they were read from ('train' for a carved validation split)
    index: np.ndarray  # row numbers in that source split
    files: list[str] = field(default_factory=list)  # the local files of that source split, in row order
    builder: str = ""  # their format

    def locate(self, row: int) -> Location | None:
        """Which local file, and which line or row of it, holds the source split's row ``row``."""
        return locate(self.files, self.builder, row) if self.files else None


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
        builder = _EXTENSIONS.get(Path(_strip_compression(one.lower())).suffix)
        if builder is None:
            raise QlitError(
                f"Cannot tell the format of data file '{one}' from its ending: use .jsonl, .json, .csv, .parquet or "
                f".arrow, or set data.init_args.path to the format (json, csv, parquet)."
            )
        found.add(builder)
    if len(found) != 1:
        raise QlitError(f"data_files mix formats ({', '.join(sorted(found))}): use one format for every split.")
    return found.pop()


def check_data_files(
    dataset_name: str,
    path: str,
    data_files: DataFiles | None,
    *,
    train_split: str,
    val_split: str,
    test_split: str | None,
) -> None:
    """``data_files`` as the config gives them: split names the DataModule reads, files that exist, one format.

    A split name is used as it is (no aliases such as ``val`` or ``dev``): a file under a name that no option reads
    would otherwise be loaded and then ignored.
    """
    if data_files is None:
        return
    if isinstance(data_files, Mapping):
        known = {train_split: "train_split", val_split: "val_split"}
        if test_split is not None:
            known.setdefault(test_split, "test_split")
        for split in data_files:
            if split not in known:
                reads = " and ".join(f"'{name}' ({option})" for name, option in known.items())
                option = _SPLIT_OPTIONS.get(split.lower())
                fix = f"set data.init_args.{option}: {split}" if option else "set the option of that split to it"
                raise QlitError(
                    f"data.init_args.data_files names split '{split}', which {dataset_name} does not read: it reads "
                    f"{reads}{'' if test_split else ', and a test split once test_split names it'} "
                    f"(names are taken as they are, no aliases); rename the key or {fix}."
                )
    missing = [f for f in _flatten(data_files) if not Path(f).expanduser().exists()]
    if missing:
        raise QlitError(f"Data file '{missing[0]}' of {dataset_name} does not exist.")
    if path not in BUILDERS:
        infer_builder(data_files)
        return
    for one in _flatten(data_files):
        named = _EXTENSIONS.get(Path(_strip_compression(one.lower())).suffix)
        if named is not None and named != path:
            raise QlitError(
                f"data.init_args.path is the format '{path}' but data file '{one}' is {named.upper()} by its ending: "
                f"set data.init_args.path to {named}."
            )


def load_source(
    dataset_name: str,
    path: str,
    *,
    name: str | None,
    revision: str | None,
    data_dir: str | None,
    data_files: DataFiles | None,
    train_split: str,
) -> Source:
    """The whole source, or a :class:`QlitError` that says how to get it or what is wrong with a local file.

    The arguments are the DataModule's options of the same names (see :class:`~qlit.data.base.QLitDataModule`);
    a source of one unnamed split becomes ``train_split``. Local files are read through a ``datasets`` cache keyed
    by their content (``datasets`` alone would key it by their modification times, and serve stale rows after an
    edit that kept the time).
    """
    kwargs: dict[str, Any] = {}
    if data_files is not None:
        # Local files carry no hub config or revision: only their format matters.
        source = path if path in BUILDERS else infer_builder(data_files)
        kwargs["data_files"] = (
            {k: _expand(v) for k, v in data_files.items()} if isinstance(data_files, Mapping) else _expand(data_files)
        )
    else:
        if path in BUILDERS:
            raise QlitError(f"data.init_args.path is the format '{path}': set data.init_args.data_files too.")
        source = resolve_source(path)
        if looks_local(source) and not Path(source).expanduser().exists():
            raise QlitError(f"Data path '{source}' of {dataset_name} does not exist.")
        # A bundled sample is one JSON Lines file per split: hub configs, revisions and folders do not apply.
        if not path.startswith(SAMPLES_PREFIX):
            kwargs.update(name=name, data_dir=data_dir)
            if not looks_local(source):
                kwargs["revision"] = revision
    if data_files is not None or looks_local(source):
        return _load_local(dataset_name, source, kwargs, train_split)
    import datasets

    with offline_unless_reachable() as online:
        try:
            loaded = datasets.load_dataset(source, **kwargs)
        except (ConnectionError, FileNotFoundError, OSError, ValueError, RuntimeError) as err:
            hint = "" if online else "the Hugging Face Hub is unreachable, and "
            raise QlitError(
                f"Could not load {dataset_name} '{path or source}': {hint}{first_line(err)} "
                f"— download it where the hub is reachable and point data.init_args.path at the local directory, "
                f"or set data.init_args.data_files."
            ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({train_split: loaded})
    return Source(loaded)


def _load_local(dataset_name: str, source: str, kwargs: dict[str, Any], train_split: str) -> Source:
    """Local files (or a local directory): checked, hashed, then read through a cache keyed by their content."""
    import datasets

    try:
        # Which files make each split, as `datasets` resolves them (directory layouts, globs); nothing is read yet.
        with offline_unless_reachable():
            resolved = datasets.load_dataset_builder(source, **kwargs).config.data_files or {}
    except (FileNotFoundError, OSError, ValueError, RuntimeError) as err:
        raise QlitError(f"Could not read {dataset_name} '{source}': {first_line(err)}.") from None
    split_files = {str(split): [str(f) for f in found] for split, found in resolved.items()}
    every = list(dict.fromkeys(f for found in split_files.values() for f in found))
    builder = source if source in BUILDERS else _builder_of(every)
    for one in every:
        problem = precheck(one, builder)
        if problem is not None:
            raise QlitError(f"Data file '{one}' of {dataset_name} {problem}.")
    digests = {split: digest(found) for split, found in split_files.items()}
    key = hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()[:20]
    cache_dir = cache_root() / "sources" / key
    # Read whole before by a run (the folder is keyed by the files' content, so they read well then).
    prepared = any(cache_dir.rglob("dataset_info.json"))
    try:
        with offline_unless_reachable():
            loaded = datasets.load_dataset(source, cache_dir=str(cache_dir), **kwargs)
    except Exception as err:  # `datasets`' many ways of saying a file is bad: find the file and the line
        for one in every:
            problem = diagnose(one, builder)
            if problem is not None:
                raise QlitError(f"Data file '{one}' of {dataset_name} {problem}.") from None
        if not prepared:
            raise QlitError(
                f"Could not read the data files of {dataset_name} ({', '.join(every)}): {first_line(err)}."
            ) from err
        # The files read well: what failed is the cache read from them (a killed write, a full disk).
        _warn(
            "Cache of %s's data files %s is unreadable (%s): rebuilding it.", dataset_name, cache_dir, first_line(err)
        )
        try:
            with offline_unless_reachable():
                loaded = datasets.load_dataset(
                    source, cache_dir=str(cache_dir), download_mode="force_redownload", **kwargs
                )
        except Exception as again:
            raise QlitError(
                f"Could not read the data files of {dataset_name} ({', '.join(every)}): {first_line(again)}."
            ) from again
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({train_split: loaded})
    return Source(loaded, split_files, builder, digests)


def select_splits(
    loaded: Source,
    wanted: Sequence[str],
    *,
    dataset_name: str,
    origin: Any,
    train_split: str,
    val_split: str,
    val_fraction: float,
    limits: Mapping[str, int | None],
    seed: int,
) -> dict[str, Rows]:
    """The rows of each wanted split of ``loaded``: drawn, carved and limited, with their row numbers.

    Train rows are drawn in a seeded random order (so a train limit is a random subset); a source without
    ``val_split`` has it carved from the front of that order (``val_fraction``). Any other split is read as it is.
    The rows' fingerprint (the tokenised cache's key) follows the content of local files, not their times.

    Args:
        loaded: the source, from :func:`load_source`.
        wanted: the splits to return.
        dataset_name: the dataset's name in error messages.
        origin: where the source was read from, in error messages (the path or the data files).
        train_split: the split trained on.
        val_split: the split validated on.
        val_fraction: fraction of train carved out as validation where the source has no ``val_split``.
        limits: ``train``, ``val`` and ``test``: keep only the first N rows of such a split (``None``: all).
        seed: seed of the train order.
    """
    splits = loaded.splits
    have = ", ".join(splits)
    val_carved = val_split not in splits
    out: dict[str, Rows] = {}
    train_order: np.ndarray | None = None
    n_val = 0
    if train_split in wanted or (val_split in wanted and val_carved):
        if train_split not in splits:
            raise QlitError(
                f"{dataset_name} '{origin}' has no split '{train_split}' (it has {have}): "
                f"set data.init_args.train_split."
            )
        n = len(splits[train_split])
        train_order = np.random.default_rng(seed).permutation(n)
        if val_carved:
            n_val = max(1, math.ceil(n * val_fraction))
            if n - n_val < 1:
                raise QlitError(f"{dataset_name} split '{train_split}' has too few rows ({n}) to carve.")
    for split in wanted:
        if split == train_split:
            assert train_order is not None
            index, source, limit = train_order[n_val:], train_split, limits["train"]
        elif split == val_split:
            if val_carved:
                assert train_order is not None
                index, source = train_order[:n_val], train_split
                _info(
                    "%s has no '%s' split: carved %d rows from '%s' (seed %d)", dataset_name, split, n_val, source, seed
                )
            else:
                index, source = np.arange(len(splits[split])), split
            limit = limits["val"]
        else:
            if split not in splits:
                raise QlitError(
                    f"{dataset_name} '{origin}' has no split '{split}' (it has {have}): set data.init_args.test_split."
                )
            index, source, limit = np.arange(len(splits[split])), split, limits["test"]
        if limit is not None:
            index = index[:limit]
        if len(index) == 0:
            raise QlitError(f"{dataset_name} split '{split}' has no rows (after its limit).")
        content = loaded.digests.get(source)
        # `datasets` fingerprints rows read from local files by the files' modification times: the content's hash
        # goes in, so that an edit that kept the time (and size) is a new fingerprint.
        fingerprint = (
            hashlib.sha256(f"{splits[source]._fingerprint}:{content}:".encode() + index.tobytes()).hexdigest()[:32]
            if content
            else None
        )
        out[split] = Rows(
            splits[source].select(index, new_fingerprint=fingerprint),
            source,
            index,
            loaded.files.get(source, []),
            loaded.builder,
        )
    return out


def iter_rows(rows: Any, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Rows of a ``datasets.Dataset`` as dicts, read a batch at a time (much faster than indexing row by row)."""
    for batch in rows.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            yield dict(zip(keys, values, strict=True))


def _strip_compression(name: str) -> str:
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    return name


def _builder_of(paths: Sequence[str]) -> str:
    """The format of a local directory's files, from their endings (``""`` where they do not tell)."""
    try:
        return infer_builder(list(paths))
    except QlitError:
        return ""


def _flatten(files: str | Sequence[str] | Mapping[str, str | Sequence[str]]) -> list[str]:
    values = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, Mapping) else files
    return [one for v in values for one in ([v] if isinstance(v, str) else v)]


def _expand(files: str | list[str]) -> str | list[str]:
    return str(Path(files).expanduser()) if isinstance(files, str) else [str(Path(f).expanduser()) for f in files]


@rank_zero_only
def _info(msg: str, *args: Any) -> None:
    log.info(msg, *args)


@rank_zero_only
def _warn(msg: str, *args: Any) -> None:
    log.warning(msg, *args)
