"""An example as tokens with its loss mask: only the answer(s) and their end token are learned."""

from __future__ import annotations

from typing import Any

from qlit.batch import IGNORE_INDEX
from qlit.data.render import Example, Renderer


def encode(renderer: Renderer, example: Example, learn_all_turns: bool = False) -> dict[str, Any]:
    """Token ids with labels :data:`~qlit.batch.IGNORE_INDEX` everywhere but on the answer(s) and their end token.

    The pieces are tokenised one by one, so a label boundary never falls inside a token; the prompt for
    generation is everything before the last answer.

    Args:
        renderer: renders the example for the tokenizer.
        example: the row as text.
        learn_all_turns: for a conversation, learn every assistant turn (see :meth:`Renderer.pieces`).
    """
    tok = renderer.tokenizer
    chat = renderer.chat
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_length = 0
    for k, (text, learned) in enumerate(renderer.pieces(example, learn_all_turns)):
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. a BOS).
        ids = tok(text, add_special_tokens=k == 0 and not chat)["input_ids"] if text else []
        if learned:
            prompt_length = len(input_ids)
            ids = ids + [tok.eos_token_id]
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_length": prompt_length,
        "reference": example.answer.strip(),
        "instruction": example.prompt,
        **example.extra,
    }
