"""Fixtures shared by the callback tests (helpers live in ``tiny_lm.py``)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _small_threads():
    # Two shared CPU cores: more threads than that only slows the tiny model down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
