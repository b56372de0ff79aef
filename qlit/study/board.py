"""``qlit board``: TensorBoard on a folder of runs, opening on what a study compares.

TensorBoard's Time Series tab orders its groups by tag name and unfolds only the first two, so a plain
``tensorboard --logdir logs`` opens on whatever sorts first (``cpu/…``, ``epoch``). Its URL can pin cards above all
groups (``pinnedCards``): ``qlit board`` starts TensorBoard and prints that URL with the runs' study tags pinned —
training and validation loss, the task's main metric, peak memory, tokens/s and latency, as each run's HPARAMS
record lists them (:func:`qlit.callbacks._board.study_tags`). The same layout is in the Custom Scalars tab.

    qlit board logs                  # TensorBoard on port 6006, the URL to open printed
    qlit board logs --print-url      # only the URL's path and query, for a TensorBoard already running
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from qlit.errors import QlitError

#: How many study tags are pinned after training loss: six cards, two rows of three on a laptop screen.
PINNED = 5

_EXPERIMENT_TAG = "_hparams_/experiment"
_EVENTS = "events.out.tfevents."


def run_study_tags(run_dir: Path) -> list[str]:
    """The metrics of the run's HPARAMS record, in its order (empty when the run has none, e.g. a crashed start).

    Only the start of each event file is read: the record is written before the first step.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    for events in sorted(run_dir.glob(_EVENTS + "*")):
        for n, event in enumerate(EventFileLoader(str(events)).Load()):
            for value in event.summary.value:
                if value.tag == _EXPERIMENT_TAG:
                    raw = value.metadata.plugin_data.content
                    data = plugin_data_pb2.HParamsPluginData.FromString(raw)
                    return [m.name.tag for m in data.experiment.metric_infos]
            if n > 200:  # past the start of the file: no record here
                break
    return []


def pinned_tags(logdir: str | Path, limit: int = PINNED) -> list[str]:
    """``train/loss`` and the first ``limit`` study tags over all runs under ``logdir``, each once, in the runs' order
    (a study of several tasks pins each task's main metric)."""
    from qlit.study.runs import find_run_dirs

    order: dict[str, int] = {}
    for run_dir in find_run_dirs(logdir):
        tags = [tag for tag in run_study_tags(run_dir) if tag != "hp_metric"]  # Lightning's placeholder (older runs)
        for position, tag in enumerate(tags):
            order[tag] = min(order.get(tag, position), position)
    study = sorted(order, key=lambda tag: (order[tag], tag))
    return ["train/loss", *study[:limit]] if study else []


def url_query(tags: Sequence[str]) -> str:
    """The Time Series URL (path, query and tab) that opens with ``tags`` pinned."""
    if not tags:
        return "/#timeseries"
    cards = json.dumps([{"plugin": "scalars", "tag": tag} for tag in tags], separators=(",", ":"))
    return "/?pinnedCards=" + quote(cards, safe="") + "#timeseries"


def main(argv: Sequence[str] | None = None, prog: str = "qlit board") -> None:
    """Entry point of ``qlit board``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="TensorBoard on a folder of runs, opening on loss, the task metric, memory, tokens/s and latency.",
    )
    parser.add_argument("logdir", nargs="?", default="logs", help="runs folder (default: logs)")
    parser.add_argument("--port", type=int, default=6006, help="TensorBoard's port (default: 6006)")
    parser.add_argument("--host", default="localhost", help="address TensorBoard listens on (default: localhost)")
    parser.add_argument("--print-url", action="store_true", help="print the URL's path and query; start nothing")
    args = parser.parse_args(argv)
    try:
        if not Path(args.logdir).is_dir():
            raise QlitError(f"'{args.logdir}' is not a folder: pass the folder the runs are in (default: logs).")
        query = url_query(pinned_tags(args.logdir))
    except QlitError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.print_url:
        print(query)
        return
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(args.logdir), "--port", str(args.port), "--host", args.host])
    try:
        root = board.launch().rstrip("/")
    except program.TensorBoardServerException as err:  # the port is taken, the address cannot be bound
        print(f"{prog}: error: TensorBoard could not start: {err.msg}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"TensorBoard on {args.logdir}; open {root}{query}\n(Ctrl+C stops it)", flush=True)
    try:
        threading.Event().wait()  # the server runs in launch()'s thread until the process ends
    except KeyboardInterrupt:
        pass
