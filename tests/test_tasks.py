"""Task metrics on hand-made cases with known answers, and the bounded generation they run on."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from qlit.tasks import (
    BLEUTask,
    GenerationTask,
    LabelWordTask,
    PriceTask,
    SQuADTask,
    format_samples,
    parse_price,
)


def _batch(n: int, **fields) -> dict:
    """A validation batch of ``n`` rows with left-padded prompts of different lengths, plus ``fields``."""
    mask = torch.zeros(n, 6, dtype=torch.long)
    for i in range(n):
        mask[i, 6 - (2 + i % 3) :] = 1
    return {
        "prompt_input_ids": torch.arange(n * 6).view(n, 6) * mask,
        "prompt_attention_mask": mask,
        "row_index": torch.arange(n),
        "instruction": [f"question {i}" for i in range(n)],
        **fields,
    }


class FakeGenerate:
    """Stands in for the module's greedy generation: returns the given texts, records what it was asked."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.calls: list[dict] = []

    def __call__(self, batch: dict) -> list[str]:
        self.calls.append(batch)
        n = batch["prompt_input_ids"].size(0)
        out, self.texts = self.texts[:n], self.texts[n:]
        return out


def _run(task, batch: dict, texts: list[str], prefix: str = "val/") -> dict[str, float]:
    metrics = task.metrics().clone(prefix=prefix)
    generate = FakeGenerate(texts)
    task.update(metrics, batch, torch.zeros(1), generate)
    return {k: float(v) for k, v in metrics.compute().items()}


# ----- SQuAD ---------------------------------------------------------------------------------------------------------
def test_squad_exact_match_ignores_articles_punctuation_and_case():
    golds = [["the Verith River"], ["1499", "in 1499"], ["Ivo Draysen"]]
    batch = _batch(3, gold_answers=golds, reference=[g[0] for g in golds])
    scores = _run(SQuADTask(), batch, ["Verith river.", "In 1499!", "A IVO DRAYSEN"])
    assert scores == {"val/exact_match": pytest.approx(100.0), "val/f1": pytest.approx(100.0)}


def test_squad_f1_gives_partial_credit_and_takes_the_best_gold_answer():
    golds = [["the Ferror River"], ["a wool merchant", "merchant"], ["Brembury"]]
    batch = _batch(3, gold_answers=golds, reference=[g[0] for g in golds])
    # "Ferror" vs "ferror river": precision 1, recall 1/2 → F1 2/3. "merchant" matches the second gold exactly.
    # "Oslo" shares nothing with "brembury": 0.
    scores = _run(SQuADTask(), batch, ["Ferror\nQuestion: next?", "merchant", "Oslo"])
    assert scores["val/exact_match"] == pytest.approx(100 / 3)
    assert scores["val/f1"] == pytest.approx((200 / 3 + 100 + 0) / 3)


def test_squad_follows_v11_where_answer_and_prediction_normalise_to_nothing():
    # v1.1's script gives F1 0 (no shared token) where v2.0's, and torchmetrics', gives 100; exact match is 100.
    golds = [["The"], ["Ferror"]]
    batch = _batch(2, gold_answers=golds, reference=[g[0] for g in golds])
    scores = _run(SQuADTask(), batch, ["a.", "Ferror"])
    assert scores == {"val/exact_match": pytest.approx(100.0), "val/f1": pytest.approx(50.0)}


def test_squad_parse_takes_the_first_line():
    assert SQuADTask().parse("\n  the Ferror River \nQuestion: more") == "the Ferror River"


# ----- price --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,value",
    [
        ("$1,299.00", 1299.0),
        ("about 45 dollars", 45.0),
        ("n/a", None),
        ("189.00", 189.0),
        ("Price is $23.50.", 23.5),
        ("", None),
        ("$.99", 0.99),
        ("-3", None),  # a negative number is no price (counted as unparsed), not 3
        ("$-12.50", None),
        ("10-20 dollars", 10.0),  # a range's first bound; its dash is no sign
    ],
)
def test_parse_price(text, value):
    assert parse_price(text) == value


def test_price_metrics():
    prices = torch.tensor([100.0, 50.0, 1000.0, 20.0], dtype=torch.float64)
    batch = _batch(4, price=prices, reference=["100.00", "50.00", "1000.00", "20.00"])
    # Errors: 30 (hit: < $40), 45 (miss: > $40 and > 20 % of 50), 150 (hit: 15 % of 1000), unparsed (miss).
    scores = _run(PriceTask(), batch, ["$130.00", "95 dollars", "1,150", "n/a"])
    assert scores["val/price_mae"] == pytest.approx((30 + 45 + 150) / 3)
    expected_rmsle = math.sqrt(
        (
            (math.log1p(130) - math.log1p(100)) ** 2
            + (math.log1p(95) - math.log1p(50)) ** 2
            + (math.log1p(1150) - math.log1p(1000)) ** 2
        )
        / 3
    )
    assert scores["val/price_rmsle"] == pytest.approx(expected_rmsle, rel=1e-5)
    assert scores["val/price_hit_rate"] == pytest.approx(2 / 4)
    assert scores["val/price_unparsed"] == 1


# ----- label words --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,word",
    [
        ("Positive.", "positive"),
        ("NEGATIVE — the plot drags", "negative"),
        ("  positive\n\nReview: next", "positive"),
        ("'Negative'", "negative"),
        ("It is positive", "positive"),
        ("positive or negative", "positive"),
        ("neutral", None),
        ("n/a", None),
        ("", None),
    ],
)
def test_label_word_parse_is_robust_to_case_and_trailing_text(text, word):
    assert LabelWordTask(["negative", "positive"], [5, 7]).parse(text) == word


