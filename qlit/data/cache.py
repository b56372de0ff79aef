"""The tokenised cache: a split tokenised once is read back by every later run with the same rows and options.

Kept under ``$QLIT_CACHE/tokenized``, one folder per split, named by a fingerprint of everything that changes the
tokens: the rows (for local files, their content hash), the tokenizer and its chat template, the dataset's options
and ``max_length``. Each folder ends with a checksum of every file it holds, written last: a folder that does not
verify (a full disk, a killed copy, an edit) is rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from qlit.data.files import first_line
from qlit.io import atomic_dir, content_hash, discard, remove_stale
from qlit.paths import cache_root

log = logging.getLogger(__name__)

# Bump when tokenisation, formatting or the folder's layout changes, so stale caches are not reused.
_FORMAT_VERSION = "4"
# The skipped-row counts of the split, so they are reported on every run, not only the one that tokenised.
_STATS_FILE = "qlit_stats.json"
# Size and content hash of every other file of the folder; written last, so its presence means the folder is complete.
_CHECKSUMS_FILE = "qlit_checksums.json"


def cache_dir(
    owner: type, split: str, rows: Any, tokenizer: Any, *, chat: bool, options: Mapping[str, Any], max_length: int
) -> Path:
    """The folder of one tokenised split.

    Args:
        owner: the DataModule class (its name opens the folder's name).
        split: the split's name.
        rows: the split's rows (a ``datasets.Dataset``, whose fingerprint follows its selection and, for local
            files, their content: :func:`qlit.data.sources.select_splits`).
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
    """The cached split and its skipped-row counts, or ``None`` where it is not cached.

    A folder that does not match its checksums, or that ``datasets`` cannot read, is removed (and so rebuilt by the
    caller), with one line saying so. Staging folders of killed runs beside it are removed too.
    """
    import datasets

    remove_stale(folder.parent)
    if not folder.exists():
        return None
    problem = _verify(folder)
    if problem is None:
        try:
            stats = json.loads((folder / _STATS_FILE).read_text())
            return datasets.load_from_disk(str(folder)), {str(k): int(v) for k, v in stats.items()}
        except Exception as err:  # verified bytes that this `datasets` cannot read (written by another version)
            problem = f"unreadable: {first_line(err)}"
    _warn("Tokenised cache %s is damaged (%s): rebuilding it.", folder, problem)
    discard(folder)
    return None


def save(folder: Path, encoded: Any, skipped: Mapping[str, int]) -> Any:
    """Write a tokenised split (a ``datasets.Dataset``) and its skipped-row counts; return it read back."""
    import datasets

    try:
        # Another rank may be writing the same split: the first one to finish wins, the content is the same.
        with atomic_dir(folder, replace=False) as staging:
            encoded.save_to_disk(str(staging))
            (staging / _STATS_FILE).write_text(json.dumps(dict(skipped)))
            checksums = {
                str(path.relative_to(staging)): {"size": path.stat().st_size, "xxh3_128": content_hash(path)}
                for path in sorted(staging.rglob("*"))
                if path.is_file()
            }
            (staging / _CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=1))
    except OSError as err:  # a full disk, a read-only cache: the cache saves time, the run does not need it
        _warn("Tokenised cache %s not written (%s): this run goes on without it.", folder, first_line(err))
        return encoded
    return datasets.load_from_disk(str(folder))


def _verify(folder: Path) -> str | None:
    """What is wrong with a cache folder, or ``None`` when every file matches its checksum."""
    try:
        checksums = json.loads((folder / _CHECKSUMS_FILE).read_text())
        expected = {str(name): (int(s["size"]), str(s["xxh3_128"])) for name, s in checksums.items()}
    except FileNotFoundError:
        return f"no {_CHECKSUMS_FILE}: an unfinished copy"
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"{_CHECKSUMS_FILE} is unreadable"
    if _STATS_FILE not in expected:
        return f"{_CHECKSUMS_FILE} lists no {_STATS_FILE}"
    for name, (size, digest) in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
        if content_hash(path) != digest:
            return f"{name} does not match its checksum"
    return None


@rank_zero_only
def _warn(msg: str, *args: Any) -> None:
    log.warning(msg, *args)
