"""What a logged metric is, declared beside the code that logs it: tasks and callbacks list their metrics here.

``qlit compare`` builds its columns from these declarations (README, "What is logged"), so a new task metric or
callback metric is declared once, where it is logged. Nothing heavy is imported here: the comparison stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Aggregate = Literal["last", "max", "median"]

#: The suffix of a metric's standard error, logged beside it (``val/f1`` and ``val/f1_stderr``; lm-eval's scores too).
STDERR_SUFFIX = "_stderr"


@dataclass(frozen=True)
class MetricSpec:
    """One logged scalar, and how a comparison of runs shows it.

    Args:
        name: the tag as logged (``train/tokens_per_sec``); a task's metrics are named without the ``val/`` or
            ``test/`` prefix the module adds (``accuracy``).
        unit: what the value counts (``GiB``, ``tokens/s``, ``ratio``, ``%``).
        higher_is_better: the direction of a better run; ``None`` where there is none (a parameter count).
        aggregate: how ``qlit compare`` turns a run's series into one cell: its ``last`` value, its ``max`` or its
            ``median``; ``None`` keeps it out of the table.
        main: the one metric a task is judged by (its bar chart in ``qlit compare --plots``).
        integer: a count, shown without decimals.
        sources: for a column that reads one of several tags (``name`` is then the column's, not a tag): the tags
            and a label for each; the first one the run logged wins, and the ``source_column`` gives its label.
        source_column: the name of that label's column.
        study: one of the few costs a study compares runs by (memory, tokens/s, latency, wall time): a metric of the
            run's TensorBoard HPARAMS record and a chart of its custom-scalars layout, beside the loss and the task's
            metrics (:mod:`qlit.callbacks.board`).
    """

    name: str
    unit: str
    higher_is_better: bool | None = None
    aggregate: Aggregate | None = "last"
    main: bool = False
    integer: bool = False
    sources: tuple[tuple[str, str], ...] = ()
    source_column: str = ""
    study: bool = False


#: What the LightningModule logs for every task: the training loss, and the evaluation loss and perplexity.
LM_METRICS = (
    MetricSpec("train/loss", "nats/token", higher_is_better=False),
    MetricSpec("val/loss", "nats/token", higher_is_better=False),
    MetricSpec("val/perplexity", "", higher_is_better=False),
)
