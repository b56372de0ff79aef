"""Test helpers: a tiny causal LM wrapped the way qlit wraps models, contract batches, a fake clock, a logger."""

from __future__ import annotations

import time
from typing import Any

import torch
import transformers
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from qlit.models.shapes import TINY_DECODER

transformers.logging.set_verbosity_error()

TINY_QWEN2 = dict(TINY_DECODER, vocab_size=128)
BATCH, SEQ, NEW_TOKENS = 2, 8, 3
# Real lengths of the two sequences of consecutive batches (the rest is right padding); the cycle repeats.
LENGTHS = [(8, 5), (6, 3), (8, 7), (4, 2)]


#: The latency probe of the ``demo_run`` fixture (conftest.py): prompts, and new tokens per prompt.
DEMO_PROBE = (3, 5)
#: Tokens of each row's prompt (every row has at least this many real tokens).
PROMPT = 2
#: The model's inputs among a batch's keys.
MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def make_batch(lengths: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """A batch per qlit's contract: ``input_ids``, ``attention_mask`` (1 = real), ``labels`` (-100 = not learned), the
    rows' prompts for generation (their first :data:`PROMPT` tokens) and ``row_index`` (``seed`` numbers the batch)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_QWEN2["vocab_size"], (len(lengths), SEQ), generator=g)
    mask = torch.zeros(len(lengths), SEQ, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, -100),
        "prompt_input_ids": ids[:, :PROMPT],
        "prompt_attention_mask": torch.ones(len(lengths), PROMPT, dtype=torch.int64),
        "row_index": torch.arange(len(lengths)) + seed * len(lengths),
    }


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    return [make_batch(LENGTHS[i % len(LENGTHS)], seed=i) for i in range(n)]


def loader(n: int) -> DataLoader:
    # batch_size=None: each item already is a batch, so the tests know every batch's real lengths exactly.
    return DataLoader(batches(n), batch_size=None)


class FakeClock:
    """Stands in for ``time.perf_counter`` in a callback module; the test module moves it forward."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TinyLM(LightningModule):
    """A minimal qlit-like module: ``.model`` is a Hugging Face causal LM built in ``configure_model``.

    ``clock``/``*_seconds`` let tests advance a fake clock by fixed amounts in each hook, so that timings are exact;
    ``gen_seconds_per_rank`` replaces the measured generation time by a fixed one per rank.
    Evaluation steps call ``generate`` and return the ``"generation"`` record of qlit's contract.
    """

    def __init__(
        self,
        clock: FakeClock | None = None,
        load_seconds: float = 0.0,
        train_seconds: float = 0.0,
        val_seconds: float = 0.0,
        gen_seconds_per_rank: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["clock"])
        self.clock = clock
        self.model: torch.nn.Module | None = None

    def _tick(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds

    def configure_model(self) -> None:
        if self.model is not None:
            return
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**TINY_QWEN2))
        self._tick(self.hparams.load_seconds)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._tick(self.hparams.train_seconds)
        return self.model(**{k: batch[k] for k in MODEL_KEYS}).loss

    def _generate(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        self._tick(self.hparams.val_seconds)
        prompt = batch["prompt_input_ids"]
        start = time.perf_counter()
        out = self.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        seconds = time.perf_counter() - start
        if self.hparams.gen_seconds_per_rank is not None:  # a fixed, per-rank time, for exact checks
            seconds = self.hparams.gen_seconds_per_rank[self.global_rank]
        new_tokens = int((out.shape[1] - prompt.shape[1]) * out.shape[0])
        return {"generation": {"seconds": seconds, "samples": int(prompt.shape[0]), "new_tokens": new_tokens}}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        # Its generation record is what a predict step reports; the latency callback ignores it here (it probes).
        return {"loss": self.model(**{k: batch[k] for k in MODEL_KEYS}).loss, **self._generate(batch)}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return self._generate(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=1e-3)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` and every hyperparameter dict."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []
        self.hparams: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.append(dict(params))

    def series(self, name: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` of every record of ``name``."""
        return [(step, m[name]) for step, m in self.records if name in m]


def cpu_trainer(**kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)
