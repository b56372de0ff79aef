"""dtype names as YAML configs spell them (``bfloat16``), and the torch dtypes they stand for."""

from __future__ import annotations

import torch

from qlit.errors import QlitError

#: The dtypes a model computes in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: ... and those packed 4-bit weights may be stored in.
STORAGE = {**DTYPES, "uint8": torch.uint8}


def to_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``; the names are the ones YAML configs use."""
    if name not in STORAGE:
        raise QlitError(f"Unknown dtype '{name}': use one of {', '.join(STORAGE)}.")
    return STORAGE[name]
