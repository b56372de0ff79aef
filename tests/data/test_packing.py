"""Packing is exact: a sample packed with others computes the same loss and adapter gradients as alone, and
attention never crosses from one sample into another."""

from __future__ import annotations

import pytest
import torch
from helpers import packable_rows

from qlit.batch import IGNORE_INDEX
from qlit.data.batching import Collator, PackingCollator, TokenBudgetBatchSampler


@pytest.fixture
def lora_model():
    """The tiny Qwen2 with a LoRA adapter, built by QLitModule itself (its forward is what packing goes through)."""
    from peft import LoraConfig

    from qlit.module import QLitModule

    torch.manual_seed(0)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        dtype="float32",
        adapter=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    module.configure_model()
    return module


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # What the causal LM loss sums: position t predicts label t + 1.
    return torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


def _packed_forward(module, batch):
    return module(batch).logits


def _alone(module, row):
    return module(Collator(pad_token_id=0)([row])).logits


def test_packed_batch_layout() -> None:
    rows = packable_rows(100)
    batch = PackingCollator()(rows)
    assert batch["input_ids"].shape == (1, 24)
    assert batch["cu_seq_lens"].tolist() == [0, 7, 19, 24] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 12
    assert batch["position_ids"][0].tolist() == [*range(7), *range(12), *range(5)]
    # Each sample's labels are its own, but for its first token (predicted from the previous sample's last).
    expected = [lab for r in rows for lab in r["labels"]]
    for start in (0, 7, 19):
        expected[start] = IGNORE_INDEX
    assert batch["labels"][0].tolist() == expected


def test_packed_loss_and_gradients_equal_each_sample_alone(lora_model) -> None:
    rows = packable_rows(lora_model.model.config.vocab_size)
    packed = PackingCollator()(rows)
    packed["labels"][0, 3] = IGNORE_INDEX  # a learned token of sample 0 left out, to show labels travel as given
    rows[0]["labels"][3] = IGNORE_INDEX
    bounds = packed["cu_seq_lens"].tolist()
    logits = _packed_forward(lora_model, packed)
    losses = _token_losses(logits, packed["labels"])
    trainable = [p for p in lora_model.parameters() if p.requires_grad]
    for k, row in enumerate(rows):
        start, end = bounds[k], bounds[k + 1]
        # Positions start..end-2 predict the sample's labels 1..n-1; position end-1 predicts the next sample's
        # first label, which is ignored.
        packed_k = losses[start : end - 1].sum()
        if end - 1 < len(losses):
            assert losses[end - 1].item() == 0.0
        alone = _token_losses(_alone(lora_model, row), torch.tensor([row["labels"]])).sum()
        torch.testing.assert_close(packed_k, alone, rtol=1e-5, atol=1e-5)
        g_packed = torch.autograd.grad(packed_k, trainable, retain_graph=True)
        g_alone = torch.autograd.grad(alone, trainable)
        for a, b in zip(g_packed, g_alone, strict=True):
            # fp32, the same sums in another order (a packed row is one longer matmul): rounding differences only.
            assert (a - b).norm() <= 1e-5 * b.norm()


@torch.no_grad()
def test_attention_does_not_cross_samples(lora_model) -> None:
    rows = packable_rows(lora_model.model.config.vocab_size)
    before = _packed_forward(lora_model, PackingCollator()(rows))
    changed = [
        dict(rows[0], input_ids=[(t + 1) % lora_model.model.config.vocab_size for t in rows[0]["input_ids"]]),
        *rows[1:],
    ]
    after = _packed_forward(lora_model, PackingCollator()(changed))
    assert not torch.allclose(before[0, :7], after[0, :7])
    torch.testing.assert_close(before[0, 7:], after[0, 7:], rtol=0, atol=1e-6)


def test_token_budget_batches() -> None:
    lengths = [5, 9, 3, 8, 2, 7, 6, 4, 1, 10]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=12, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(10))  # every row once
    assert all(sum(lengths[i] for i in b) <= 12 for b in batches)
    assert batches == list(TokenBudgetBatchSampler(lengths, max_tokens=12, seed=3))  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order each epoch
    ranks = [list(TokenBudgetBatchSampler(lengths, 12, seed=3, world_size=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(batches) // 2
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_datamodule_packs_training_batches_within_the_budget_and_pads_validation() -> None:
    from qlit.data import SST2DataModule

    dm = SST2DataModule(
        tokenizer="qlit-tiny/qwen2",
        path="qlit-samples/sst2",
        batch_size=2,
        max_length=64,
        packing=True,
        limit_train_samples=64,
    )
    dm.setup("fit")
    rows = dm.datasets["train"].with_format(None)
    budget = dm._token_budget(rows)
    assert budget == 2 * 64  # what two padded rows of the longest length would take
    batches = list(dm.train_dataloader())
    assert len(batches) > 2  # the budget, not the whole split, closes a batch
    assert sum(b["cu_seq_lens"].numel() - 1 for b in batches) == len(rows)  # every sample once
    assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= budget for b in batches)
    assert "cu_seq_lens" not in next(iter(dm.val_dataloader()))  # evaluation keeps padded rows


def test_a_budget_below_the_longest_row_is_refused() -> None:
    from qlit.data import SST2DataModule
    from qlit.errors import QlitError

    with pytest.raises(QlitError, match=r"data.max_tokens \(100\) is below data.max_length \(128\)"):
        SST2DataModule(tokenizer="qlit-tiny/qwen2", path="qlit-samples/sst2", max_length=128, max_tokens=100)
