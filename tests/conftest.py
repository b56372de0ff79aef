"""Test set-up: no network, and every cache (tiny models, tokenised data, HF datasets) inside a temporary folder."""

import os
import tempfile

# Before any Hugging Face import: the hub libraries read these once, at import time.
_HOME = tempfile.mkdtemp(prefix="qlit-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_HOME, "hf")
os.environ["QLIT_CACHE"] = os.path.join(_HOME, "qlit")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_qwen2() -> str:
    """Directory of the tiny Qwen2 model (built once per test session)."""
    from qlit.models.tiny import resolve_tiny

    return resolve_tiny("qlit-tiny/qwen2")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
