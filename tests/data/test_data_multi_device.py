"""Two CPU processes (DDP over gloo): evaluation scores every row once, generates for the first N rows of the split in
all, and ``qlit predict`` writes one file with each row once, in split order."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import read_jsonl
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from qlit.callbacks.predictions import PredictionWriter
from qlit.data import SQuADDataModule
from qlit.module import QLitModule
from qlit.tasks import SQuADTask


def test_two_ranks_generate_for_the_first_rows_once_and_write_one_prediction_file(tmp_path, monkeypatch):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("forked ranks need a parent without CUDA initialised (an earlier GPU test used it)")
    seen = tmp_path / "generated"
    seen.mkdir()
    score = SQuADTask.score

    def recording_score(self, metrics, batch, rows, texts):  # forked ranks inherit the patch
        with open(seen / f"{torch.distributed.get_rank()}.jsonl", "a") as f:
            f.write(json.dumps([batch["row_index"][i].item() for i in rows]) + "\n")
        score(self, metrics, batch, rows, texts)

    monkeypatch.setattr(SQuADTask, "score", recording_score)
    # 7 rows on 2 ranks: a padding sampler would give row 0 to both.
    options = dict(limit_val_samples=7, limit_test_samples=7, generate_val_samples=3, eval_batch_size=2)
    dm = SQuADDataModule(tokenizer="qlit-tiny/qwen2", path="qlit-samples/squad", **options)
    output = tmp_path / "predictions.jsonl"
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        logger=TensorBoardLogger(tmp_path, name="ddp", version=0),
        callbacks=[PredictionWriter(path=str(output))],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = QLitModule(pretrained="qlit-tiny/qwen2", max_new_tokens=2)
    trainer.validate(module, datamodule=dm, verbose=False)
    generated = [i for path in seen.iterdir() for line in read_jsonl(path) for i in line]
    assert sorted(generated) == [0, 1, 2]
    assert len(list(seen.iterdir())) == 2  # both ranks generated

    trainer.predict(module, datamodule=dm, return_predictions=False)
    lines = read_jsonl(output)
    assert [line["row_index"] for line in lines] == list(range(7))
    assert all(line["instruction"] and "generation" in line for line in lines)
