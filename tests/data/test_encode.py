"""Completion-only loss masks: for every dataset, in chat and plain format, exactly the answer and its end token are
learned, and the generation prompt is everything before the answer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from data_helpers import learned_runs, learned_text, sample_rows

from qlit.batch import IGNORE_INDEX
from qlit.data import (
    CodeSearchNetDataModule,
    IndicVaultDataModule,
    JSONLDataModule,
    PricerDataModule,
    SQuADDataModule,
    SST2DataModule,
)
from qlit.errors import QlitError

QWEN, GPT2 = "qlit-tiny/qwen2", "qlit-tiny/gpt2"
EOS = {QWEN: "<|im_end|>", GPT2: "<|endoftext|>"}


def _plain(text: str, chat: bool) -> str:
    # Plain prompts end with "Answer:"-style labels; the answer follows after a space.
    return text if chat else f" {text}"


def _summary(doc: str) -> str:
    return " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())


def _price(row: dict[str, Any], chat: bool) -> list[str]:
    after = row["text"].split("Price is $", 1)[1] or f"{round(row['price'])}.00"
    return [f"Price is ${after}" if chat else after]


# folder, DataModule, options, files, the learned texts of a raw row (each is followed by the end token).
CASES: list[tuple[str, type, dict[str, Any], list[str], Callable[[dict[str, Any], bool], list[str]]]] = [
    (
        "sst2",
        SST2DataModule,
        {},
        ["train", "validation"],
        lambda r, chat: [_plain(["negative", "positive"][r["label"]], chat)],
    ),
    ("squad", SQuADDataModule, {}, ["train", "validation"], lambda r, chat: [_plain(r["answers"]["text"][0], chat)]),
    (
        "code_search_net",
        CodeSearchNetDataModule,
        {},
        ["train", "validation"],
        lambda r, chat: [_plain(_summary(r["func_documentation_string"]), chat)],
    ),
    ("pricer", PricerDataModule, {}, ["train", "test"], _price),
    ("pricer", PricerDataModule, {"chat_template": None}, ["train", "test"], _price),
    ("indicvault_hinglish", IndicVaultDataModule, {}, ["train"], lambda r, chat: [_plain(r["response"], chat)]),
    ("jsonl/completion", JSONLDataModule, {}, ["train", "validation"], lambda r, chat: [r["completion"]]),
    (
        "jsonl/chat",
        JSONLDataModule,
        {"train_on": "all"},
        ["train", "validation"],
        lambda r, chat: [_plain(m["content"], chat) for m in r["messages"] if m["role"] == "assistant"],
    ),
    (
        "jsonl/chat",
        JSONLDataModule,
        {"train_on": "last"},
        ["train", "validation"],
        lambda r, chat: [_plain(r["messages"][-1]["content"], chat)],
    ),
]


@pytest.mark.parametrize("tokenizer", [QWEN, GPT2], ids=["chat", "plain"])
@pytest.mark.parametrize(
    "folder,cls,options,files,expected", CASES, ids=[f"{c[0]}{c[2] or ''}".replace(" ", "") for c in CASES]
)
def test_learned_tokens_are_exactly_the_answer_and_its_end_token(tokenizer, folder, cls, options, files, expected):
    dm = cls(tokenizer=tokenizer, path=f"qlit-samples/{folder}", cache=False, **options)
    dm.setup("fit")
    chat = dm.use_chat()
    # Pricer trains on its own text format unless asked for the chat template (chat_template: null = automatic).
    assert chat == (tokenizer == QWEN and (cls is not PricerDataModule or "chat_template" in options))
    eos = EOS[tokenizer]
    wanted: Counter[tuple[str, ...]] = Counter()
    for split in files:
        for row in sample_rows(folder, split):
            example = dm.to_example(row)
            if example is None:  # IndicVault's API-error rows, tested elsewhere
                continue
            item = dm.encode_row(example)
            answers = [a + eos for a in expected(row, chat)]
            assert learned_runs(dm, item) == answers
            wanted[tuple(answers)] += 1
            k = item["prompt_length"]
            # The generation prompt ends right where the last answer begins.
            assert item["labels"][k] != IGNORE_INDEX and item["labels"][k - 1] == IGNORE_INDEX
            assert dm.tokenizer.decode(item["input_ids"][k:]) == answers[-1]
            if chat:
                assert dm.tokenizer.decode(item["input_ids"][:k]).endswith("<|im_start|>assistant\n")
    # The set-up splits were tokenised the same way: each of their rows learns one of the expected answers.
    for split in (dm.train_split, dm.val_split):
        for item in dm.datasets[split]:
            assert tuple(learned_runs(dm, item)) in wanted


def test_a_conversation_keeps_every_token_of_its_chat_template(tmp_path):
    dm = JSONLDataModule(tokenizer=QWEN, path="qlit-samples/jsonl/chat", cache=False)
    dm.setup("fit")
    multi = [r for r in sample_rows("jsonl/chat", "validation") if len(r["messages"]) > 3]
    assert multi, "the sample has multi-turn conversations"
    for row in multi:
        item = dm.encode_row(dm.to_example(row))
        rendered = dm.render(row["messages"])
        # Nothing is lost or added between the turns: the tokens spell the template up to the last end token.
        assert rendered.startswith(dm.tokenizer.decode(item["input_ids"]))
        assert dm.tokenizer.decode(item["input_ids"]).endswith("<|im_end|>")
        assert learned_text(dm, item) == "".join(
            m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"
        )


def test_code_to_doc_hides_the_docstring_from_the_prompt():
    dm = CodeSearchNetDataModule(tokenizer=QWEN, path="qlit-samples/code_search_net", cache=False)
    dm.setup("validate")
    for row in sample_rows("code_search_net", "validation"):
        item = dm.encode_row(dm.to_example(row))
        prompt = dm.tokenizer.decode(item["input_ids"][: item["prompt_length"]])
        assert row["func_name"].split(".")[-1] in prompt
        assert _summary(row["func_documentation_string"]) not in prompt
        assert '"""' not in prompt and "'''" not in prompt


