"""The benchmark feeds qlit the standard recipe's rows through qlit's own batching."""

from __future__ import annotations

import importlib.util
import statistics

import pytest
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


def test_the_ablation_adds_one_change_per_row_and_ends_at_qlit_defaults() -> None:
    import inspect

    bench = _bench()
    defaults = {k: p.default for k, p in inspect.signature(bench.run).parameters.items() if p.default is not p.empty}
    labels = [label for label, _ in bench.ABLATION]
    at_defaults = next(i for i, label in enumerate(labels) if "defaults" in label)
    assert "cuda_graphs: auto" in labels[at_defaults] and at_defaults == len(labels) - 2 and "compile" in labels[-1]
    spec: dict = {}
    for i, (_, change) in enumerate(bench.ABLATION):
        assert set(change) <= set(defaults), change  # every key is one bench.run takes
        if i:
            assert all(spec.get(k) != v for k, v in change.items()), change  # each row changes what it names
        spec.update(change)
        if i == at_defaults:  # every knob the ablation touched so far is at its default
            assert {k: defaults[k] for k in spec} == spec
    # Then the opt-in row: compile instead of the graphs.
    assert defaults["cuda_graphs"] == "auto" and defaults["compile"] is False
    assert spec["compile"] is True and spec["cuda_graphs"] is False
    first = bench.ABLATION[0][1]
    assert all(first[k] != defaults[k] for k in first)  # the first row turns every optimisation off


def test_a_malformed_only_row_is_one_sentence_naming_it() -> None:
    bench = _bench()
    assert bench._plan(["full:qwen2.5-1.5b:8"], bench.PLAN) == [("full", "qwen2.5-1.5b", 8)]
    for bad in ("full:qwen2.5-1.5b", "full:qwen9:8", "long:qwen2.5-1.5b:8", "full:qwen2.5-1.5b:x"):
        with pytest.raises(SystemExit, match=f"--only '{bad}': expected WORKLOAD:MODEL:BS"):
            bench._plan([bad], bench.PLAN)


def test_options_for_the_table_are_spec_keys_read_as_json_and_a_bad_one_is_one_sentence() -> None:
    bench = _bench()
    assert bench._options(["cuda_graphs=auto", "compile=true", "max_tokens=4096"]) == dict(
        cuda_graphs="auto", compile=True, max_tokens=4096
    )
    assert bench._options(None) == {}
    for bad in ("cuda_graphs", "graphs=auto", "bs=4"):  # no value, not a spec key, set by the table's rows
        with pytest.raises(SystemExit, match=f"--set '{bad}': expected KEY=VALUE with KEY one of "):
            bench._options([bad])
    with pytest.raises(SystemExit, match="--set applies to --against-peer"):
        bench.main(['[{"model": "qwen2.5-0.5b"}]', "--set", "compile=true"])


def test_the_table_has_a_column_per_peer_and_ratios_to_the_best_of_each_row() -> None:
    bench = _bench()
    row = dict(
        workload="full",
        model="qwen2.5-7b",
        bs=4,
        peers={
            "peer_hf": dict(tokens_per_s=6000, peak_alloc_gib=17.0),
            "peer_unsloth": dict(tokens_per_s=9000, peak_alloc_gib=6.0),
            "peer_trl": dict(error="exit 1: OOM"),
        },
        qlit=dict(tokens_per_s=13500, peak_alloc_gib=12.0),
        lean=dict(tokens_per_s=10800, peak_alloc_gib=5.4),
    )
    text = bench.table([row])
    head, _, line = text.splitlines()
    assert "peer_hf tokens/s" in head and "peer_unsloth tokens/s" in head and "qlit lean" in head
    assert "9,000 (6.00)" in line and "error: exit 1: OOM" in line
    assert "1.50×, 2.00×" in line  # qlit against the fastest peer (Unsloth): speed, memory
    assert "1.20×, 0.90×" in line  # lean against the leanest peer (Unsloth too here)


def test_max_context_doubles_then_bisects_to_the_longest_row_that_trains(monkeypatch) -> None:
    bench = _bench()
    tried = []

    def trains_at(tool, model, length, budget, peer_path):
        tried.append(length)
        return dict(tokens_per_s=1000, peak_alloc_gib=1.0) if length <= 50_000 else dict(error="OOM")

    monkeypatch.setattr(bench, "trains_at", trains_at)
    monkeypatch.setattr(bench, "model_dir", lambda name: name)
    monkeypatch.setattr(bench, "_link_models", lambda name: None)
    out = bench.max_context("qlit", "qwen2.5-7b", start=8192, step=4096)
    assert tried[:4] == [8192, 16384, 32768, 65536]  # doubling until a row fails
    assert out["longest"] == 49152 and out["failed_at"] - out["longest"] <= 4096
    assert out["tokens_per_s"] == 1000


def test_every_backend_row_is_a_quantization_qlit_accepts_and_a_bad_name_is_one_sentence() -> None:
    from qlit.models.quantization import Quantization

    bench = _bench()
    assert bench.BACKENDS[0] == "qlora"  # the reference of the ratios: the QLoRA recipe's NF4 + DQ
    for quant in bench.BACKENDS:
        if quant == "none":
            continue
        fields = bench.quantization_fields(quant)
        if fields.get("scheme") == "int4_weight_only":  # refused off a CUDA GPU, by design
            with pytest.raises(Exception, match="needs a CUDA GPU"):
                Quantization(**fields)
            continue
        Quantization(**fields)
    assert bench.quantization_fields("qlora") == {"mode": "nf4", "double_quant": True}
    with pytest.raises(SystemExit, match="quant 'nf5': expected one of"):
        bench.quantization_fields("nf5")


def test_the_backends_table_gives_each_backend_as_ratios_to_the_first() -> None:
    bench = _bench()
    plan = [("full", "qwen2.5-0.5b", 8)]
    nf4 = dict(tokens_per_s=1000, peak_alloc_gib=2.0, weight_gib=0.5, technique="QLoRA (NF4 + DQ)")
    hqq = dict(tokens_per_s=500, peak_alloc_gib=3.0, weight_gib=0.6, technique="HQQ 4-bit + LoRA")
    text = bench.backends_table(plan, [("qlora", [nf4]), ("lora-hqq4", [hqq]), ("gptq", [{"error": "exit 1: OOM"}])])
    lines = text.splitlines()
    assert lines[2].startswith("| QLoRA (NF4 + DQ) | 1,000, 2.00, 0.50 (1.00×, 1.00×, 1.00×)")
    assert lines[3].startswith("| HQQ 4-bit + LoRA | 500, 3.00, 0.60 (0.50×, 1.50×, 1.20×)")
    assert "error: exit 1: OOM" in lines[4]
