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
# A launcher's environment (an srun allocation, a torchrun shell) would make every multi-process test join that
# launch instead of its own: the tests start their ranks themselves.
_LAUNCHER = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
for _name in [n for n in os.environ if n in _LAUNCHER or n.startswith(("SLURM_", "TORCHELASTIC_", "LOCAL_WORLD"))]:
    del os.environ[_name]

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_qwen2() -> str:
    """Directory of the tiny Qwen2 model (built once per test session)."""
    from qlit.models.tiny import resolve_tiny

    return resolve_tiny("qlit-tiny/qwen2")


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves the environment as it found it: Lightning writes to ``os.environ`` itself (a SLURM cluster
    environment sets ``MASTER_ADDR``, a seeded run ``PL_GLOBAL_SEED``), which would steer a later test in the same
    worker (a two-rank fit then waits for a host that is not there)."""
    before = dict(os.environ)
    yield
    for name in [n for n in os.environ if n not in before]:
        del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
