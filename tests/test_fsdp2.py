"""Sharded training (``--trainer.strategy qlit_fsdp2``, FSDP2) on CPU processes over gloo, as a user launches it.

Two ranks (under ``torchrun``, which runs several fits in one launch) and four (``qlit fit --trainer.devices 4``,
Lightning's own launcher) train the tiny Qwen2 and Llama under NF4 + LoRA and unquantized + LoRA; a one-process run
with the same global batch is the reference. Run as a script, this file is the ranks' side of the launch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT, launch, run_cli, run_main, scalars

from qlit.errors import QlitError

#: The fit every run makes: the demo (SST-2 sample, LoRA r 8), fp32 end to end, 4 optimizer steps (mid-epoch: the
#: epoch has 80), a checkpoint every 2. Bounded by steps alone, as tests/test_resume.py runs it.
FIT = [
    *("--config", str(ROOT / "configs/demo.yaml"), "--trainer.accelerator", "cpu"),
    *("--trainer.max_epochs", "-1", "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0"),
    *("--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0"),
    *("--checkpoint.monitor", "null", "--checkpoint.save_top_k", "-1", "--checkpoint.every_n_train_steps", "2"),
    *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
]
#: The packed 4-bit weights stored as float32, the dtype of every other weight of an fp32 run: on a GPU, bfloat16.
NF4 = ("--model.init_args.quantization.mode", "nf4", "--model.init_args.quantization.quant_storage", "float32")
NONE = ("--model.init_args.quantization.mode", "none", "--model.init_args.quantization.double_quant", "false")
#: Validation of 4 rows (2 per rank), generation included (the latency probe and the task's answers).
VALIDATE = ("--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2")
#: What the GPU config trains in (configs/qwen_qlora_fsdp.yaml): bf16 everywhere, 4-bit weights stored as bf16.
BF16 = (
    *("--trainer.precision", "bf16-true", "--trainer.max_steps", "2", "--model.init_args.dtype", "bfloat16"),
    *("--model.init_args.quantization.compute_dtype", "bfloat16"),
    *("--model.init_args.quantization.quant_storage", "bfloat16"),
)
DISTRIBUTED = ("--trainer.strategy.init_args.save_distributed_checkpoint", "true")
STRATEGY = ("--trainer.strategy.class_path", "qlit.sharding.FSDP2Strategy")

#: The runs, by name: model, options; the two-rank runs also (per rank) half the batch, eval batch and strategy.
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qwen2-nf4": ("qwen2", (*NF4, *VALIDATE)),
    # The base loaded whole on every rank, then sharded (the path of formats that cannot load by shard).
    "qwen2-none": ("qwen2", (*NONE, "--trainer.strategy.init_args.load_by_shard", "false")),
    "llama-nf4": ("llama", NF4),
    "llama-none": ("llama", (*NONE, *DISTRIBUTED)),
    "qwen2-nf4-bf16": ("qwen2", (*NF4, *BF16)),
}
#: The resumed runs: the run they resume, from its step-2 checkpoint (a file, or a folder of shards).
RESUMED = {"qwen2-nf4": "full", "llama-none": "distributed"}
BATCH = 4  # the global batch: 4 rows on one process, 2 on each of two ranks, 1 on each of four
TIMEOUT = 600  # seconds: a rank waiting in a collective that another never joins fails the test instead of hanging


def _model(arch: str) -> tuple[str, ...]:
    return ("--model.init_args.pretrained", f"qlit-tiny/{arch}")


def _where(tmp: Path, name: str) -> tuple[str, ...]:
    return (
        "--trainer.logger.init_args.save_dir",
        str(tmp / name / "logs"),
        "--trainer.default_root_dir",
        str(tmp / name),
    )


def run_dir(tmp: Path, name: str) -> Path:
    return tmp / name / "logs" / "demo" / "version_0"


def sharded_fit(tmp: Path, name: str, ranks: int, *, into: str | None = None, ckpt: Path | None = None) -> list[str]:
    """The arguments of run ``name`` on ``ranks`` ranks, written under ``into`` (default: its name)."""
    arch, options = RUNS[name]
    per_rank = ("--data.init_args.batch_size", str(BATCH // ranks), "--data.init_args.eval_batch_size", "2")
    # A run with strategy options names the class; the others the registered name.
    named = any(o.startswith("--trainer.strategy.") for o in options)
    strategy = STRATEGY if named else ("--trainer.strategy", "qlit_fsdp2")
    resume = ("--ckpt_path", str(ckpt)) if ckpt is not None else ()
    where = _where(tmp, into or name)
    return [
        "fit",
        *FIT,
        *_model(arch),
        *strategy,
        *per_rank,
        *options,
        *where,
        "--trainer.devices",
        str(ranks),
        *resume,
    ]


def step2(directory: Path) -> Path:
    """The step-2 checkpoint of the run in ``directory``."""
    return directory / "checkpoints" / "epoch=0-step=2.ckpt"


def sharded_fits(tmp: Path, ranks: int, one_process: dict[str, Path]) -> list[list[str]]:
    """The arguments of each fit of the two-rank launch, in order (a resumed run after the run it resumes), the last
    one resuming the one-process reference's checkpoint."""
    fits = []
    for name in RUNS:
        fits.append(sharded_fit(tmp, name, ranks))
        if name in RESUMED:
            fits.append(sharded_fit(tmp, name, ranks, into=f"{name}-resumed", ckpt=step2(run_dir(tmp, name))))
    fits.append(sharded_fit(tmp, "qwen2-nf4", ranks, into="from-one-process", ckpt=step2(one_process["qwen2-nf4"])))
    return fits


