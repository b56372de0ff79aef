"""The packed BitNet file format: ``config.json`` beside the projections packed 2 bits per weight."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from qlit.errors import QlitError
from qlit.models.bitnet.surgery import apply_bitnet

PACKED_WEIGHTS_FILE = "bitnet_model.safetensors"


def save_packed(model: nn.Module, directory: str | Path) -> Path:
    """Save a BitNet model with its projections packed (2 bits per weight) beside its ``config.json``.

    A QAT model is packed on a copy, so the caller's model keeps training its latent weights. Reload with
    :func:`load_packed`.

    Args:
        model: a Hugging Face model after :func:`apply_bitnet` (either mode).
        directory: where ``config.json`` and ``bitnet_model.safetensors`` are written.

    Returns:
        The path of the weights file.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    packed = copy.deepcopy(model)
    apply_bitnet(packed, mode="frozen")
    packed.config.save_pretrained(directory)
    path = directory / PACKED_WEIGHTS_FILE
    save_model(packed, str(path))  # save_model de-duplicates tied tensors (tied embeddings), save_file would refuse
    return path


def load_packed(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model written by :func:`save_packed`: the architecture from ``config.json``, packed ternary layers.

    Args:
        directory: the directory :func:`save_packed` wrote.
        dtype: dtype of the unpacked parts (embeddings, norms, ``lm_head``) and of the computation.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / PACKED_WEIGHTS_FILE).is_file():
        raise QlitError(f"'{directory}' holds no {PACKED_WEIGHTS_FILE}: it is not a packed BitNet model.")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
    apply_bitnet(model, mode="frozen")
    load_model(model, str(directory / PACKED_WEIGHTS_FILE))
    return model.eval()
