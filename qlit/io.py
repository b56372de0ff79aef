"""Writing files and folders atomically: beside the target, then renamed into place.

A reader (a resume, a loader, a second process) sees either the old content or the whole new content, never a
half-written file; an interrupted write leaves at most a staging path beside the target, ``.<name>.tmp-<pid>@<host>``,
which :func:`remove_stale` deletes once that process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_STAGING = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:@(?P<host>.+))?$")
# A PID names a process only on its own machine; several machines may share a folder (multi-node runs).
_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
# A staging path of another machine is left alone until it has not changed for this long.
FOREIGN_STALE_AFTER_S = 24 * 3600


def staging_path(target: str | os.PathLike) -> Path:
    """Where this process stages ``target``: a dot-named sibling that carries its PID and machine."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}@{_HOST}")


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path beside ``target``; on a clean exit it replaces ``target``, on an error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
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
    staging = staging_path(target)
    # Our PID on a leftover is a dead process's that had the same PID (ours removes its staging when it fails).
    shutil.rmtree(staging, ignore_errors=True)
    # Created with the usual permissions, as mkdir would.
    staging.mkdir()
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


def discard(path: str | os.PathLike) -> None:
    """Remove a folder or file at once for every reader: renamed to this process's staging name, then deleted.

    A kill in the middle leaves a staging path that :func:`remove_stale` deletes, never a half-deleted folder that a
    reader would take for the real one. A path that another process removed first is no error.
    """
    path = Path(path)
    trash = staging_path(path)
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def remove_stale(folder: str | os.PathLike) -> list[Path]:
    """Delete the staging paths in ``folder`` left by processes that are gone (a kill, a crash, a full disk).

    Only names of the form ``.<name>.tmp-<pid>@<host>`` are touched: of this machine when no process with that PID
    is alive, of another machine (whose processes cannot be seen from here) once unchanged for
    :data:`FOREIGN_STALE_AFTER_S`. Returns what was removed.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no such folder, or not ours to read
        return removed
    for entry in entries:
        match = _STAGING.match(entry.name)
        if match is None:
            continue
        try:
            if match["host"] in (None, _HOST):
                if pid_alive(int(match["pid"])):
                    continue
            elif time.time() - _last_change(entry) < FOREIGN_STALE_AFTER_S:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another process cleaned it first
            continue
        except OSError:  # not ours to delete (a read-only or shared folder): leave it
            continue
        removed.append(entry)
    return removed


def _last_change(path: Path) -> float:
    """The latest modification time of a path and, for a folder, of what it holds (a file grows while written)."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [entry.stat(follow_symlinks=False).st_mtime for entry in os.scandir(path)]
    return max(times)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: keep what might be in use
    return True


def content_hash(path: str | os.PathLike) -> str:
    """A 128-bit hash of a file's bytes, read in chunks (a large file never sits in memory whole).

    XXH3 (the hash ``datasets`` fingerprints with, so always installed beside it): it tells apart any two contents
    met in practice at several GB/s, where SHA-256 reads a few hundred MB/s; nothing here guards against forgery.
    """
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
