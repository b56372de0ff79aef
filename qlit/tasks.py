"""What a dataset is judged by: the task travels with the DataModule, so one LightningModule serves them all.

A task builds its torchmetrics collection and updates it from a validation batch. The LightningModule owns
loss and perplexity (every task has them) and asks the task for the rest. Generation-based tasks answer a bounded
number of rows per pass (``max_generate_rows``, set by the DataModule from ``generate_val_samples``; under ``auto``
planned from what generation costs, :meth:`GenerationTask.start_pass`), and log each metric's standard error beside
it (``<metric>_stderr``, over the rows generated for), so a study can tell a difference from the noise of a sample:
SQuAD's F1 on 32 answers has a standard error near 8 points.

| Task | Metrics (after the ``val/`` or ``test/`` prefix) |
| --- | --- |
| :class:`LabelWordTask` (SST-2) | ``accuracy`` |
| :class:`SQuADTask` | ``exact_match``, ``f1`` (0-100, official SQuAD v1.1 normalisation), each with ``_stderr`` |
| :class:`PriceTask` | ``price_mae`` ($), ``price_rmsle``, ``price_hit_rate`` (with ``_stderr``), ``price_unparsed`` |
| :class:`BLEUTask` (CodeSearchNet) | ``bleu`` (0-1, SacreBLEU 13a tokenisation), ``bleu_stderr`` (bootstrap) |
| :class:`GenerationTask` (IndicVault, JSONL) | text ``samples`` only |

Every generation-based task also logs a few prompt/generation/reference triples as TensorBoard text (``samples``).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

import torch
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredLogError, Metric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import SacreBLEUScore
from torchmetrics.utilities import dim_zero_cat

from qlit.batch import IGNORE_INDEX
from qlit.errors import QlitError
from qlit.metrics import STDERR_SUFFIX, MetricSpec

_PUNCTUATION = set(string.punctuation)

# Generates greedy continuations for the prompts of a batch and returns their decoded text.
GenerateFn = Callable[[dict[str, Any]], list[str]]

#: ``generate_val_samples: auto``: the share of the training time between two validations that generating for the
#: validation rows may take.
AUTO_GENERATION_SHARE = 0.1
#: ``generate_val_samples: auto`` before generation's cost is known (a fit without the sanity check): the rows the
#: first validation generates for, which measure it.
AUTO_FIRST_ROWS = 32


def stderr_spec(spec: MetricSpec) -> MetricSpec:
    """The declaration of ``spec``'s standard error, logged beside it as ``<name>_stderr``."""
    return MetricSpec(spec.name + STDERR_SUFFIX, spec.unit, higher_is_better=None)


