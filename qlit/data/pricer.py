"""Price prediction (``ed-donner/pricer-data``): a product description → its price, judged by dollar error."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qlit.data.base import QLitDataModule
from qlit.data.render import Example
from qlit.tasks import PriceTask, parse_price

MARKER = "Price is $"


class PricerDataModule(QLitDataModule):
    """Regression through generation: the model reads the whole ``text`` and learns what follows ``Price is $``.

    A train ``text`` ends ``Price is $<N>.00``; as on the hub, a test ``text`` stops right after ``Price is $``, and
    the answer is then written from the ``price`` column the same way (``round(price)`` + ``.00``). Metrics compare
    the generated number with ``price``. The hub has no validation split: it is carved from train (``val_fraction``).

    Args:
        path: hub id (``ed-donner/pricer-data``), a local directory or files with columns ``text`` and ``price``,
            or ``qlit-samples/pricer``.
        test_split: split for ``test`` and ``predict`` (the hub's 2,000-row ``test``).
        chat_template: ``False`` (default) trains on the text as it is, the recipe this dataset was written for;
            ``True`` makes the description a user message and ``Price is $<N>.00`` the assistant's answer.
        hit_dollars: a guess within this many dollars of the price is a hit.
        hit_fraction: a guess within this fraction of the price is a hit.
        **kwargs: the options of :class:`~qlit.data.base.QLitDataModule`.
    """

    dataset_name = "pricer-data"
    columns = {"text": str, "price": (float, int)}

    def __init__(
        self,
        path: str = "ed-donner/pricer-data",
        test_split: str | None = "test",
        chat_template: bool | None = False,
        hit_dollars: float = 40.0,
        hit_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(path=path, test_split=test_split, chat_template=chat_template, **kwargs)
        self.hit_dollars = hit_dollars
        self.hit_fraction = hit_fraction

    def check_row(self, row: Mapping[str, Any]) -> tuple[str, str] | None:
        price = row["price"]
        if not math.isfinite(price) or price < 0:
            return "price", f"expected a price of 0 or more, got {price}"
        text = row["text"]
        at = text.find(MARKER)
        if at < 0:
            return "text", f"no '{MARKER}' in the text"
        if not text[:at].strip():
            return "text", f"no description before '{MARKER}'"
        after = text[at + len(MARKER) :].strip()
        if after and parse_price(after) is None:
            return "text", f"'{MARKER}' is followed by {after!r:.40}, not a number"
        return None

    def to_example(self, row: Mapping[str, Any]) -> Example:
        text = row["text"]
        at = text.find(MARKER) + len(MARKER)
        price = text[at:].strip() or f"{round(row['price'])}.00"
        return self.renderer.example(
            text[: at - len(MARKER)], price, MARKER, {"price": float(row["price"])}, inline=True
        )

    def format_options(self) -> dict[str, Any]:
        return {"chat": self.use_chat()}

    def build_task(self) -> PriceTask:
        return PriceTask(hit_dollars=self.hit_dollars, hit_fraction=self.hit_fraction)
