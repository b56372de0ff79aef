"""Task metrics on hand-made cases with known answers, and the bounded generation they run on."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

import qlit.tasks as tasks
from qlit.errors import QlitError
from qlit.tasks import (
    AUTO_FIRST_ROWS,
    AUTO_GENERATION_SHARE,
    BLEUStandardError,
    BLEUTask,
    GenerationTask,
    LabelWordTask,
    PriceTask,
    SQuADTask,
    StandardError,
    corpus_bleu,
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
    assert scores == {
        "val/exact_match": pytest.approx(100.0),
        "val/exact_match_stderr": 0.0,  # every row the same score: no spread
        "val/f1": pytest.approx(100.0),
        "val/f1_stderr": 0.0,
    }


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
    assert (scores["val/exact_match"], scores["val/f1"]) == (pytest.approx(100.0), pytest.approx(50.0))


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


# ----- standard errors and generate_val_samples: auto ----------------------------------------------------------------
def test_squad_scores_come_with_the_standard_error_of_their_mean():
    golds = [["the Ferror River"], ["a wool merchant", "merchant"], ["Brembury"]]
    batch = _batch(3, gold_answers=golds, reference=[g[0] for g in golds])
    scores = _run(SQuADTask(), batch, ["Ferror\nQuestion: next?", "merchant", "Oslo"])
    # F1 per row: 200/3, 100, 0; exact match 0, 100, 0: s / √n with the sample standard deviation s.
    assert scores["val/f1_stderr"] == pytest.approx(statistics.stdev([200 / 3, 100, 0]) / math.sqrt(3))
    assert scores["val/exact_match_stderr"] == pytest.approx(statistics.stdev([0, 100, 0]) / math.sqrt(3))
    # Declared beside their metrics, for qlit compare's columns; no direction of their own.
    names = [spec.name for spec in SQuADTask.metric_specs]
    assert names == ["exact_match", "exact_match_stderr", "f1", "f1_stderr"]
    assert SQuADTask.metric_specs[1].higher_is_better is None and SQuADTask.metric_specs[1].unit == "%"


def test_price_scores_come_with_their_standard_errors():
    prices = torch.tensor([100.0, 50.0, 1000.0, 20.0], dtype=torch.float64)
    batch = _batch(4, price=prices, reference=["100.00", "50.00", "1000.00", "20.00"])
    scores = _run(PriceTask(), batch, ["$130.00", "95 dollars", "1,150", "n/a"])
    assert scores["val/price_mae_stderr"] == pytest.approx(statistics.stdev([30, 45, 150]) / math.sqrt(3))
    assert scores["val/price_hit_rate_stderr"] == pytest.approx(statistics.stdev([1, 0, 1, 0]) / 2)
    # RMSLE is the root of a mean: its standard error by the delta method, se(mean) / (2 √mean).
    squared = [(math.log1p(g) - math.log1p(t)) ** 2 for g, t in ((130, 100), (95, 50), (1150, 1000))]
    expected = statistics.stdev(squared) / math.sqrt(3) / (2 * math.sqrt(statistics.mean(squared)))
    assert scores["val/price_rmsle_stderr"] == pytest.approx(expected, rel=1e-6)


def test_a_standard_error_needs_two_rows_and_sums_over_updates():
    metric = StandardError()
    metric.update(torch.tensor([3.0]))
    assert math.isnan(float(metric.compute()))
    metric.update(torch.tensor([5.0, 10.0]))
    assert float(metric.compute()) == pytest.approx(statistics.stdev([3, 5, 10]) / math.sqrt(3))


def test_bleu_comes_with_a_bootstrap_standard_error():
    refs = [f"Return the {w} of the two numbers given as strings ." for w in ("sum", "product", "difference", "max")]
    refs += ["Parse the key value pairs of a config file .", "Open the file and read its lines ."]
    batch = _batch(len(refs), reference=refs)
    perfect = _run(BLEUTask(), batch, refs)
    assert perfect["val/bleu"] == pytest.approx(1.0) and perfect["val/bleu_stderr"] == pytest.approx(0.0)
    texts = [*refs[:3], "Return a number .", "Parse a file .", "quantum zebra"]
    mixed, again = _run(BLEUTask(), batch, texts), _run(BLEUTask(), batch, texts)
    assert 0.0 < mixed["val/bleu"] < 1.0 and 0.01 < mixed["val/bleu_stderr"] < 0.5
    assert mixed["val/bleu_stderr"] == again["val/bleu_stderr"]  # a seeded bootstrap: the same every pass


def test_the_bootstrap_computes_corpus_bleu_as_sacrebleu_does():
    from torchmetrics.text import SacreBLEUScore

    metric = BLEUStandardError()
    preds = ["the cat sat on the mat", "a dog ran far away today", "it rains"]
    target = [["the cat sat on a mat"], ["the dog ran away today"], ["it rains a lot in spring"]]
    metric.update(preds, target)
    sums = torch.cat(metric.stats).sum(dim=0, keepdim=True)
    assert float(corpus_bleu(sums)[0]) == pytest.approx(float(SacreBLEUScore(tokenize="13a")(preds, target)))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fit_module(fn: str = "fit", sanity: bool = False, rows: int = 1000):
    trainer = SimpleNamespace(
        state=SimpleNamespace(fn=fn),
        sanity_checking=sanity,
        world_size=1,
        val_dataloaders=SimpleNamespace(dataset=range(rows)),
    )
    return SimpleNamespace(_trainer=trainer, global_rank=0, logger=None, global_step=0, device=torch.device("cpu"))


def _slow_pass(task, clock: _Clock, module, seconds_per_batch: float = 2.0, batches: int = 2) -> None:
    """One pass that generates for every row it is given (4 per batch), each batch taking ``seconds_per_batch``."""

    def generate(batch: dict) -> list[str]:
        clock.now += seconds_per_batch
        return ["x"] * batch["prompt_input_ids"].size(0)

    task.start_pass(module)
    metrics = task.metrics()
    for b in range(batches):
        batch = _batch(4, gold_answers=[["x"]] * 4, reference=["x"] * 4)
        batch["row_index"] = torch.arange(4) + 4 * b
        task.update(metrics, batch, torch.zeros(1), generate)
    task.epoch_end(module, "val")


def test_auto_generates_for_what_a_tenth_of_the_training_time_pays_for(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(tasks, "perf_counter", clock)
    task = SQuADTask()
    task.generation_share = AUTO_GENERATION_SHARE
    _slow_pass(task, clock, _fit_module(sanity=True))  # the sanity check: 8 rows, 0.5 s each
    assert task.max_generate_rows is None
    clock.now += 100.0  # training until the first validation
    with caplog.at_level("INFO"):
        task.start_pass(_fit_module())
    assert task.max_generate_rows == 20  # 10 % of 100 s at 0.5 s a row
    assert "validation generates for its first 20 of 1000 rows" in caplog.text
    clock.now += 1000.0
    task.start_pass(_fit_module())  # planned once: every pass scores the same rows
    assert task.max_generate_rows == 20
    task.start_pass(_fit_module(fn="validate"))
    assert task.max_generate_rows is None  # validate and test score every row


def test_auto_takes_every_row_where_they_fit_and_measures_first_without_a_sanity_check(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(tasks, "perf_counter", clock)
    fits = SQuADTask()
    fits.generation_share = AUTO_GENERATION_SHARE
    _slow_pass(fits, clock, _fit_module(sanity=True))
    clock.now += 100.0
    fits.start_pass(_fit_module(rows=15))
    assert fits.max_generate_rows is None
    unmeasured = SQuADTask()
    unmeasured.generation_share = AUTO_GENERATION_SHARE
    unmeasured.start_pass(_fit_module())
    assert unmeasured.max_generate_rows == AUTO_FIRST_ROWS
    fixed = SQuADTask()
    fixed.max_generate_rows = 7  # generate_val_samples: 7 plans nothing
    fixed.start_pass(_fit_module())
    assert fixed.max_generate_rows == 7


def test_generate_val_samples_defaults_to_auto_and_refuses_other_words():
    from qlit.data import SQuADDataModule

    dm = SQuADDataModule(tokenizer="qlit-tiny/gpt2", path="qlit-samples/squad")
    assert dm.generate_val_samples == "auto"
    with pytest.raises(QlitError, match="data.generate_val_samples must be a number of rows, auto or null, got 'all'"):
        SQuADDataModule(tokenizer="qlit-tiny/gpt2", path="qlit-samples/squad", generate_val_samples="all")
