"""The generation benchmark's SQuAD rows: the validation size, cycled from the bundled sample, each row valid."""

from __future__ import annotations

import importlib.util
import json
import sys

from helpers import ROOT


def _bench_generation():
    sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location("bench_generation", ROOT / "tools" / "bench_generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_squad_rows_cycle_the_sample_with_unique_ids_and_load_as_squad(tmp_path) -> None:
    from qlit.data import SQuADDataModule

    bench = _bench_generation()
    path = bench.squad_rows(tmp_path / "squad", 100)
    rows = [json.loads(line) for line in (path / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and len({r["id"] for r in rows}) == 100
    assert rows[40]["context"] == rows[0]["context"]  # the 40-row sample, cycled
    data = SQuADDataModule(tokenizer="qlit-tiny/qwen2", path=str(path), cache=False)
    data.setup("validate")  # every row passes SQuAD's checks
    assert len(data.datasets["validation"]) == 100


def test_the_table_extrapolates_generate_from_its_measured_rows() -> None:
    bench = _bench_generation()
    fast = dict(measure="squad", path="auto", rows=10570, generation_s=120.0, ms_per_row=11.35, validate_wall_s=150.0)
    eager = dict(measure="squad", path="eager", rows=320, generation_s=32.0, ms_per_row=100.0, validate_wall_s=40.0)
    text = bench.table([fast, eager])
    assert "| auto | 10,570 | 120.0 | 11.35 | 150.0 |" in text
    assert "`generate` for all 10,570 rows, at its measured time per row: 17.6 min; qlit: 2.0 min." in text
