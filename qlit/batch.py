"""What a batch holds: its keys and the label that means "not learned", defined once for every reader.

The DataModules' collate writes these keys; the LightningModule, the tasks and the callbacks read them.
"""

from __future__ import annotations

from typing import TypedDict

import torch

#: Label of a position that carries no loss (prompt, padding): PyTorch's cross-entropy ``ignore_index`` default.
IGNORE_INDEX = -100


class Batch(TypedDict, total=False):
    """One collated batch. Tensors are ``(rows, positions)`` unless said otherwise.

    Attributes:
        input_ids: prompt and answer tokens, right-padded.
        attention_mask: 1 on real tokens, 0 on padding.
        labels: the tokens learned, :data:`IGNORE_INDEX` elsewhere.
        prompt_input_ids: the prompt alone, left-padded, for generation.
        prompt_attention_mask: 1 on the prompt's real tokens.
        row_index: ``(rows,)`` position of each row in its tokenised split (picks the rows generated for).
        reference: the answer text of each row.
        instruction: the user's text of each row.
        position_ids: packed batches only: each token's position within its own sample (restarting at 0).
        cu_seq_lens: packed batches only: ``(samples + 1,)`` int32 offsets where each sample starts, then the total.
        max_length: packed batches only: the longest sample's tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_input_ids: torch.Tensor
    prompt_attention_mask: torch.Tensor
    row_index: torch.Tensor
    reference: list[str]
    instruction: list[str]
    position_ids: torch.Tensor
    cu_seq_lens: torch.Tensor
    max_length: int


#: The keys collate builds itself; every other field of a tokenised row travels along as a tensor or a list.
TOKEN_KEYS = ("input_ids", "labels", "prompt_length")


def samples_in(batch: Batch) -> int:
    """How many samples ``batch`` holds: its rows, or for a packed row its samples (no host sync either way)."""
    bounds = batch.get("cu_seq_lens")
    return bounds.numel() - 1 if bounds is not None else batch["input_ids"].size(0)