def test_doc_to_code_learns_the_code_without_its_docstring():
    dm = CodeSearchNetDataModule(
        tokenizer=GPT2, path="qlit-samples/code_search_net", direction="doc_to_code", cache=False
    )
    dm.setup("validate")
    row = sample_rows("code_search_net", "validation")[0]
    learned = learned_text(dm, dm.encode_row(dm.to_example(row)))
    assert learned.startswith("def ") and learned.endswith("<|endoftext|>")
    assert '"""' not in learned
    assert learned.removesuffix("<|endoftext|>").splitlines()[-1] == row["func_code_string"].splitlines()[-1]


def test_a_template_that_rewrites_history_cannot_learn_every_turn():
    # Like templates that drop the reasoning of earlier assistant turns: the history differs from what was generated.
    rewriting = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    row = next(r for r in sample_rows("jsonl/chat", "validation") if len(r["messages"]) > 3)
    for train_on in ("all", "last"):
        dm = JSONLDataModule(tokenizer=QWEN, path="qlit-samples/jsonl/chat", train_on=train_on, cache=False)
        dm.setup("validate")
        dm.tokenizer.chat_template = rewriting
        if train_on == "all":
            with pytest.raises(QlitError, match="renders a conversation differently from its prefixes.*train_on: last"):
                dm.encode_row(dm.to_example(row))
        else:  # only the last turn is learned: its prompt is rendered as the model will see it
            item = dm.encode_row(dm.to_example(row))
            assert learned_runs(dm, item) == [row["messages"][-1]["content"] + "<|im_end|>"]
            assert "(earlier answer)" in dm.tokenizer.decode(item["input_ids"][: item["prompt_length"]])