def losses(directory: Path, tag: str = "train/loss") -> dict[int, float]:
    return dict(scalars(directory)[tag])


def first(directory: Path, tag: str) -> float:
    return scalars(directory)[tag][0][1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, one_process) -> tuple[Path, str]:
    """Every two-rank fit, in one ``torchrun`` launch; where they wrote, and the launch's console."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    spec = tmp / "fits.json"
    spec.write_text(json.dumps(sharded_fits(tmp, 2, one_process)))
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return tmp, launch([*run, str(Path(__file__)), str(spec)], tmp, TIMEOUT)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_qwen2) -> dict[str, Path]:
    """The reference of each run: one process, the whole global batch (4 rows, 4 validation rows); the tiny models
    built here, not by several ranks at once."""
    tmp = tmp_path_factory.mktemp("one-process")
    out = {}
    for name, (arch, options) in RUNS.items():
        kept = [o for i, o in enumerate(options) if not _strategy_option(options, i)]
        batch = ("--data.init_args.batch_size", str(BATCH), "--data.init_args.eval_batch_size", "4")
        cli = run_cli(tmp / name, "fit", *FIT, *_model(arch), *batch, *kept)
        out[name] = Path(cli.trainer.log_dir)
    return out


def _strategy_option(options: tuple[str, ...], i: int) -> bool:
    """Whether ``options[i]`` is a strategy option or its value (the reference runs on one device, no strategy)."""
    return options[i].startswith("--trainer.strategy.") or (i > 0 and options[i - 1].startswith("--trainer.strategy."))


@pytest.mark.parametrize("name", ["qwen2-nf4", "qwen2-none", "llama-nf4", "llama-none"])
def test_two_ranks_train_as_one_process_each_holding_half_of_every_tensor(sharded, one_process, name):
    tmp, console = sharded
    got, expected = losses(run_dir(tmp, name)), losses(one_process[name])
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3]
    assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(expected)], abs=1e-5)
    # The memory callback's per-rank numbers (the largest rank's is logged): half of the one process's each.
    for tag in ("memory/params_gib", "memory/grads_gib", "memory/optimizer_gib"):
        one, rank = first(one_process[name], tag), first(run_dir(tmp, name), tag)
        assert one > 0 and one / 2 <= rank <= one / 2 * 1.02, (tag, rank, one)
    said = "Held per rank (parameters, gradients, optimizer state): rank 0 "
    assert console.count(said) == len(RUNS) + len(RESUMED) + 1  # once per fit


def test_validation_and_generation_under_sharding_score_the_rows_one_process_scores(sharded, one_process):
    tmp, _ = sharded
    got, expected = scalars(run_dir(tmp, "qwen2-nf4")), scalars(one_process["qwen2-nf4"])
    for tag in ("val/loss", "val/accuracy"):
        assert [s for s, _ in got[tag]] == [s for s, _ in expected[tag]] == [1, 3], tag
    assert got["val/latency_ms_mean"][0][1] > 0  # the latency probe generated on every rank
    assert [v for _, v in got["val/loss"]] == pytest.approx([v for _, v in expected["val/loss"]], abs=1e-5)
    assert [v for _, v in got["val/accuracy"]] == [v for _, v in expected["val/accuracy"]]


@pytest.mark.parametrize("name", ["qwen2-nf4", "llama-none"])
def test_the_gathered_adapter_loads_with_peft_and_gives_the_one_process_logits(sharded, one_process, name):
    from peft import PeftModel
    from safetensors.torch import load_file

    from qlit.models.loading import load_causal_lm
    from qlit.models.quantization import Quantization

    tmp, _ = sharded
    adapters = {"sharded": run_dir(tmp, name) / "adapter", "one": one_process[name] / "adapter"}
    weights = {k: load_file(v / "adapter_model.safetensors") for k, v in adapters.items()}
    assert set(weights["sharded"]) == set(weights["one"]) and weights["one"]
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["sharded"][key], value, atol=1e-5, rtol=0)
    spec = json.loads((adapters["sharded"] / "qlit_base.json").read_text())
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for kind, adapter in adapters.items():
        base = load_causal_lm(
            spec["pretrained"],
            quantization=Quantization(**spec["quantization"]),
            dtype="auto",
            device=torch.device("cpu"),
        )
        with torch.no_grad():
            out[kind] = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
    torch.testing.assert_close(out["sharded"], out["one"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "kind"), list(RESUMED.items()))
def test_a_run_stopped_mid_epoch_resumes_the_uninterrupted_trajectory(sharded, name, kind):
    tmp, _ = sharded
    checkpoint = step2(run_dir(tmp, name))
    if kind == "full":  # one file, written by rank 0: the format one process writes
        assert checkpoint.is_file()
    else:  # one folder of per-rank shards
        assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    whole, resumed = losses(run_dir(tmp, name)), losses(run_dir(tmp, f"{name}-resumed"))
    assert sorted(resumed) == [2, 3]
    assert [resumed[2], resumed[3]] == pytest.approx([whole[2], whole[3]], abs=1e-6)


def test_checkpoints_of_one_process_and_of_two_ranks_resume_each_other(sharded, one_process, tmp_path):
    tmp, _ = sharded
    reference = losses(one_process["qwen2-nf4"])
    # The reference's checkpoint, resumed on two ranks.
    resumed = losses(run_dir(tmp, "from-one-process"))
    assert sorted(resumed) == [2, 3]
    assert [resumed[2], resumed[3]] == pytest.approx([reference[2], reference[3]], abs=1e-5)
    # The two ranks' checkpoint (one file, the gathered adapter and optimizer state), resumed by one process.
    arch, options = RUNS["qwen2-nf4"]
    batch = ("--data.init_args.batch_size", str(BATCH), "--data.init_args.eval_batch_size", "4")
    ckpt = ("--ckpt_path", str(step2(run_dir(tmp, "qwen2-nf4"))))
    cli = run_cli(tmp_path, "fit", *FIT, *_model(arch), *batch, *options, *ckpt)
    resumed = losses(Path(cli.trainer.log_dir))
    assert sorted(resumed) == [2, 3]
    assert [resumed[2], resumed[3]] == pytest.approx([reference[2], reference[3]], abs=1e-5)


def test_qlit_export_merges_a_folder_of_shards_as_the_adapter_its_run_saved(sharded):
    from safetensors.torch import load_file

    tmp, _ = sharded
    run = run_dir(tmp, "llama-none")
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    for source, out in ((run / "checkpoints" / "last.ckpt", "from-shards"), (run / "adapter", "from-adapter")):
        assert run_main("export", "--adapter", str(source), "--output", str(tmp / out)) == 0
    got, expected = (
        load_file(tmp / "from-shards" / "model.safetensors"),
        load_file(tmp / "from-adapter" / "model.safetensors"),
    )
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_bf16_with_4bit_weights_stored_as_bf16_trains_as_one_process(sharded, one_process):
    tmp, _ = sharded
    got, expected = losses(run_dir(tmp, "qwen2-nf4-bf16")), losses(one_process["qwen2-nf4-bf16"])
    assert sorted(got) == sorted(expected) == [0, 1]
    # bf16 rounds each rank's partial sums on their own: equal to bf16's precision.
    assert [got[0], got[1]] == pytest.approx([expected[0], expected[1]], rel=2e-2)
    one, rank = (
        first(one_process["qwen2-nf4-bf16"], "memory/params_gib"),
        first(run_dir(tmp, "qwen2-nf4-bf16"), "memory/params_gib"),
    )
    assert one / 2 <= rank <= one / 2 * 1.02


def test_four_ranks_launched_by_qlit_fit_train_as_one_process_each_holding_a_quarter(tmp_path, one_process):
    # Two steps of one row per rank; Lightning starts the other three processes, as on one machine with 4 GPUs.
    fit = sharded_fit(tmp_path, "qwen2-nf4", 4, into="four")
    command = [sys.executable, "-m", "qlit", *fit, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]
    launch(command, tmp_path, TIMEOUT)
    got, expected = losses(run_dir(tmp_path, "four")), losses(one_process["qwen2-nf4"])
    assert [got[0], got[1]] == pytest.approx([expected[0], expected[1]], abs=1e-5)
    one, rank = (
        first(one_process["qwen2-nf4"], "memory/params_gib"),
        first(run_dir(tmp_path, "four"), "memory/params_gib"),
    )
    assert one / 4 <= rank <= one / 4 * 1.05


# ----- settings refused before any weight loads (no process group needed) ------------------------------------------
def _module(**kwargs: Any):
    from peft import LoraConfig

    from qlit.models.quantization import Quantization
    from qlit.module import QLitModule

    quantization = Quantization(**kwargs.pop("quantization", {"mode": "nf4", "compute_dtype": "float32"}))
    adapter = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    return QLitModule(pretrained="qlit-tiny/qwen2", quantization=quantization, adapter=adapter, **kwargs)


@pytest.mark.parametrize(
    ("settings", "precision", "named"),
    [
        ({"gradient_checkpointing": True}, "32-true", "model.gradient_checkpointing"),
        ({"quantization": {"mode": "int8"}}, "32-true", "quantization mode 'int8'"),
        ({"quantization": {"mode": "nf4", "quant_storage": "float32"}}, "bf16-true", "quantization.quant_storage"),
        ({}, "16-mixed", "trainer.precision 16-mixed"),
    ],
)
def test_what_cannot_train_sharded_is_one_sentence_naming_the_field(settings, precision, named):
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

    from qlit.sharding import FSDP2Strategy

    strategy = FSDP2Strategy()
    plugins = {
        "32-true": Precision(),
        "bf16-true": HalfPrecision("bf16-true"),
        "16-mixed": MixedPrecision("16-mixed", "cpu"),
    }
    strategy.precision_plugin = plugins[precision]
    with pytest.raises(QlitError, match=named) as err:
        strategy.sharded_base(_module(**settings))
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_the_gpu_config_builds_the_sharded_strategy_in_bf16(capsys):
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.plugins.precision import HalfPrecision
    from lightning.pytorch.strategies import Strategy

    from qlit.models.quantization import Quantization
    from qlit.sharding import FSDP2Strategy

    assert run_main("fit", "--config", str(ROOT / "configs/qwen_qlora_fsdp.yaml"), "--print_config") == 0
    config = yaml.safe_load(capsys.readouterr().out)
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config["trainer"]["strategy"]})).strategy
    assert isinstance(strategy, FSDP2Strategy) and strategy.activation_checkpointing
    assert config["trainer"]["precision"] == "bf16-true"
    model = config["model"]["init_args"]
    quantization = Quantization(**model["quantization"])
    assert quantization.quant_storage == quantization.compute_dtype == model["dtype"] == "bfloat16"
    assert model["gradient_checkpointing"] is False and model["save_adapter"] is True
    # The config passes the strategy's checks (before any weight is loaded): one dtype in every gathered unit.
    strategy.precision_plugin = HalfPrecision("bf16-true")
    kwargs = {k: model[k] for k in ("dtype", "prepare_kbit", "gradient_checkpointing")}
    module = _module(quantization=model["quantization"], **kwargs)
    strategy._check(module)


def _ranks_side(spec: str) -> int:
    """One rank of the ``torchrun`` launch: every fit of ``spec`` in turn, in one process group."""
    for args in json.loads(Path(spec).read_text()):
        code = run_main(*args)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(_ranks_side(sys.argv[1]))
