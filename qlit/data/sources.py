"""Where rows come from: a bundled sample, a hub id or local files, and the splits carved and limited from them."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from qlit.errors import QlitError
from qlit.hub import looks_local, offline_unless_reachable
from qlit.paths import SAMPLES_DIR

log = logging.getLogger(__name__)

SAMPLES_PREFIX = "qlit-samples/"
# `datasets`' packaged builders that read local files, and the file endings that name them.
BUILDERS = ("json", "csv", "parquet", "arrow", "text")
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")

DataFiles = str | list[str] | dict[str, str | list[str]]


@dataclass
class Rows:
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


def load_source(
    dataset_name: str,
    path: str,
    *,
    name: str | None,
    revision: str | None,
    data_dir: str | None,
    data_files: DataFiles | None,
    train_split: str,
) -> Any:
    """The whole source as a ``DatasetDict``, or a :class:`QlitError` that says how to get it.

    The arguments are the DataModule's options of the same names (see :class:`~qlit.data.base.QLitDataModule`);
    a source of one unnamed split becomes ``train_split``.
    """
    import datasets

    kwargs: dict[str, Any] = {}
    if data_files is not None:
        missing = [f for f in _flatten(data_files) if not Path(f).expanduser().exists()]
        if missing:
            raise QlitError(f"Data file '{missing[0]}' of {dataset_name} does not exist.")
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
    with offline_unless_reachable() as online:
        try:
            loaded = datasets.load_dataset(source, **kwargs)
        except (ConnectionError, FileNotFoundError, OSError, ValueError, RuntimeError) as err:
            hint = "" if online else "the Hugging Face Hub is unreachable, and "
            first = str(err).splitlines()[0] if str(err) else ""
            raise QlitError(
                f"Could not load {dataset_name} '{path or source}': {hint}{type(err).__name__}: {first} "
                f"— download it where the hub is reachable and point data.init_args.path at the local directory, "
                f"or set data.init_args.data_files."
            ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({train_split: loaded})
    return loaded


def select_splits(
    loaded: Any,
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

    Args:
        loaded: the source's ``DatasetDict``.
        wanted: the splits to return.
        dataset_name: the dataset's name in error messages.
        origin: where the source was read from, in error messages (the path or the data files).
        train_split: the split trained on.
        val_split: the split validated on.
        val_fraction: fraction of train carved out as validation where the source has no ``val_split``.
        limits: ``train``, ``val`` and ``test``: keep only the first N rows of such a split (``None``: all).
        seed: seed of the train order.
    """
    have = ", ".join(loaded)
    val_carved = val_split not in loaded
    out: dict[str, Rows] = {}
    train_order: np.ndarray | None = None
    n_val = 0
    if train_split in wanted or (val_split in wanted and val_carved):
        if train_split not in loaded:
            raise QlitError(
                f"{dataset_name} '{origin}' has no split '{train_split}' (it has {have}): "
                f"set data.init_args.train_split."
            )
        n = len(loaded[train_split])
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
                index, source = np.arange(len(loaded[split])), split
            limit = limits["val"]
        else:
            if split not in loaded:
                raise QlitError(
                    f"{dataset_name} '{origin}' has no split '{split}' (it has {have}): set data.init_args.test_split."
                )
            index, source, limit = np.arange(len(loaded[split])), split, limits["test"]
        if limit is not None:
            index = index[:limit]
        if len(index) == 0:
            raise QlitError(f"{dataset_name} split '{split}' has no rows (after its limit).")
        out[split] = Rows(loaded[source].select(index), source, index)
    return out


def iter_rows(rows: Any, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Rows of a ``datasets.Dataset`` as dicts, read a batch at a time (much faster than indexing row by row)."""
    for batch in rows.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            yield dict(zip(keys, values, strict=True))


def _flatten(files: str | Sequence[str] | Mapping[str, str | Sequence[str]]) -> list[str]:
    values = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, Mapping) else files
    return [one for v in values for one in ([v] if isinstance(v, str) else v)]


def _expand(files: str | list[str]) -> str | list[str]:
    return str(Path(files).expanduser()) if isinstance(files, str) else [str(Path(f).expanduser()) for f in files]


@rank_zero_only
def _info(msg: str, *args: Any) -> None:
    log.info(msg, *args)
