"""Writing files and folders atomically: beside the target, then renamed into place.

A reader (a resume, a loader, a second process) sees either the old content or the whole new content, never a
half-written file; an interrupted write leaves at most a dot-named staging path beside the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path beside ``target``; on a clean exit it replaces ``target``, on an error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield staging
        os.replace(staging, target)
    finally:
        if staging.exists():
            staging.unlink()


@contextmanager
def atomic_dir(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on a clean exit it becomes ``target``.

    Args:
        target: the folder to write.
        replace: remove an existing ``target`` first. With ``False`` an existing ``target`` is kept and the staged
            one dropped: the case of two processes building the same content (a cache, a tiny model), where the
            first one to finish wins.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the folder private (0700); the folder it becomes gets the usual permissions, as mkdir would.
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:  # written meanwhile by another process: identical content, keep theirs
            if replace or not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
