"""The tokenised cache: a split tokenised once is read back by every later run with the same rows and options.

Kept under ``$QLIT_CACHE/tokenized``, one folder per split, named by a fingerprint of everything that changes the
tokens: the rows, the tokenizer and its chat template, the dataset's options and ``max_length``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlit.io import atomic_dir
from qlit.paths import cache_root

# Bump when tokenisation or formatting changes, so stale caches are not reused.
_FORMAT_VERSION = "3"
# The skipped-row counts of the split, so they are reported on every run, not only the one that tokenised.
_STATS_FILE = "qlit_stats.json"


def cache_dir(
    owner: type, split: str, rows: Any, tokenizer: Any, *, chat: bool, options: Mapping[str, Any], max_length: int
) -> Path:
    """The folder of one tokenised split.

    Args:
        owner: the DataModule class (its name opens the folder's name).
        split: the split's name.
        rows: the split's rows (a ``datasets.Dataset``, whose fingerprint follows its content and selection).
        tokenizer: the tokenizer.
        chat: whether the chat template renders the rows.
        options: the dataset's options that change the text of examples.
        max_length: longest example kept.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ident = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    payload = json.dumps(
        {
            "format": _FORMAT_VERSION,
            "class": f"{owner.__module__}.{owner.__qualname__}",
            "rows": rows._fingerprint,
            "split": split,
            "tokenizer": hashlib.sha256(ident.encode()).hexdigest(),
            "chat_template": tokenizer.chat_template if chat else None,
            "special": [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id],
            "options": dict(options),
            "max_length": max_length,
        },
        sort_keys=True,
        default=str,
    )
    return cache_root() / "tokenized" / f"{owner.__name__}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def load(folder: Path) -> tuple[Any, dict[str, int]] | None:
    """The cached split and its skipped-row counts, or ``None`` where it was not cached."""
    import datasets

    if not (folder / "dataset_info.json").is_file():
        return None
    stats = folder / _STATS_FILE
    return datasets.load_from_disk(str(folder)), json.loads(stats.read_text()) if stats.is_file() else {}


def save(folder: Path, encoded: Any, skipped: Mapping[str, int]) -> Any:
    """Write a tokenised split (a ``datasets.Dataset``) and its skipped-row counts; return it read back."""
    import datasets

    # Another rank may be writing the same split: the first one to finish wins, the content is the same.
    with atomic_dir(folder, replace=False) as staging:
        encoded.save_to_disk(str(staging))
        (staging / _STATS_FILE).write_text(json.dumps(dict(skipped)))
    return datasets.load_from_disk(str(folder))