class StandardError(Metric):
    """The standard error of the mean of the values it is updated with, ``s / √n`` (``s`` the sample standard
    deviation; NaN below two values); with ``root``, of the square root of that mean, by the delta method
    (``se / (2 √mean)``: RMSLE's from the squared log errors). Sums in float64, reduced over ranks."""

    full_state_update = False

    def __init__(self, root: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        for name in ("total", "squares", "count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().to(torch.float64).flatten()
        self.total += values.sum()
        self.squares += (values * values).sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        n = self.count
        if n < 2:
            return torch.tensor(float("nan"), dtype=torch.float64)
        mean = self.total / n
        variance = ((self.squares - n * mean * mean) / (n - 1)).clamp(min=0.0)
        stderr = (variance / n).sqrt()
        return stderr / (2 * mean.sqrt()) if self.root else stderr


class BLEUStandardError(Metric):
    """The standard error of corpus BLEU (SacreBLEU's 13a tokenisation, 0-1) by bootstrap: the standard deviation
    of the BLEU of ``resamples`` resamplings of the sentences with replacement (seeded, so a pass's value is the
    same every time). Each sentence's n-gram counts are kept, since corpus BLEU is no mean of sentence scores."""

    full_state_update = False

    def __init__(self, resamples: int = 1000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resamples = resamples
        self._sentence = SacreBLEUScore(tokenize="13a")
        self.add_state("stats", [], dist_reduce_fx="cat")

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:
        bleu = self._sentence
        for pred, refs in zip(preds, target, strict=True):
            bleu.reset()
            bleu.update([pred], [refs])
            row = [bleu.numerator, bleu.denominator, bleu.preds_len.reshape(1), bleu.target_len.reshape(1)]
            self.stats.append(torch.cat([t.to(torch.float64) for t in row]).reshape(1, -1).to(self.device))

    def compute(self) -> torch.Tensor:
        stats = dim_zero_cat(self.stats).cpu() if len(self.stats) else None
        if stats is None or stats.shape[0] < 2:
            return torch.tensor(float("nan"), dtype=torch.float64)
        g = torch.Generator().manual_seed(0)
        picks = torch.randint(0, stats.shape[0], (self.resamples, stats.shape[0]), generator=g)
        return corpus_bleu(stats[picks].sum(dim=1)).std()


def corpus_bleu(sums: torch.Tensor) -> torch.Tensor:
    """Corpus BLEU as torchmetrics' SacreBLEU computes it, for each row of summed sentence counts ``(n, 10)``: the
    1- to 4-gram matches, their totals, the prediction's and the reference's length. 0 where an order has no match,
    else the geometric mean of the precisions times the brevity penalty."""
    matches, totals, hyp, ref = sums[:, :4], sums[:, 4:8], sums[:, 8], sums[:, 9]
    log_precision = (matches.clamp(min=1) / totals.clamp(min=1)).log().mean(dim=1)
    brevity = torch.where(hyp > ref, torch.zeros_like(hyp), 1 - ref / hyp.clamp(min=1))
    return torch.where((matches > 0).all(dim=1), (log_precision + brevity).exp(), torch.zeros_like(hyp))


class Task:
    """Language modelling only: loss and perplexity, which the LightningModule logs for every task."""

    #: Whether :meth:`update` generates text (and so costs a generation per evaluated row).
    needs_generation: bool = False
    #: How many rows of each evaluation pass are generated for (rows with ``row_index`` below it); ``None``: all.
    max_generate_rows: int | None = None
    #: ``generate_val_samples: auto``: the share of the training time between validations that generating may take
    #: (:meth:`GenerationTask.start_pass` plans ``max_generate_rows`` from it); ``None``: the rows are fixed.
    generation_share: float | None = None
    #: The metrics :meth:`metrics` computes, as logged after the ``val/`` or ``test/`` prefix: what ``qlit compare``
    #: shows. Declared on the class, so that a comparison reads them without building a task.
    metric_specs: tuple[MetricSpec, ...] = ()

    def metrics(self) -> MetricCollection:
        return MetricCollection({})

    def update(
        self, metrics: MetricCollection, batch: dict[str, Any], logits: torch.Tensor, generate: GenerateFn
    ) -> None:
        """Update ``metrics`` from one validation batch (``logits`` of the teacher-forced forward)."""

    def parse(self, generation: str) -> Any:
        """The prediction a generated text stands for (what ``qlit predict`` writes beside the text)."""
        return generation.strip()

    def start_pass(self, module: Any) -> None:
        """Called at the start of each validation or test pass, before its first batch."""

    def epoch_end(self, module: Any, prefix: str) -> None:
        """Called after the epoch's metrics are logged (``prefix`` is ``val`` or ``test``): log text samples."""


class LabelWordTask(Task):
    """Classification as a label word: the class whose word's first token the model scores highest wins.

    Scoring the first answer token from the teacher-forced logits costs nothing beyond the loss forward and
    cannot produce an unparseable answer; it is the "scored label word" protocol of instruction-tuning evals.

    Args:
        label_words: the word of each class, in class-index order.
        first_token_ids: the first token id of each class's answer as the DataModule tokenises it; they
            must differ, or the classes could not be told apart from one token.
    """

    metric_specs = (MetricSpec("accuracy", "ratio", higher_is_better=True, main=True),)

    def __init__(self, label_words: Sequence[str], first_token_ids: Sequence[int]) -> None:
        if len(set(first_token_ids)) != len(first_token_ids):
            raise QlitError(
                f"data.label_words {list(label_words)} start with the same token, so they cannot be scored apart: "
                "choose words that begin differently."
            )
        self.label_words = list(label_words)
        self.first_token_ids = torch.tensor(list(first_token_ids))

    def metrics(self) -> MetricCollection:
        return MetricCollection({"accuracy": MulticlassAccuracy(num_classes=len(self.label_words), average="micro")})

    def update(
        self, metrics: MetricCollection, batch: dict[str, Any], logits: torch.Tensor, generate: GenerateFn
    ) -> None:
        labels = batch["labels"]
        # Index of the first learned token in each row; the logits one position earlier predict it.
        first = (labels != IGNORE_INDEX).int().argmax(dim=1)
        rows = torch.arange(labels.size(0), device=labels.device)
        scores = logits[rows, first - 1][:, self.first_token_ids.to(logits.device)]
        metrics["accuracy"].update(scores.argmax(dim=-1), batch["class_label"])

    def parse(self, generation: str) -> str | None:
        """The class word a generation answers with, whatever its case and whatever follows it.

        The first word decides ("Positive.", "NEGATIVE — the plot..." ); failing that, a generation that names
        exactly one class word as a whole word ("It is positive") gives that class; otherwise ``None``.
        """
        words = re.findall(r"[^\W\d_]+", generation.lower())
        labels = {w.lower(): w for w in self.label_words}
        if words and words[0] in labels:
            return labels[words[0]]
        named = {labels[w] for w in words if w in labels}
        return named.pop() if len(named) == 1 else None


class GenerationTask(Task):
    """Answers are generated greedily for a bounded set of rows; a few are logged as TensorBoard text.

    Subclasses score the generations in :meth:`score`. Rows are chosen by ``row_index`` (their position in the
    evaluation split), so the same rows are generated for on every pass and, under several devices, the first
    ``max_generate_rows`` rows of the split in all.

    **generate_val_samples: auto** (:attr:`generation_share` set): ``validate`` and ``test`` generate for every row.
    A fit generates for every validation row where that is estimated to take under a tenth of the training time
    between two validations, else for the most rows that do. The estimate: the seconds per generated row of the last
    pass (the sanity check's, which generates for every row of its batches), and the wall time from that pass's end
    to the first validation (the training in between); the slowest rank's cost counts, and several ranks generate
    their shares at once. The rows are planned once, at the first validation, and kept for the rest of the fit so
    that every pass scores the same rows; one line says how many. Without a sanity check the first validation
    generates for ``AUTO_FIRST_ROWS`` rows and the second is planned from it.

    Args:
        text_samples: how many prompt/generation/reference triples are logged as text at the end of a pass.
    """

    needs_generation = True

    def __init__(self, text_samples: int = 4) -> None:
        self.text_samples = text_samples
        self._samples: list[tuple[str, str, str]] = []
        # generate_val_samples: auto: this pass's generation (seconds, rows), the last pass's cost per row, when it
        # ended, and whether the rows are planned.
        self._generated = [0.0, 0]
        self._seconds_per_row: float | None = None
        self._ended_at: float | None = None
        self._planned = False

    def update(
        self, metrics: MetricCollection, batch: dict[str, Any], logits: torch.Tensor, generate: GenerateFn
    ) -> None:
        keep = self.rows_to_generate(batch)
        if not keep:
            return
        start = perf_counter()
        texts = generate(_select_prompts(batch, keep))  # synchronised: its texts are on the host
        self._generated[0] += perf_counter() - start
        self._generated[1] += len(keep)
        self.score(metrics, batch, keep, texts)
        instructions = batch.get("instruction") or [""] * len(batch["reference"])
        for i, text in zip(keep, texts, strict=True):
            if len(self._samples) < self.text_samples:
                self._samples.append((str(instructions[i]), text, str(batch["reference"][i])))

    def rows_to_generate(self, batch: dict[str, Any]) -> list[int]:
        """Positions in ``batch`` of the rows that are generated for."""
        n = batch["prompt_input_ids"].size(0)
        if self.max_generate_rows is None or "row_index" not in batch:
            return list(range(n))
        return [i for i, r in enumerate(batch["row_index"].tolist()) if r < self.max_generate_rows]

    def score(self, metrics: MetricCollection, batch: dict[str, Any], rows: list[int], texts: list[str]) -> None:
        """Update ``metrics`` from the generations ``texts`` of the batch rows ``rows``."""

    def start_pass(self, module: Any) -> None:
        """``generate_val_samples: auto``: plan the rows this pass generates for (see the class docstring)."""
        self._generated = [0.0, 0]
        trainer = getattr(module, "_trainer", None)
        if self.generation_share is None or trainer is None:
            return
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            self.max_generate_rows = None  # every row (the sanity check's few batches measure the cost)
            return
        if self._planned:
            return
        if self._seconds_per_row is None or self._ended_at is None:
            self.max_generate_rows = AUTO_FIRST_ROWS
            return
        per_row, training = max(self._seconds_per_row, 1e-9), perf_counter() - self._ended_at
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world > 1:  # one plan for every rank: the slowest rank's cost, the shortest training time
            per_row = float(trainer.strategy.reduce(torch.tensor(per_row, device=module.device), reduce_op="max"))
            training = -float(trainer.strategy.reduce(torch.tensor(-training, device=module.device), reduce_op="max"))
        rows = max(int(self.generation_share * training / per_row) * world, 1)
        total = _split_rows(trainer)
        self.max_generate_rows = None if total is not None and rows >= total else rows
        self._planned = True
        _info(_plan_line(self.max_generate_rows, total, per_row, training, self.generation_share))

    def epoch_end(self, module: Any, prefix: str) -> None:
        seconds, rows = self._generated
        if rows:
            self._seconds_per_row = seconds / rows
        self._ended_at = perf_counter()
        samples, self._samples = self._samples, []
        trainer = getattr(module, "_trainer", None)
        if not samples or (trainer is not None and trainer.sanity_checking) or module.global_rank != 0:
            return
        add_text = getattr(getattr(module.logger, "experiment", None), "add_text", None)
        if add_text is not None:
            add_text(f"{prefix}/samples", format_samples(samples), global_step=module.global_step)


class SQuADTask(GenerationTask):
    """Extractive QA: exact match and F1 of the generated span against every gold answer (the best counts).

    Scored as the official SQuAD v1.1 script scores (lower-case, no punctuation, no articles, folded whitespace;
    F1 over the shared tokens), in percent. Written here rather than through torchmetrics' ``SQuAD``, which follows
    v2.0 where an answer and a prediction both normalise to nothing (F1 100, where v1.1 gives 0). Batches carry
    ``gold_answers`` (every gold answer text of the row).
    """

    metric_specs = (
        MetricSpec("exact_match", "%", higher_is_better=True),
        stderr_spec(MetricSpec("exact_match", "%")),
        MetricSpec("f1", "%", higher_is_better=True, main=True),
        stderr_spec(MetricSpec("f1", "%")),
    )

    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "exact_match": MeanMetric(),
                "exact_match_stderr": StandardError(),
                "f1": MeanMetric(),
                "f1_stderr": StandardError(),
            },
            compute_groups=False,
        )

    def parse(self, generation: str) -> str:
        """The answer span: the first non-empty line of the generation, stripped."""
        for line in generation.splitlines():
            if line.strip():
                return line.strip()
        return ""

    def score(self, metrics: MetricCollection, batch: dict[str, Any], rows: list[int], texts: list[str]) -> None:
        exact, f1 = [], []
        for i, text in zip(rows, texts, strict=True):
            prediction = squad_normalize(self.parse(text))
            golds = [squad_normalize(g) for g in batch["gold_answers"][i]]
            exact.append(100.0 * max(prediction == g for g in golds))
            f1.append(100.0 * max(squad_f1(prediction, g) for g in golds))
        for name, values in (("exact_match", torch.tensor(exact)), ("f1", torch.tensor(f1))):
            metrics[name].update(values)
            metrics[name + STDERR_SUFFIX].update(values)


def squad_normalize(text: str) -> str:
    """The SQuAD v1.1 script's normalisation: lower case, punctuation removed, articles removed, spaces folded."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_f1(prediction: str, gold: str) -> float:
    """Token F1 of two normalised answers, as the v1.1 script computes it (0 when they share no token)."""
    pred_tokens, gold_tokens = prediction.split(), gold.split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


class BLEUTask(GenerationTask):
    """Corpus BLEU of the generations against the references (SacreBLEU's 13a tokenisation, 0-1).

    Args:
        text_samples: how many generations are logged as text per pass.
    """

    metric_specs = (
        MetricSpec("bleu", "ratio", higher_is_better=True, main=True),
        stderr_spec(MetricSpec("bleu", "ratio")),
    )

    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {"bleu": SacreBLEUScore(tokenize="13a"), "bleu_stderr": BLEUStandardError()}, compute_groups=False
        )

    def score(self, metrics: MetricCollection, batch: dict[str, Any], rows: list[int], texts: list[str]) -> None:
        preds, refs = [self.parse(t) for t in texts], [[str(batch["reference"][i]).strip()] for i in rows]
        metrics["bleu"].update(preds, refs)
        metrics["bleu_stderr"].update(preds, refs)


def parse_price(text: str) -> float | None:
    """The first number in ``text`` as dollars: ``"$1,299.00"`` → 1299.0, ``"about 45 dollars"`` → 45.0, else None.

    A negative number (``"-3"``, ``"$-3"``) is no price: ``None``, counted as unparsed rather than taken as 3.
    """
    match = re.search(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)", text.replace("$", ""))
    if match is None or match.group().startswith("-"):
        return None
    try:
        value = float(match.group().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class RootMeanSquaredLogError(MeanSquaredLogError):
    """RMSLE: the square root of torchmetrics' mean squared log error, ``sqrt(mean((log1p(p) - log1p(t))²))``."""

    def compute(self) -> torch.Tensor:
        return super().compute().sqrt()


class PriceTask(GenerationTask):
    """Price regression through generation: the number after ``Price is $`` against the ``price`` column.

    ``price_mae`` (dollars) and ``price_rmsle`` are over the generations that hold a number (NaN when none does);
    ``price_hit_rate`` is over every generated row, a hit being an error under ``hit_dollars`` or under
    ``hit_fraction`` of the true price, and a generation without a number counting as a miss; ``price_unparsed``
    counts those.

    Args:
        hit_dollars: absolute error below which a guess is a hit.
        hit_fraction: relative error (of the true price) below which a guess is a hit.
        text_samples: how many generations are logged as text per pass.
    """

    metric_specs = (
        MetricSpec("price_mae", "$", higher_is_better=False, main=True),
        stderr_spec(MetricSpec("price_mae", "$")),
        MetricSpec("price_rmsle", "log", higher_is_better=False),
        stderr_spec(MetricSpec("price_rmsle", "log")),
        MetricSpec("price_hit_rate", "ratio", higher_is_better=True),
        stderr_spec(MetricSpec("price_hit_rate", "ratio")),
        MetricSpec("price_unparsed", "count", higher_is_better=False, aggregate=None, integer=True),
    )

    def __init__(self, hit_dollars: float = 40.0, hit_fraction: float = 0.2, text_samples: int = 4) -> None:
        super().__init__(text_samples)
        self.hit_dollars = hit_dollars
        self.hit_fraction = hit_fraction

    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "price_mae": MeanAbsoluteError(),
                "price_mae_stderr": StandardError(),
                "price_rmsle": RootMeanSquaredLogError(),
                "price_rmsle_stderr": StandardError(root=True),
                "price_hit_rate": MeanMetric(),
                "price_hit_rate_stderr": StandardError(),
                "price_unparsed": SumMetric(),
            },
            compute_groups=False,
        )

    def parse(self, generation: str) -> float | None:
        return parse_price(generation)

    def score(self, metrics: MetricCollection, batch: dict[str, Any], rows: list[int], texts: list[str]) -> None:
        truth = batch["price"][rows].float()
        guesses = [self.parse(t) for t in texts]
        parsed = torch.tensor([g is not None for g in guesses], device=truth.device)
        guess = torch.tensor([g if g is not None else 0.0 for g in guesses], device=truth.device)
        error = (guess - truth).abs()
        hit = parsed & ((error < self.hit_dollars) | (error < self.hit_fraction * truth))
        metrics["price_mae"].update(guess[parsed], truth[parsed])
        metrics["price_mae_stderr"].update(error[parsed])
        metrics["price_rmsle"].update(guess[parsed].clamp(min=0), truth[parsed].clamp(min=0))
        log_error = guess[parsed].clamp(min=0).log1p() - truth[parsed].clamp(min=0).log1p()
        metrics["price_rmsle_stderr"].update(log_error * log_error)
        metrics["price_hit_rate"].update(hit.float())
        metrics["price_hit_rate_stderr"].update(hit.float())
        metrics["price_unparsed"].update((~parsed).sum().float())


