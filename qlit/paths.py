"""Where qlit keeps what it builds or ships: the cache root and the bundled samples."""

from __future__ import annotations

import os
from pathlib import Path

#: The bundled offline samples, in each dataset's hub schema (``qlit-samples/<name>``).
SAMPLES_DIR = Path(__file__).resolve().parent / "data" / "samples"


def cache_root() -> Path:
    """Where qlit keeps built tiny models and tokenised datasets (``QLIT_CACHE`` overrides)."""
    return Path(os.environ.get("QLIT_CACHE", Path.home() / ".cache" / "qlit"))


#: Written beside a saved adapter: the base model and how it was stored (quantization) while the adapter trained.
QLIT_BASE_FILE = "qlit_base.json"
