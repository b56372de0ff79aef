"""`qlit predict` writes one JSON line per input (and, on request, alpaca_eval's model-outputs file)."""

from __future__ import annotations

import json

from data_helpers import read_jsonl, sample_rows
from helpers import ROOT, cli_args, run_main

from qlit.callbacks.predictions import merge_rows, rows_of_batch

SMALL = [
    "--data.init_args.limit_test_samples", "5", "--data.init_args.limit_val_samples", "5",
    "--data.init_args.eval_batch_size", "2", "--model.init_args.max_new_tokens", "3",
]  # fmt: skip


def _writer_config(tmp_path, **init_args) -> str:
    extra = tmp_path / "writer.yaml"
    callback = {"class_path": "qlit.callbacks.predictions.PredictionWriter", "init_args": init_args}
    extra.write_text(json.dumps({"trainer": {"callbacks": [callback]}}))
    return str(extra)


def test_predict_writes_jsonl_in_the_log_dir_and_alpaca_eval_outputs(tmp_path):
    config = str(ROOT / "configs/demo_squad.yaml")
    writer = _writer_config(tmp_path, alpaca_eval=True, generator="tiny-squad")
    assert run_main(*cli_args(tmp_path, "predict", "--config", config, "--config", writer, *SMALL)) == 0
    (path,) = tmp_path.glob("logs/demo_squad/version_*/predictions.jsonl")
    lines = read_jsonl(path)
    raw = sample_rows("squad", "validation")[:5]
    assert [line["row_index"] for line in lines] == [0, 1, 2, 3, 4]
    for line, row in zip(lines, raw, strict=True):
        assert set(line) == {"row_index", "instruction", "prompt", "generation", "prediction", "reference"}
        assert line["reference"] == row["answers"]["text"][0]
        assert row["question"] in line["instruction"] and row["question"] in line["prompt"]
        # The prompt is what the model read (chat template included); the instruction is the user's text.
        assert line["prompt"].startswith("<|im_start|>user\n") and "<|im_start|>" not in line["instruction"]
        assert line["prediction"] == line["generation"].strip().split("\n")[0].strip()
    outputs = json.loads((path.parent / "alpaca_eval_outputs.json").read_text())
    assert outputs == [
        {"instruction": line["instruction"], "output": line["generation"], "generator": "tiny-squad"} for line in lines
    ]


def test_predict_writes_parsed_prices_to_a_chosen_path(tmp_path):
    target = tmp_path / "out" / "prices.jsonl"
    writer = _writer_config(tmp_path, path=str(target))
    config = str(ROOT / "configs/demo_pricer.yaml")
    assert run_main(*cli_args(tmp_path, "predict", "--config", config, "--config", writer, *SMALL)) == 0
    lines = read_jsonl(target)
    # Pricer predicts on the hub's test split, whose answers come from the price column.
    assert [line["reference"] for line in lines] == [
        f"{round(r['price'])}.00" for r in sample_rows("pricer", "test")[:5]
    ]
    for line in lines:
        assert line["prediction"] is None or isinstance(line["prediction"], float)
        assert line["instruction"].endswith("Price is $")
    assert not (target.parent / "alpaca_eval_outputs.json").exists()


def test_rows_of_every_rank_merge_in_split_order_each_once():
    # Two ranks of a distributed sampler: interleaved rows, and row 0 repeated to even out the ranks.
    rank0 = rows_of_batch(
        [{"generation": "a"}, {"generation": "c"}, {"generation": "e"}],
        {"row_index": [0, 2, 4], "instruction": ["A", "C", "E"]},
    )
    rank1 = rows_of_batch([{"generation": "b"}, {"generation": "d"}, {"generation": "a"}], {"row_index": [1, 3, 0]})
    merged = merge_rows([rank0, rank1])
    assert [r["generation"] for r in merged] == ["a", "b", "c", "d", "e"]
    assert merged[0]["instruction"] == "A" and merged[1]["instruction"] is None


def test_alpaca_eval_generator_defaults_to_the_trained_run(tmp_path):
    from types import SimpleNamespace

    from qlit.callbacks.predictions import trained_run_name

    runs = tmp_path / "logs" / "sst2"
    module = SimpleNamespace(adapter_path=None)
    fresh = SimpleNamespace(ckpt_path=None, log_dir=str(runs / "version_7"), default_root_dir=str(tmp_path))
    resumed = [
        SimpleNamespace(**{**vars(fresh), "ckpt_path": str(runs / f"version_{v}/checkpoints/last.ckpt")})
        for v in (0, 1)
    ]
    names = {trained_run_name(trainer, module) for trainer in resumed}
    assert names == {"sst2/version_0", "sst2/version_1"}  # two adapters of one base, told apart
    adapter = SimpleNamespace(adapter_path=str(runs / "version_3" / "adapter"))
    assert trained_run_name(fresh, adapter) == "sst2/version_3"
    assert trained_run_name(fresh, module) == "sst2/version_7"
