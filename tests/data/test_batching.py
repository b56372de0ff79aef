"""Batching: rows padded to the longest (or a multiple), prompts left-padded for generation, fields carried along."""

from __future__ import annotations

from qlit.batch import IGNORE_INDEX
from qlit.data import SQuADDataModule
from qlit.data.batching import Collator

GPT2 = "qlit-tiny/gpt2"


def test_batches_are_padded_dynamically_with_left_padded_prompts():
    dm = SQuADDataModule(tokenizer=GPT2, path="qlit-samples/squad", batch_size=4, cache=False)
    dm.setup("fit")
    pad = dm.tokenizer.pad_token_id
    for batch in list(dm.val_dataloader())[:2]:
        lengths = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].size(1) == int(lengths.max())  # padded to the longest row, no further
        for i in range(batch["input_ids"].size(0)):
            n = int(lengths[i])
            ids, labels = batch["input_ids"][i], batch["labels"][i]
            assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == pad).all()
            learned = labels != IGNORE_INDEX
            assert (labels[learned] == ids[learned]).all()
            k = int(batch["prompt_attention_mask"][i].sum())
            prompt = batch["prompt_input_ids"][i]
            assert (prompt[prompt.size(0) - k :] == ids[:k]).all()  # left-padded copy of the prompt
            assert not learned[:k].any() and learned[k]
        assert batch["row_index"].tolist() == sorted(batch["row_index"].tolist())
    dm8 = SQuADDataModule(tokenizer=GPT2, path="qlit-samples/squad", batch_size=4, pad_to_multiple_of=8, cache=False)
    dm8.setup("validate")
    batch = next(iter(dm8.val_dataloader()))
    assert batch["input_ids"].size(1) % 8 == 0 and batch["prompt_input_ids"].size(1) % 8 == 0


def test_the_collator_pads_labels_with_the_ignore_index_and_carries_the_other_fields():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], "prompt_length": 2},
        {"input_ids": [3, 4], "labels": [IGNORE_INDEX, 4], "prompt_length": 1},
    ]
    rows = [dict(r, row_index=i, price=1.5 * i, reference=f"r{i}") for i, r in enumerate(rows)]
    batch = Collator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], [IGNORE_INDEX, 4] + [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["prompt_input_ids"].tolist() == [[5, 6], [0, 3]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["row_index"].tolist() == [0, 1] and batch["price"].tolist() == [0.0, 1.5]
    assert batch["reference"] == ["r0", "r1"]
    assert "prompt_length" not in batch
    padded = Collator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert padded["input_ids"].shape == (2, 8) and padded["prompt_input_ids"].shape == (2, 4)
    assert (padded["labels"][:, 5:] == IGNORE_INDEX).all() and padded["prompt_input_ids"][0].tolist() == [0, 0, 5, 6]
