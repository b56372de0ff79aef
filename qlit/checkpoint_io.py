"""Checkpoints written beside their target and loaded without running code (the Ctrl+C checkpoint is the
``interrupt`` callback, :mod:`qlit.callbacks.interrupt`); a checkpoint or adapter file that is empty, truncated or
foreign is one sentence naming it, found before any weight of the base is loaded."""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities import rank_zero_info

from qlit.errors import QlitError
from qlit.io import atomic_file, remove_stale

#: The adapter weights peft writes, in the order ``PeftModel.from_pretrained`` looks for them.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# What a file written by torch.save starts with: a zip archive (the format since PyTorch 1.6), or a pickle (legacy).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"
#: What Lightning writes into every checkpoint it saves, and reads first when loading one.
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"
#: The file of a checkpoint folder of shards that holds what is not a tensor (Lightning's name for it).
SHARDED_METADATA = "meta.pt"

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


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint folder of per-rank shards (a sharded run's, ``save_distributed_checkpoint``):
    PyTorch's distributed checkpoint beside Lightning's metadata file."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_METADATA).is_file() and (path / ".metadata").is_file()


def read_checkpoint(
    path: str | os.PathLike, what: str, *, hint: str | None = None, tensors: bool = True
) -> dict[str, Any]:
    """A Lightning checkpoint, loaded without running code and memory-mapped (its tensors are read when used).

    A checkpoint folder of per-rank shards (:func:`is_sharded_checkpoint`) is read whole into one process: its
    ``state_dict`` (gathered from the shards) and its metadata; ``optimizer_states`` holds an empty state per
    optimizer it stores.

    Args:
        path: the checkpoint file, or folder of shards.
        what: how the sentence names it (``"checkpoint 'last.ckpt'"``).
        hint: what to add to the sentence for a file that loads but is not a Lightning checkpoint.
        tensors: for a folder of shards, read its weights (``False``: an empty ``state_dict``, for a check of its
            metadata).

    Raises:
        QlitError: the file is missing, empty, truncated, not written by ``torch.save``, holds Python objects other
            than tensors and containers, or is not a Lightning checkpoint (no ``state_dict``, or no Lightning
            version: Lightning's loader fails on such a file with a bare ``KeyError``).
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _read_sharded(path, what, tensors=tensors)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        raise QlitError(f"{what} cannot be read: {err.strerror or err}.") from None
    ending = f"; {hint}." if hint else "."
    if not head:
        raise QlitError(f"{what} cannot be read as a checkpoint: it is empty (0 bytes), so its save did not finish.")
    if head[8:9] == b"{" and not head.startswith(_ZIP_MAGIC):  # 8 bytes of header length, then the JSON header
        raise QlitError(f"{what} is not a Lightning checkpoint: it is a safetensors file of weights{ending}")
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise QlitError(f"{what} cannot be read as a checkpoint: it is not a file written by torch.save.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the pickle protocol of a legacy file
            # The legacy (pickle) format cannot be memory-mapped.
            checkpoint = torch.load(path, map_location="cpu", mmap=head.startswith(_ZIP_MAGIC), weights_only=True)
    except Exception as err:  # torch.load's failures have no common type: zip, unpickling, EOF, OS errors
        raise QlitError(f"{what} cannot be read as a checkpoint: it {_unreadable(err, head)}.") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        kind = "a dict without one" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise QlitError(f"{what} is not a Lightning checkpoint: it holds no state_dict ({kind}){ending}")
    if LIGHTNING_VERSION_KEY not in checkpoint:  # Lightning's loader needs it to migrate the checkpoint
        raise QlitError(
            f"{what} is not a Lightning checkpoint: it records no {LIGHTNING_VERSION_KEY}, so Lightning did not "
            f"write it{ending}"
        )
    return checkpoint


def _read_sharded(path: Path, what: str, *, tensors: bool) -> dict[str, Any]:
    """:func:`read_checkpoint` of a folder of shards, in one process (no process group)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        checkpoint = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=True)
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:  # as in read_checkpoint: torch.load's and the reader's failures have no common type
        raise QlitError(
            f"{what} cannot be read as a checkpoint folder: {_first_line(err, type(err).__name__)}."
        ) from None
    if not isinstance(checkpoint, dict) or LIGHTNING_VERSION_KEY not in checkpoint:
        raise QlitError(
            f"{what} is not a Lightning checkpoint folder: its {SHARDED_METADATA} records no Lightning version."
        )
    checkpoint["state_dict"] = {}
    if tensors and any(key.startswith("state_dict.") for key in stored):
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        checkpoint["state_dict"] = _load_state_dict_from_keys({"state_dict"}, checkpoint_id=str(path))["state_dict"]
    optimizers = sorted({key.split(".", 1)[0] for key in stored if key.startswith("optimizer_")})
    if optimizers:
        checkpoint["optimizer_states"] = [{} for _ in optimizers]
    return checkpoint


