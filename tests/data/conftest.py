"""Fixtures of the DataModule tests: tiny tokenizers built once, a private tokenised cache per test, file writers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qlit.models.tiny import resolve_tiny
from qlit.paths import cache_root

TOKENIZERS = ("qlit-tiny/qwen2", "qlit-tiny/gpt2")  # ChatML chat template / plain prompts


@pytest.fixture(scope="session", autouse=True)
def tiny_models() -> Path:
    """Build both tiny models once per session (about 5 s each) in the session's cache (tests/conftest.py)."""
    for name in TOKENIZERS:
        resolve_tiny(name)
    return cache_root() / "tiny"


@pytest.fixture(autouse=True)
def qlit_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_models: Path) -> Path:
    """A tokenised cache of this test's own (``QLIT_CACHE`` → tmp_path), reusing the session's tiny models."""
    root = tmp_path / "qlit-cache"
    root.mkdir()
    os.symlink(tiny_models, root / "tiny")
    monkeypatch.setenv("QLIT_CACHE", str(root))
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    # Two shared CPU cores: more threads than that only slows the tiny model down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
