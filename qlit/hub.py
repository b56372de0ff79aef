"""Reaching the Hugging Face Hub, or failing fast with one sentence when it cannot be reached.

huggingface_hub retries a failed request with back-off for about 25 s per file; on a machine without network a
run would hang for minutes before failing. One short TCP probe decides up front, and the loaders then go
offline (cache only), so an unreachable hub costs seconds and ends in a message that names the id.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT`` or huggingface.co) accepts a TCP connection."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    reached = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            reached.set()
        except OSError:
            pass

    # In a thread, because name resolution has no timeout of its own and can hang where DNS is unreachable.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return reached.is_set()


def looks_local(name: str) -> bool:
    """A path (absolute, relative with a slash prefix, or existing) rather than a hub id."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Run the block in the hub libraries' offline mode when the hub is unreachable; yields reachability."""
    reachable = hub_reachable()
    if reachable:
        yield True
        return
    import datasets.config
    import huggingface_hub.constants

    saved = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
