"""What TensorBoard shows of a run, read back with TensorBoard's own readers: one HPARAMS record holding the study's
columns with the run's final metrics linked, and a custom-scalars layout that opens on what a study compares."""

import math
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as layout_metadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _plugin_data(events: EventAccumulator, tag: str) -> plugin_data_pb2.HParamsPluginData:
    return plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent(metadata.PLUGIN_NAME)[tag])


def test_one_hparams_record_with_the_study_columns_and_the_final_metrics_linked(demo_run):
    events = _events(demo_run.run_dir)
    start = _plugin_data(events, metadata.SESSION_START_INFO_TAG).session_start_info
    columns = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    scalars = set(events.Tags()["scalars"])

    def last(tag: str) -> float:
        return events.Scalars(tag)[-1].value

    # The columns a quantization study compares runs by (configs/demo.yaml: NF4 + double quant, LoRA, fp32 compute).
    assert columns["pretrained"] == "qlit-tiny/qwen2"
    assert (columns["quantization"], columns["adapter"], columns["compute_dtype"]) == ("nf4", "LoraConfig", "float32")
    assert columns["double_quant"] == "true" and columns["params/trainable"] == last("params/trainable") > 0
    # The table's columns: TensorBoard ticks the first five by name, so the record holds the five that say what was
    # trained (the parameter counts stay among the record's values, for qlit compare).
    experiment = _plugin_data(events, metadata.EXPERIMENT_TAG).experiment
    shown = ["adapter", "compute_dtype", "double_quant", "pretrained", "quantization"]
    assert sorted(info.name for info in experiment.hparam_infos) == shown
    # Its metrics, of which TensorBoard ticks the first five: loss, the task's main metric and the costs of this
    # device (a CPU run logs no GPU memory) first, then the rest.
    linked = [info.name.tag for info in experiment.metric_infos]
    assert linked == [
        *("val/loss", "val/accuracy", "cpu/peak_rss_gib", "train/tokens_per_sec", "val/latency_ms_mean"),
        *("val/decode_ms_per_token", "time/fit_seconds", "val/perplexity"),
    ]
    assert all(info.name.group == "" for info in experiment.metric_infos)  # the run's own scalars
    # TensorBoard's table reads each linked metric's last scalar in the run: every one holds a real value.
    assert set(linked) <= scalars
    assert all(math.isfinite(last(tag)) for tag in linked)
    assert last("val/perplexity") == pytest.approx(math.exp(last("val/loss")), rel=1e-4)
    assert 0.0 <= last("val/accuracy") <= 1.0 and last("val/latency_ms_mean") > 0
    assert "hp_metric" not in scalars  # no placeholder metric
    end = _plugin_data(events, metadata.SESSION_END_INFO_TAG).session_end_info
    assert end.status == api_pb2.STATUS_SUCCESS
    # One record: TensorBoard shows a run's first one, so a second (Lightning's own) could only mislead.
    (event_file,) = demo_run.run_dir.glob("events.out.tfevents.*")
    tags = [v.tag for e in EventFileLoader(str(event_file)).Load() for v in e.summary.value]
    assert tags.count(metadata.SESSION_START_INFO_TAG) == tags.count(metadata.EXPERIMENT_TAG) == 1


def test_layout_opens_on_loss_task_metric_memory_throughput_and_latency(demo_run):
    events = _events(demo_run.run_dir)
    (record,) = events.Tensors(layout_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(record.tensor_proto.string_val[0])
    first = layout.category[0]
    assert not first.closed
    charts = [(chart.title, list(chart.multiline.tag)) for chart in first.chart]
    logged = events.Tags()["scalars"]

    def shown(regexes: list[str]) -> list[str]:
        return [tag for tag in logged if any(re.fullmatch(r, tag) for r in regexes)]

    # Training and validation loss share the first chart; the task's metric comes next.
    assert shown(charts[0][1]) == ["train/loss", "val/loss"]
    assert shown(charts[1][1]) == ["val/accuracy"]
    # Every chart has data, and together they show what a study compares.
    assert all(shown(regexes) for _, regexes in charts), charts
    every = {tag for _, regexes in charts for tag in shown(regexes)}
    assert {"val/perplexity", "cpu/peak_rss_gib", "train/tokens_per_sec", "val/latency_ms_mean"} <= every


def test_qlit_board_pins_loss_the_task_metric_memory_and_tokens_per_second(demo_run, tmp_path):
    """TensorBoard's TIME SERIES tab unfolds the first two groups by name (cpu/…, epoch); the URL `qlit board` prints
    pins what a study compares above them, read from the runs' HPARAMS records."""
    import json
    import subprocess
    import sys
    from urllib.parse import parse_qs, urlsplit

    logs = demo_run.run_dir.parent.parent  # logs/demo/version_0 -> logs
    done = subprocess.run(
        [sys.executable, "-m", "qlit", "board", str(logs), "--print-url"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    url = urlsplit(done.stdout.strip())
    assert url.path == "/" and url.fragment == "timeseries"
    cards = json.loads(parse_qs(url.query)["pinnedCards"][0])
    assert [card["tag"] for card in cards] == [
        *("train/loss", "val/loss", "val/accuracy", "cpu/peak_rss_gib", "train/tokens_per_sec"),
        "val/latency_ms_mean",
    ]
    assert {card["plugin"] for card in cards} == {"scalars"}
    # A folder without runs opens TensorBoard's own first screen; a missing one is one sentence.
    empty = subprocess.run(
        [sys.executable, "-m", "qlit", "board", str(tmp_path), "--print-url"], capture_output=True, text=True
    )
    assert (empty.returncode, empty.stdout.strip()) == (0, "/#timeseries")
    missing = subprocess.run(
        [sys.executable, "-m", "qlit", "board", str(tmp_path / "nope"), "--print-url"], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    sentence = f"'{tmp_path / 'nope'}' is not a folder: pass the folder the runs are in (default: logs)."
    assert missing.stderr.strip() == f"qlit board: error: {sentence}"