def format_samples(samples: Sequence[tuple[str, str, str]]) -> str:
    """Prompt/generation/reference triples as Markdown for TensorBoard's text tab (code blocks keep whitespace)."""
    blocks = []
    for n, (prompt, generation, reference) in enumerate(samples, 1):
        blocks.append(
            f"**Sample {n}: prompt**\n\n{_code(prompt)}\n\n**Generation**\n\n{_code(generation)}\n\n"
            f"**Reference**\n\n{_code(reference)}"
        )
    return "\n\n---\n\n".join(blocks)


def _code(text: str) -> str:
    return "\n".join("    " + line for line in (text or " ").splitlines() or [" "])


def _select_prompts(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The left-padded prompts of ``rows``, without the padding columns that all of them share."""
    ids, mask = batch["prompt_input_ids"][rows], batch["prompt_attention_mask"][rows]
    start = int(mask.any(dim=0).int().argmax())
    return {"prompt_input_ids": ids[:, start:], "prompt_attention_mask": mask[:, start:]}


def _split_rows(trainer: Any) -> int | None:
    """The validation split's rows (every rank's), or ``None`` where the loader does not say."""
    loaders = getattr(trainer, "val_dataloaders", None)
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _plan_line(rows: int | None, total: int | None, per_row: float, training: float, share: float) -> str:
    cost = f"{per_row:.2g} s a row against {training:.3g} s of training between validations"
    if rows is None:
        return f"generate_val_samples auto: every validation row is generated for ({cost})."
    of = f" of {total}" if total is not None else ""
    return (
        f"generate_val_samples auto: validation generates for its first {rows}{of} rows, what {share:.0%} of the "
        f"training time pays for ({cost})."
    )


def _info(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(message)
