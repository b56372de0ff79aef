"""Rendering: the one chat-or-plain helper lays a row out for the chat template or as a plain prompt."""

from __future__ import annotations

import pytest

from qlit.data import PricerDataModule, SST2DataModule
from qlit.data.render import Renderer
from qlit.models.loading import load_tokenizer

QWEN, GPT2 = "qlit-tiny/qwen2", "qlit-tiny/gpt2"
_PRODUCT = (
    "How much does this cost to the nearest dollar?\n\nQuillon Wireless Earbuds Bluetooth 5.3, 40 h Playtime\n"
    "Charging case gives 40 hours of total playtime. IPX7 water resistance, touch controls and two microphones for "
    "clear calls. Brand: Quillon. Warranty: 2 years."
)
_REVIEW = (
    "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
    "Review: the ending is delightful ."
)


@pytest.mark.parametrize("tokenizer", [QWEN, GPT2], ids=["chat", "plain"])
def test_one_helper_lays_out_a_row_for_the_chat_template_or_a_plain_prompt(tokenizer):
    renderer = Renderer(load_tokenizer(tokenizer), None, tokenizer, "test")
    chat = renderer.chat
    assert chat == (tokenizer == QWEN)
    row = renderer.example("Review: fine", "positive", "Sentiment:", {"class_label": 1})
    assert (row.prompt, row.answer) == (
        ("Review: fine", "positive") if chat else ("Review: fine\nSentiment:", " positive")
    )
    assert row.extra == {"class_label": 1}
    # A cue that ends a line puts the answer on the next one, without a space.
    code = renderer.example("Write it.", "def f(): pass", "Code:\n")
    assert (code.prompt, code.answer) == (
        ("Write it.", "def f(): pass") if chat else ("Write it.\nCode:\n", "def f(): pass")
    )
    # Inline: the row's own text runs into the cue; in a chat the cue opens the reply.
    price = renderer.example("A lamp.\n\n", "12.00", "Price is $", inline=True)
    assert (price.prompt, price.answer) == (
        ("A lamp.", "Price is $12.00") if chat else ("A lamp.\n\nPrice is $", "12.00")
    )


@pytest.mark.parametrize(
    "cls,tokenizer,options,text",
    [
        (
            SST2DataModule,
            QWEN,
            {},
            f"<|im_start|>user\n{_REVIEW}<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>",
        ),
        (SST2DataModule, GPT2, {}, f"{_REVIEW}\nSentiment: positive<|endoftext|>"),
        (
            PricerDataModule,
            QWEN,
            {"chat_template": None},
            f"<|im_start|>user\n{_PRODUCT}<|im_end|>\n<|im_start|>assistant\nPrice is $55.00<|im_end|>",
        ),
        (PricerDataModule, GPT2, {}, f"{_PRODUCT}\n\nPrice is $55.00<|endoftext|>"),
    ],
    ids=["sst2-chat", "sst2-plain", "pricer-chat", "pricer-plain"],
)
def test_datasets_render_exactly_as_before_the_helper(cls, tokenizer, options, text):
    # The texts the datasets produced when each wrote its own chat-or-plain branch.
    folder = "sst2" if cls is SST2DataModule else "pricer"
    dm = cls(tokenizer=tokenizer, path=f"qlit-samples/{folder}", cache=False, **options)
    dm.setup("validate")
    assert dm.tokenizer.decode(dm.datasets["validation"][0]["input_ids"]) == text
