"""The benchmark feeds qlit the standard recipe's rows through qlit's own batching."""

from __future__ import annotations

import importlib.util
import statistics

from helpers import ROOT

from qlit.data.batching import PackingCollator, data_loader


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_rows_are_seeded_sft_lengths_and_pack_within_the_budget() -> None:
    bench = _bench()
    rows = bench.workload_rows("sft", 256, 1024, vocab=1000)
    assert rows == bench.workload_rows("sft", 256, 1024, vocab=1000)  # the same rows every run
    lengths = [len(r["input_ids"]) for r in rows]
    assert min(lengths) >= 16 and max(lengths) <= 1024
    assert 200 < statistics.median(lengths) < 320  # log-normal around 256
    assert all(len(r["input_ids"]) == 1024 for r in bench.workload_rows("full", 8, 1024, vocab=1000))

    budget = 8 * 300
    loader = data_loader(rows, PackingCollator(), batch_size=8, max_tokens=budget, shuffle=False, seed=0)
    seen = 0
    for batch in loader:
        assert batch["input_ids"].size(1) <= budget
        seen += batch["cu_seq_lens"].numel() - 1
    assert seen == len(rows)