def adapter_weight_names(adapter_dir: str | os.PathLike, what: str) -> list[str]:
    """The tensor names in a peft adapter's weights file, read from its header (the tensors are not loaded).

    Args:
        adapter_dir: the adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).
        what: how the sentence names the adapter (``"Adapter 'logs/x/adapter'"``).

    Raises:
        QlitError: no weights file, or one that is empty, truncated or not in its format.
    """
    directory = Path(adapter_dir)
    found = next((directory / name for name in ADAPTER_WEIGHTS if (directory / name).is_file()), None)
    if found is None:
        raise QlitError(f"{what} holds no weights: {ADAPTER_WEIGHTS[0]} is missing beside its adapter_config.json.")
    if found.suffix == ".bin":
        return list(read_checkpoint_file(found, f"'{found}'"))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(found), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        reason = _first_line(err, type(err).__name__).removeprefix("Error while deserializing header: ")
        message = f"'{found}' is truncated or not a safetensors file ({reason}): save the adapter again."
        raise QlitError(message) from None


def read_checkpoint_file(path: Path, what: str) -> dict[str, Any]:
    """A ``torch.save`` file of tensors (peft's legacy ``adapter_model.bin``), or one sentence naming ``what``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # as in read_checkpoint: no common type
        raise QlitError(f"{what} cannot be read: it {_unreadable(err, path.read_bytes()[:4])}.") from None
    if not isinstance(state, dict):
        raise QlitError(f"{what} holds a {type(state).__name__}, not a mapping of tensor names to tensors.")
    return state


def adapter_misfit(peft_model: Any, names: Iterable[str]) -> str | None:
    """Why the adapter weights ``names`` (from :func:`adapter_weight_names`) do not fit ``peft_model``, the base with
    that adapter loaded onto it, or ``None`` where every one of them has a place.

    peft loads an adapter with ``strict=False``: weights of modules the base lacks (an adapter of a deeper or other
    model) are dropped without a word, and modules without weights (an adapter of a shallower model) keep their
    initialisation after a warning, so the merged or evaluated model would silently lack part of the adapter.
    """
    from peft import get_peft_model_state_dict

    names = set(names)
    # save_embedding_layers=True: an adapter that trained resized embeddings carries them, and they have a place.
    places = set(get_peft_model_state_dict(peft_model, save_embedding_layers=True))
    unplaced = sorted(names - places)
    if unplaced:
        return (
            f"it holds {len(unplaced)} weight(s) for modules the base lacks (e.g. '{unplaced[0]}'), so it was trained "
            "on a larger model or another architecture"
        )
    unfilled = sorted(set(get_peft_model_state_dict(peft_model, save_embedding_layers=False)) - names)
    if unfilled:
        return (
            f"it has no weights for {len(unfilled)} of the modules it adapts on this base (e.g. '{unfilled[0]}'), so "
            "it was trained on a smaller model or another architecture"
        )
    return None


def _unreadable(err: BaseException, head: bytes) -> str:
    """What is wrong with a file that ``torch.load(weights_only=True)`` refused, as the end of a sentence."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if found:
        return (
            f"holds a Python object ({found[1]}) beside its tensors, which qlit does not load since loading it would "
            "run code from the file"
        )
    zipped = head.startswith(_ZIP_MAGIC)
    return f"is truncated or corrupt ({'its zip archive' if zipped else 'its pickle stream'} is incomplete)"


def _first_line(err: BaseException, fallback: str) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else fallback
