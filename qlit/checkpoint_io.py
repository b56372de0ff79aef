"""Checkpoints written beside their target and loaded without running code (the Ctrl+C checkpoint is the
``interrupt`` callback, :mod:`qlit.callbacks.interrupt`)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities import rank_zero_info

from qlit.errors import QlitError
from qlit.io import atomic_file, remove_stale

# The run folders of Lightning's loggers: a new run writes into a new version_N beside the killed one's.
_VERSION = re.compile(r"^version_\d+$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, then renames it into place; loads with
    ``weights_only=True``.

    A crash, a kill or a full disk mid-write never leaves a truncated ``last.ckpt`` that a resume would fail on: the
    previous checkpoint stays whole until the new one is complete. Nothing goes through the system's temporary
    folder (Lightning's own save stages there, so a full ``/tmp`` broke checkpointing and a kill left full-size files
    there that nothing removed). A full disk is one sentence naming the folder. The temporary files of killed saves
    are removed on the next save into that folder (and into the other ``version_N`` folders beside it) and when a
    checkpoint is loaded from it.

    qlit checkpoints hold only tensors and plain containers, so the restricted unpickler of
    ``torch.load(weights_only=True)`` reads them and a tampered file cannot run code.
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        self._sweep(target.parent, siblings=True)
        try:
            with atomic_file(target) as staging, open(staging, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as err:
            if _no_space(err):
                raise QlitError(
                    f"No space left on {target.parent} to write checkpoint {target.name}: the previous checkpoint "
                    "is kept; free space there or point checkpoint.dirpath at another disk."
                ) from None
            raise

    def load_checkpoint(
        self, path: _PATH, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if get_filesystem(path).protocol in ("file", ("file", "local")):
            self._sweep(Path(path).parent, siblings=False)
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True if weights_only is None else weights_only, **kwargs)

    def _sweep(self, folder: Path, *, siblings: bool) -> None:
        """Remove killed saves' temporary files from ``folder`` (once per folder and process)."""
        folder = folder.resolve()
        if folder in self._swept:
            return
        self._swept.add(folder)
        folders = [folder]
        if siblings and _VERSION.match(folder.parent.name) and folder.parent.parent.is_dir():
            folders += [p / folder.name for p in folder.parent.parent.iterdir() if _VERSION.match(p.name)]
        removed = [path for one in dict.fromkeys(folders) for path in remove_stale(one)]
        if removed:
            rank_zero_info(f"Removed {len(removed)} temporary file(s) of interrupted checkpoint saves ({removed[0]}).")


def _no_space(err: BaseException | None) -> bool:
    """Whether ``err`` is, or was raised from, a full disk or quota (torch reports a failed write as its own
    RuntimeError, raised while the OSError is being handled)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False
