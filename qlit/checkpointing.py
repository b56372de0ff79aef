"""Checkpoints that survive a crash mid-write, and load without running code (the Ctrl+C checkpoint is the
``interrupt`` callback, :mod:`qlit.callbacks.interrupt`)."""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _atomic_save, get_filesystem
from lightning.fabric.utilities.types import _PATH

from qlit.io import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its target and renames it into place, so a crash or a kill mid-write never
    leaves a truncated ``last.ckpt`` that a resume would then fail on; loads with ``weights_only=True``.

    qlit checkpoints hold only tensors and plain containers, so the restricted unpickler of
    ``torch.load(weights_only=True)`` reads them and a tampered file cannot run code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as staging:
            _atomic_save(checkpoint, staging)

    def load_checkpoint(
        self, path: _PATH, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True if weights_only is None else weights_only, **kwargs)
