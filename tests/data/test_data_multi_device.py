"""Several processes: packed training batches are shared out by rank (equal counts, every sample once, resumable);
on two CPU processes (DDP over gloo) a packed fit trains each rank's share, evaluation scores every row once, generates
for the first N rows of the split in all, and ``qlit predict`` writes one file with each row once, in split order."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from data_helpers import read_jsonl
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from qlit.callbacks.predictions import PredictionWriter
from qlit.data import SQuADDataModule, SST2DataModule
from qlit.data.batching import TokenBudgetBatchSampler, data_loader
from qlit.module import QLitModule
from qlit.tasks import SQuADTask

LENGTHS = [5, 9, 3, 8, 2, 7, 6, 4, 1, 10, 3, 5, 8, 6, 6, 6]  # 11 batches of 12 tokens for one process


def _shares(world_size: int, lengths: list[int] = LENGTHS, epoch: int = 0) -> list[list[list[int]]]:
    shares = []
    for rank in range(world_size):
        sampler = TokenBudgetBatchSampler(lengths, max_tokens=12, seed=3, world_size=world_size, rank=rank)
        sampler.set_epoch(epoch)
        shares.append(list(sampler))
    return shares


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_packed_batches_are_shared_out_disjoint_equal_and_whole(world_size):
    (alone,) = _shares(1)
    assert len(alone) % world_size  # the plan of one process does not divide evenly among these ranks
    for epoch in (0, 1):
        shares = _shares(world_size, epoch=epoch)
        assert len({len(share) for share in shares}) == 1  # every rank steps as often: none waits in a collective
        rows = [i for share in shares for batch in share for i in batch]
        assert sorted(rows) == list(range(len(LENGTHS)))  # disjoint, and every sample of the epoch once
        assert all(sum(LENGTHS[i] for i in batch) <= 12 for share in shares for batch in share)
    # The ranks share out the one-process plan, with some of its batches split in two to even out the last round.
    shares = _shares(world_size)
    interleaved = [share[k] for k in range(len(shares[0])) for share in shares]
    assert [i for batch in interleaved for i in batch] == [i for batch in alone for i in batch]
    assert _shares(world_size, epoch=1) != shares  # a new order every epoch


def test_fewer_rows_than_ranks_repeat_the_first_batches():
    # One batch of 3 rows for 4 ranks: split into single rows, and the last rank trains the first one again.
    shares = _shares(4, lengths=[3, 4, 5])
    assert [len(share) for share in shares] == [1, 1, 1, 1]
    rows = [batch for share in shares for batch in share]
    assert sorted(i for batch in rows[:3] for i in batch) == [0, 1, 2] and rows[3] == rows[0]


def test_a_ranks_packed_share_resumes_after_its_last_trained_batch():
    rows = [{"input_ids": [1] * n, "labels": [1] * n, "row": i} for i, n in enumerate(LENGTHS * 3)]
    done = [0]

    def loader(rank: int) -> Any:
        collate = lambda batch: [r["row"] for r in batch]  # noqa: E731
        return data_loader(
            rows,
            collate,
            batch_size=4,
            shuffle=True,
            seed=7,
            max_tokens=12,
            world_size=2,
            rank=rank,
            batches_done=lambda: done[0],
        )

    for rank in (0, 1):
        reference = loader(rank)
        _set_sampler_epoch(reference, 1)
        whole = list(reference)
        done[0] = 2
        state = reference.state_dict()
        assert state == {"epoch": 1, "batches_done": 2}
        resumed = loader(rank)
        resumed.load_state_dict(state)
        iterator = iter(resumed)  # Lightning's order: the iterator first, then the epoch
        _set_sampler_epoch(resumed, 1)
        assert list(iterator) == whole[2:]


class PackedRecord(Callback):
    """Writes, per rank, the training loader's sampler, the epoch's planned batches and what each step trained."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.record: dict[str, Any] = {"trained": []}

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sampler = trainer.train_dataloader.sampler
        self.record["sampler"] = type(sampler).__name__
        self.record["rows"] = len(trainer.datamodule.datasets["train"])
        self.record["plan"] = list(sampler)
        self.record["plan_tokens"] = [sum(sampler.lengths[i] for i in batch) for batch in sampler]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["trained"].append(
            {
                "loss": float(outputs["loss"]),
                "samples": batch["cu_seq_lens"].numel() - 1,
                "tokens": batch["input_ids"].numel(),
            }
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["step"] = trainer.global_step
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def test_two_process_packed_fit_trains_each_ranks_share_and_saves_one_adapter(tmp_path):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("forked ranks need a parent without CUDA initialised (an earlier GPU test used it)")
    from peft import LoraConfig

    dm = SST2DataModule(
        tokenizer="qlit-tiny/qwen2", path="qlit-samples/sst2", batch_size=4, max_length=128, packing=True
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=3,
        limit_val_batches=0,
        logger=TensorBoardLogger(tmp_path, name="ddp", version=0),
        callbacks=[PackedRecord(tmp_path)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    adapter = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer.fit(QLitModule(pretrained="qlit-tiny/qwen2", adapter=adapter), datamodule=dm)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Lightning kept qlit's packed loader (no DistributedSampler of its own around it): each rank planned its share.
    assert [r["sampler"] for r in ranks] == ["TokenBudgetBatchSampler"] * 2
    assert [r["step"] for r in ranks] == [3, 3]
    assert len(ranks[0]["plan"]) == len(ranks[1]["plan"]) > 3
    shares = [[i for batch in r["plan"] for i in batch] for r in ranks]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(ranks[0]["rows"]))  # the epoch's samples, each once
    for rank in ranks:
        # Each rank trained its own first planned batches, packed (one row of several samples), with a finite loss.
        assert [t["tokens"] for t in rank["trained"]] == rank["plan_tokens"][:3]
        assert all(t["samples"] > 1 and math.isfinite(t["loss"]) and t["loss"] > 0 for t in rank["trained"])
    adapters = sorted(p.parent for p in tmp_path.rglob("adapter_config.json"))
    assert adapters == [tmp_path / "ddp" / "version_0" / "adapter"]


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
