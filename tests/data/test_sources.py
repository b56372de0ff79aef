"""Sources (hub layout, local JSONL/JSON/CSV/Parquet files), split carving and sample limits."""

from __future__ import annotations

import csv
import json
import logging
import os

import datasets
import pytest
from data_helpers import SAMPLES, sample_rows, write_jsonl
from helpers import ROOT, cli_args, run_main

from qlit.data import IndicVaultDataModule, PricerDataModule, SQuADDataModule, SST2DataModule
from qlit.data.sources import infer_builder
from qlit.errors import QlitError

GPT2 = "qlit-tiny/gpt2"


def _sentences(dm, split: str) -> list[str]:
    return list(dm.datasets[split]["instruction"])


def test_path_json_with_a_file_per_split(tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", sample_rows("sst2", "train")[:30])
    val = write_jsonl(tmp_path / "b.jsonl", sample_rows("sst2", "validation")[:10])
    dm = SST2DataModule(tokenizer=GPT2, path="json", data_files={"train": str(train), "validation": str(val)})
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 30 and len(dm.datasets["validation"]) == 10
    # Validation keeps the file's order; its rows are the file's rows.
    first = sample_rows("sst2", "validation")[0]["sentence"]
    assert first in dm.datasets["validation"][0]["instruction"]


def test_data_files_alone_infer_the_format_and_carve_validation(tmp_path):
    rows = sample_rows("sst2", "train")[:40]
    one = write_jsonl(tmp_path / "all.jsonl", rows)
    # The class's default path is the hub id; local files replace it, their format told by the ending.
    dm = SST2DataModule(tokenizer=GPT2, data_files=str(one), val_fraction=0.25)
    dm.setup("fit")
    train, val = _sentences(dm, "train"), _sentences(dm, "validation")
    assert len(val) == 10 and len(train) == 30
    assert not set(train) & set(val)
    again = SST2DataModule(tokenizer=GPT2, data_files=str(one), val_fraction=0.25, cache=False)
    again.setup("validate")
    assert _sentences(again, "validation") == val  # the carve-out is seeded
    other = SST2DataModule(tokenizer=GPT2, data_files=str(one), val_fraction=0.25, seed=7, cache=False)
    other.setup("validate")
    assert _sentences(other, "validation") != val


def test_csv_files(tmp_path):
    paths = {}
    for split, n in (("train", 24), ("validation", 8)):
        paths[split] = str(tmp_path / f"{split}.csv")
        with open(paths[split], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["idx", "sentence", "label"])
            writer.writeheader()
            writer.writerows(sample_rows("sst2", split)[:n])
    dm = SST2DataModule(tokenizer=GPT2, data_files=paths)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 24 and len(dm.datasets["validation"]) == 8
    assert dm.datasets["validation"]["class_label"] == [r["label"] for r in sample_rows("sst2", "validation")[:8]]


def test_parquet_files_with_nested_columns(tmp_path):
    paths = {}
    for split in ("train", "validation"):
        paths[split] = str(tmp_path / f"{split}.parquet")
        datasets.Dataset.from_list(sample_rows("squad", split)[:12]).to_parquet(paths[split])
    dm = SQuADDataModule(tokenizer=GPT2, path="parquet", data_files=paths)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 12
    gold = [r["answers"]["text"] for r in sample_rows("squad", "validation")[:12]]
    assert dm.datasets["validation"]["gold_answers"] == gold


def test_a_json_array_file_and_a_list_of_files(tmp_path):
    rows = sample_rows("pricer", "train")
    (tmp_path / "a.json").write_text(json.dumps(rows[:60]))
    (tmp_path / "b.json").write_text(json.dumps(rows[60:]))
    dm = PricerDataModule(tokenizer=GPT2, data_files=[str(tmp_path / "a.json"), str(tmp_path / "b.json")], cache=False)
    dm.setup("fit")
    assert len(dm.datasets["train"]) + len(dm.datasets["validation"]) == len(rows)


def test_bad_sources_fail_in_one_sentence(tmp_path):
    with pytest.raises(QlitError, match="Data file '.*missing.jsonl' of SST-2 does not exist"):
        SST2DataModule(tokenizer=GPT2, data_files=str(tmp_path / "missing.jsonl")).setup("fit")
    with pytest.raises(QlitError, match="Cannot tell the format of data file 'rows.txt'"):
        infer_builder("rows.txt")
    with pytest.raises(QlitError, match="mix formats"):
        infer_builder({"train": "a.jsonl", "validation": "b.csv"})
    assert infer_builder({"train": ["a.jsonl.gz"], "validation": "b.json"}) == "json"
    with pytest.raises(QlitError, match="Unknown bundled sample 'qlit-samples/nope': qlit ships .*jsonl/chat"):
        SST2DataModule(tokenizer=GPT2, path="qlit-samples/nope").setup("fit")
    with pytest.raises(QlitError, match="is the format 'json': set data.init_args.data_files too"):
        SST2DataModule(tokenizer=GPT2, path="json").setup("fit")
    with pytest.raises(QlitError, match="has no split 'test' \\(it has train, validation\\)"):
        SST2DataModule(tokenizer=GPT2, path="qlit-samples/sst2", test_split="test").setup("test")


def test_limits_draw_a_seeded_subset(tmp_path):
    dm = SST2DataModule(tokenizer=GPT2, path="qlit-samples/sst2", limit_train_samples=16, limit_val_samples=5)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 16 and len(dm.datasets["validation"]) == 5
    # Validation limits keep the first rows; train limits draw at random (seeded), not the file's first rows.
    assert dm.datasets["validation"]["class_label"] == [r["label"] for r in sample_rows("sst2", "validation")[:5]]
    first = {r["sentence"] for r in sample_rows("sst2", "train")[:16]}
    assert {s.split("Review: ")[1].split("\n")[0] for s in _sentences(dm, "train")} != first


def test_pricer_tests_on_the_hub_test_split_with_answers_from_the_price_column():
    dm = PricerDataModule(tokenizer=GPT2, path="qlit-samples/pricer", limit_test_samples=5)
    dm.setup("test")
    rows = sample_rows("pricer", "test")[:5]
    assert all(r["text"].endswith("Price is $") for r in rows)
    assert dm.datasets["test"]["reference"] == [f"{round(r['price'])}.00" for r in rows]
    assert dm.datasets["test"]["price"] == [r["price"] for r in rows]
    assert len(dm.test_dataloader().dataset) == 5


def test_generation_bound_and_row_ids_reach_task_and_batches():
    dm = SQuADDataModule(tokenizer=GPT2, path="qlit-samples/squad", generate_val_samples=3, eval_batch_size=16)
    dm.setup("validate")
    assert dm.task.max_generate_rows == 3
    ids = [i for batch in dm.val_dataloader() for i in batch["row_index"].tolist()]
    assert ids == list(range(40))


def test_bundled_samples_ignore_hub_config_and_revision():
    # IndicVault's default config name ("Hinglish") is a hub config; the bundled sample is plain files.
    dm = IndicVaultDataModule(tokenizer=GPT2, path="qlit-samples/indicvault_hinglish", revision="main", cache=False)
    dm.setup("validate")
    assert len(dm.datasets["validation"]) > 0
    assert (SAMPLES / "indicvault_hinglish" / "train.jsonl").is_file()


def test_a_data_files_split_that_no_option_reads_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", sample_rows("sst2", "train")[:30])
    val = write_jsonl(tmp_path / "b.jsonl", sample_rows("sst2", "validation")[:10])
    # 'val' is no split name SST-2 reads: b.jsonl would be loaded, then validation carved from train without a word.
    with pytest.raises(QlitError) as err:
        SST2DataModule(tokenizer=GPT2, data_files={"train": str(train), "val": str(val)})
    assert str(err.value) == (
        "data.init_args.data_files names split 'val', which SST-2 does not read: it reads 'train' (train_split) and "
        "'validation' (val_split), and a test split once test_split names it (names are taken as they are, no "
        "aliases); rename the key or set data.init_args.val_split: val."
    )
    with pytest.raises(QlitError, match="names split 'test', which SST-2 does not read.*init_args.test_split: test"):
        SST2DataModule(tokenizer=GPT2, data_files={"train": str(train), "test": str(val)})
    # Naming the split in its option reads the file.
    dm = SST2DataModule(tokenizer=GPT2, data_files={"train": str(train), "val": str(val)}, val_split="val")
    dm.setup("validate")
    assert len(dm.datasets["val"]) == 10
    dm = SST2DataModule(tokenizer=GPT2, data_files={"train": str(train), "test": str(val)}, test_split="test")
    dm.setup("test")
    assert len(dm.datasets["test"]) == 10


def test_a_format_that_the_file_endings_contradict_is_an_error(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("sentence,label\ngood,1\n")
    with pytest.raises(QlitError, match="path is the format 'json' but data file '.*rows.csv' is CSV by its ending"):
        SST2DataModule(tokenizer=GPT2, path="json", data_files=str(rows))


def test_qlit_fit_with_a_validation_file_under_an_unknown_split_stops_before_the_run(tmp_path, capsys):
    train = write_jsonl(tmp_path / "a.jsonl", sample_rows("sst2", "train")[:30])
    val = write_jsonl(tmp_path / "b.jsonl", sample_rows("sst2", "validation")[:10])
    before = {p: p.read_bytes() for p in (train, val)}
    files = f"{{train: {train}, val: {val}}}"
    args = ["fit", "--config", str(ROOT / "configs/demo.yaml"), "--data.init_args.data_files", files]
    assert run_main(*cli_args(tmp_path, *args)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("qlit: error:")]
    assert line.startswith("qlit: error: data.init_args.data_files names split 'val', which SST-2 does not read")
    assert not (tmp_path / "logs").exists()
    assert {p: p.read_bytes() for p in (train, val)} == before


def test_an_unreadable_cache_of_local_files_is_rebuilt_with_one_line(tmp_path, qlit_cache, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", sample_rows("sst2", "train")[:20])
    options = dict(tokenizer=GPT2, data_files=str(data), val_fraction=0.25, cache=False)
    SST2DataModule(**options).setup("validate")
    (arrow,) = (qlit_cache / "sources").rglob("*.arrow")
    os.truncate(arrow, arrow.stat().st_size // 2)
    dm = SST2DataModule(**options)
    with caplog.at_level(logging.WARNING, logger="qlit.data.sources"):
        dm.setup("validate")
    lines = [r.getMessage() for r in caplog.records if r.name == "qlit.data.sources"]
    assert len(lines) == 1 and lines[0].startswith("Cache of SST-2's data files ")
    assert lines[0].endswith(": rebuilding it.")
    assert len(dm.datasets["validation"]) == 5
