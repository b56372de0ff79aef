"""Helpers of the DataModule tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qlit.batch import IGNORE_INDEX
from qlit.data.base import QLitDataModule
from qlit.paths import SAMPLES_DIR

SAMPLES = SAMPLES_DIR


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sample_rows(folder: str, split: str) -> list[dict[str, Any]]:
    """The rows of a bundled sample split, in file order."""
    return read_jsonl(SAMPLES / folder / f"{split}.jsonl")


def learned_text(dm: QLitDataModule, item: Mapping[str, Any]) -> str:
    """The decoded tokens of a tokenised row whose label is not IGNORE_INDEX (what the loss learns)."""
    return dm.tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX])


def learned_runs(dm: QLitDataModule, item: Mapping[str, Any]) -> list[str]:
    """Each contiguous run of learned tokens, decoded (one per learned assistant turn)."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token in item["labels"]:
        if token != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = token
    return [dm.tokenizer.decode(run) for run in runs]
