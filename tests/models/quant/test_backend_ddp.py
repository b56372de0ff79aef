"""Every quantization backend under two-process DDP on the CPU (``--trainer.strategy ddp`` over gloo): each backend's
demo (tests/models/quant/test_every_backend.py's, plus AWQ and LoftQ on NF4), shortened, trains on two ranks as one
process trains the same global batches, rank 0 saves one peft-format adapter that reloads with the trained logits, and
both ranks count the weights as one process does.

One ``torchrun`` launch runs every backend's fit in turn (process start-up paid once). Lightning's DDP sampler
shuffles qlit's seeded order once more across the ranks, so the one-process reference trains, in batches of 4, the
rows the two ranks drew (each step: rank 0's two, then rank 1's), as each rank recorded them. Run as a script, this
file is the ranks' side of the launch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import launch, scalars
from lightning.pytorch import Callback, LightningModule, Trainer
from test_every_backend import BACKENDS, fit, losses, run_dir

from qlit.callbacks.memory import STATE_METRICS, GPUMemoryMonitor
from qlit.callbacks.params import TrainableParamsMonitor

#: Each run: its config and the options on top of it (test_every_backend's demos, plus AWQ and LoftQ on NF4).
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{name: (config, ()) for name, (config, *_) in BACKENDS.items()},
    # QAT's int4 weights alone: the demo's int8 activations round float32's last bits, in which two ranks' summed
    # gradients differ from one process's, into whole quantization steps (an adapter moved by 1e-6 moves the loss by
    # 5e-4; the end-of-fit validation losses of the two runs differed by 2e-4), so only the weights' fake quantization
    # compares to 1e-5.
    "qat": (BACKENDS["qat"][0], ("--model.init_args.quantization.scheme", "int4_weight_only")),
    "awq": (BACKENDS["gptq"][0], ("--model.init_args.pretrained", "qlit-tiny/qwen2-awq")),
    "loftq": ("configs/demo_loftq.yaml", ()),
}
#: test_every_backend's SHORT (16 rows, batches of 4, no validation, constant lr) to the epoch's end, 4 steps; 16
#: validation rows for what the end of fit measures (QAT's converted model).
STEPS = ("--trainer.max_steps", "4", "--data.init_args.limit_val_samples", "16")
#: The two ranks: 2 rows each, so that every global batch holds one process's 4.
TWO_RANKS = (
    *("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"),
    *("--data.init_args.batch_size", "2"),
)
#: What each rank's trained model reads, for the logits compared with the reloaded adapter's.
IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
#: Metrics that do not depend on how many processes trained (the memory monitor logs the largest rank's).
SAME_METRICS = ("train/loss", "params/trainable", "params/total", "params/weight_gib", *STATE_METRICS)
CPU = torch.device("cpu")
TIMEOUT = 300  # seconds: a rank waiting in a collective that the other never joins fails the test instead of hanging


class RankRecord(Callback):
    """Writes, per rank, the rows of each training batch, the trained model's logits on :data:`IDS`, and what the
    weight-counting callbacks measured, into ``directory/rank<N>.json``.

    Args:
        directory: where the record goes.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.rows: list[list[int]] = []
        self.logits: list | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.rows.append(batch["row_index"].tolist())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before the module's end of fit, which may convert the base (QAT's int4): the model as it trained.
        model = pl_module.model
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=IDS).logits.tolist()
        model.train()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        (params,) = [c.metrics for c in trainer.callbacks if isinstance(c, TrainableParamsMonitor)]
        (held,) = [c.rank_bytes for c in trainer.callbacks if isinstance(c, GPUMemoryMonitor)]
        record = {
            "world_size": trainer.world_size,
            "rows": self.rows,
            "logits": self.logits,
            "params": params,
            "held": held,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _records(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((directory / "records").glob("rank*.json"))]


def _fits(tmp: Path) -> list[tuple[str, list[str]]]:
    """Every two-rank fit of the launch: where it writes, and its arguments after the config."""
    return [(str(tmp / name), [config, *options, *STEPS, *TWO_RANKS]) for name, (config, options) in RUNS.items()]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_qwen2) -> Path:
    """Every backend's two-rank fit, in one ``torchrun`` launch; the folder of their runs. The tiny models are built
    here first, not by both ranks at once."""
    from qlit.models.tiny import resolve_tiny

    for name in ("qlit-tiny/qwen2-gptq", "qlit-tiny/qwen2-awq"):
        resolve_tiny(name)
    tmp = tmp_path_factory.mktemp("ddp")
    spec = tmp / "fits.json"
    spec.write_text(json.dumps(_fits(tmp)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    launch([*command, __file__, str(spec)], tmp, TIMEOUT, Path(__file__).resolve().parent)
    return tmp


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, two_ranks) -> Path:
    """Each backend's one-process reference: the whole global batch (4 rows), over the rows the two ranks drew."""
    from qlit.data.batching import EpochSeededSampler

    tmp = tmp_path_factory.mktemp("one-process")
    for name, (config, options) in RUNS.items():
        zero, one = _records(two_ranks / name)
        order = [row for mine, theirs in zip(zero["rows"], one["rows"], strict=True) for row in (*mine, *theirs)]

        def drawn(sampler: EpochSeededSampler, order: list[int] = order) -> Any:
            return iter(order) if sampler.shuffle else iter(range(sampler.size))

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(EpochSeededSampler, "__iter__", drawn)
            fit(tmp / name, config, *options, *STEPS, callbacks=(RankRecord(str(tmp / name / "records")),))
    return tmp


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_train_as_one_process_over_the_same_rows(two_ranks, one_process, name):
    from safetensors.torch import load_file

    zero, one = _records(two_ranks / name)
    (reference,) = _records(one_process / name)
    assert zero["world_size"] == one["world_size"] == 2 and reference["world_size"] == 1
    # The ranks trained disjoint halves of the 16 rows, 2 a step; the reference, the same rows 4 a step.
    assert [len(rows) for rows in zero["rows"] + one["rows"]] == [2] * 8
    assert sorted(sum(zero["rows"] + one["rows"], [])) == list(range(16))
    assert reference["rows"] == [a + b for a, b in zip(zero["rows"], one["rows"], strict=True)]
    got, expected = scalars(run_dir(two_ranks / name)), scalars(run_dir(one_process / name))
    assert sorted(losses(run_dir(two_ranks / name))) == [0, 1, 2, 3]
    for tag in (*SAME_METRICS, *(t for t in expected if t.startswith("qat/"))):
        assert [s for s, _ in got[tag]] == [s for s, _ in expected[tag]], (name, tag)
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in expected[tag]], abs=1e-5), (name, tag)
    weights = {
        kind: load_file(run_dir(base / name) / "adapter" / "adapter_model.safetensors")
        for kind, base in (("ranks", two_ranks), ("one", one_process))
    }
    assert set(weights["ranks"]) == set(weights["one"]) and weights["one"]
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["ranks"][key], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(RUNS))
def test_rank_zero_saves_one_adapter_that_reloads_with_the_trained_logits(two_ranks, name):
    from peft import PeftModel

    from qlit.models.loading import load_causal_lm
    from qlit.models.quantization import Quantization

    adapters = sorted(p.parent for p in (two_ranks / name).rglob("adapter_config.json"))
    assert adapters == [run_dir(two_ranks / name) / "adapter"]  # one run folder, one adapter: rank 0's
    zero, one = _records(two_ranks / name)
    trained = torch.tensor(zero["logits"])
    # DDP kept the replicas equal: both ranks' trained models compute the same logits.
    torch.testing.assert_close(torch.tensor(one["logits"]), trained, rtol=0, atol=1e-6)
    spec = json.loads((adapters[0] / "qlit_base.json").read_text())
    quantization = Quantization(**spec["quantization"])
    with torch.no_grad():
        base = load_causal_lm(spec["pretrained"], quantization=quantization, dtype=spec["dtype"], device=CPU)
        quantization.backend.convert(base, has_adapter=True)
        reloaded = PeftModel.from_pretrained(base, str(adapters[0])).eval()
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, trained, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(RUNS))
def test_both_ranks_count_the_weights_as_one_process(two_ranks, one_process, name):
    zero, one = _records(two_ranks / name)
    (reference,) = _records(one_process / name)
    assert zero["params"] == one["params"] == pytest.approx(reference["params"], rel=1e-9)
    assert zero["params"]["params/weight_gib"] > 0
    # Every rank holds the whole model, its gradients and optimizer state: each the one process's.
    assert zero["held"] == one["held"]  # the list every rank gathered
    assert len(zero["held"]) == 2 and zero["held"][0] == zero["held"][1] == reference["held"][0]
    assert all(zero["held"][0][tag] > 0 for tag in STATE_METRICS)


def _ranks_side(spec: str) -> int:
    """One rank of the launch: every fit of ``spec`` in turn, in one process group."""
    for directory, (config, *args) in json.loads(Path(spec).read_text()):
        fit(Path(directory), config, *args, callbacks=(RankRecord(str(Path(directory) / "records")),))
    return 0


if __name__ == "__main__":
    sys.exit(_ranks_side(sys.argv[1]))