def test_accuracy_of_generated_label_words_with_other_casing_and_trailing_text():
    task = LabelWordTask(["negative", "positive"], [5, 7])
    generations = ["Positive!", "negative, clearly", "POSITIVE", "I cannot tell", "Negative."]
    labels = torch.tensor([1, 0, 0, 1, 0])
    words = [task.parse(g) for g in generations]
    assert words == ["positive", "negative", "positive", None, "negative"]
    predicted = torch.tensor([task.label_words.index(w) if w is not None else -1 for w in words])
    assert predicted.tolist() == [1, 0, 1, -1, 0]
    # An answer that names no class is wrong: it is scored as an index that no label has.
    accuracy = MulticlassAccuracy(num_classes=3, average="micro")(predicted.where(predicted >= 0, 2), labels)
    assert float(accuracy) == pytest.approx(3 / 5)


def test_label_word_accuracy_scores_the_first_answer_token():
    task = LabelWordTask(["negative", "positive"], [5, 7])
    labels = torch.full((3, 4), -100)
    labels[:, 2] = 1  # the answer starts at position 2, so position 1's logits predict it
    logits = torch.zeros(3, 4, 10)
    logits[0, 1, 7] = 2.0  # positive
    logits[1, 1, 5] = 2.0  # negative
    logits[2, 1, 7] = 2.0  # positive, but the label is negative
    logits[2, 2, 5] = 9.0  # a later position does not count
    metrics = task.metrics().clone(prefix="val/")
    task.update(metrics, {"labels": labels, "class_label": torch.tensor([1, 0, 0])}, logits, FakeGenerate([]))
    assert float(metrics.compute()["val/accuracy"]) == pytest.approx(2 / 3)


# ----- BLEU ---------------------------------------------------------------------------------------------------------
def test_bleu_of_generated_docstrings():
    ref = "Return the sum of two numbers given as strings ."
    batch = _batch(2, reference=[ref, "Parse the key value pairs of a config file ."])
    same = _run(BLEUTask(), batch, [ref, "Parse the key value pairs of a config file ."])
    assert same["val/bleu"] == pytest.approx(1.0)
    none = _run(BLEUTask(), batch, ["zebra", "quantum"])
    assert none["val/bleu"] == pytest.approx(0.0)
    half = _run(BLEUTask(), batch, [ref, "quantum"])
    assert 0.0 < half["val/bleu"] < 1.0


# ----- bounded generation and text samples ------------------------------------------------------------------------
def test_only_rows_below_the_bound_are_generated_with_their_own_padding():
    task = SQuADTask()
    task.max_generate_rows = 5
    golds = [["a"], ["b"], ["c"], ["d"]]
    batch = _batch(4, gold_answers=golds, reference=["a", "b", "c", "d"])
    batch["row_index"] = torch.tensor([3, 4, 5, 6])  # the second batch of a split: rows 5 and 6 are past the bound
    metrics = task.metrics().clone(prefix="val/")
    generate = FakeGenerate(["a", "wrong"])
    task.update(metrics, batch, torch.zeros(1), generate)
    (call,) = generate.calls
    assert call["prompt_input_ids"].size(0) == 2
    # Rows 0 and 1 have 2 and 3 prompt tokens: the columns of padding both share are dropped.
    assert call["prompt_attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert float(metrics.compute()["val/exact_match"]) == pytest.approx(50.0)
    # A batch with no row below the bound generates nothing.
    batch["row_index"] = torch.tensor([5, 6, 7, 8])
    task.update(metrics, batch, torch.zeros(1), generate)
    assert len(generate.calls) == 1


class _Writer:
    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.append((tag, text, global_step))


def _module(writer, sanity: bool = False, rank: int = 0):
    logger = SimpleNamespace(experiment=writer)
    return SimpleNamespace(
        _trainer=SimpleNamespace(sanity_checking=sanity), global_rank=rank, logger=logger, global_step=7
    )


def test_generation_samples_are_logged_as_text_once_per_pass():
    task = GenerationTask(text_samples=2)
    batch = _batch(3, reference=["ref 0", "ref 1", "ref 2"])
    metrics = task.metrics().clone(prefix="val/")
    task.update(metrics, batch, torch.zeros(1), FakeGenerate(["gen 0", "gen 1", "gen 2"]))
    writer = _Writer()
    task.epoch_end(_module(writer, sanity=True), "val")  # the sanity check logs nothing and forgets its samples
    assert writer.texts == []
    task.update(metrics, batch, torch.zeros(1), FakeGenerate(["gen 0", "gen 1", "gen 2"]))
    task.epoch_end(_module(writer), "val")
    ((tag, text, step),) = writer.texts
    assert tag == "val/samples" and step == 7
    assert "question 0" in text and "gen 1" in text and "ref 1" in text and "gen 2" not in text
    task.epoch_end(_module(writer), "val")  # nothing new generated: nothing logged
    assert len(writer.texts) == 1
    task.update(metrics, batch, torch.zeros(1), FakeGenerate(["x", "y", "z"]))
    task.epoch_end(SimpleNamespace(_trainer=None, global_rank=0, logger=None, global_step=0), "test")  # no logger


def test_format_samples_keeps_whitespace_in_code_blocks():
    text = format_samples([("def f():\n    return 1", "Returns one.", "Return 1.")])
    assert "        return 1" in text and "**Generation**" in text


def test_label_words_that_share_a_first_token_are_refused():
    from qlit.errors import QlitError
    from qlit.tasks import LabelWordTask

    with pytest.raises(QlitError, match="same token"):
        LabelWordTask(["good", "goodish"], [7, 7])
