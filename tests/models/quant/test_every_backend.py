"""What works on a bitsandbytes base works on every quantization backend: each backend's demo config, shortened, goes
through the same checks: an interrupted run resumes on the uninterrupted trajectory, the adapter is peft's format
and records the base's storage, it reloads with the trained model's logits, it merges on export (or export says why
not), it scores with `qlit eval`, the callbacks count its weights, and studies name and offer its technique."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, cli_args, run_main, scalars
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qlit.callbacks.params import count_parameters
from qlit.models.loading import load_causal_lm
from qlit.models.quantization import Quantization
from qlit.study.compare import table
from qlit.study.runs import collect_runs
from qlit.study.sweep import builtin_strategies
from qlit.trainer_cli import TRAINER_DEFAULTS, QlitCLI

#: Each backend's demo, the technique a study calls it, and whether its export merges (else: the refusal's words).
BACKENDS = {
    "nf4": ("configs/demo.yaml", "QLoRA (NF4 + DQ)", None),
    "hqq": ("configs/demo_hqq.yaml", "HQQ 4-bit + LoRA", None),
    "torchao": ("configs/demo_torchao.yaml", "torchao int8 + LoRA", None),
    # QAT trains through fake-quantized int8 activations too, which a plain transformers model does not compute.
    "qat": ("configs/demo_qat.yaml", "QAT int4 + LoRA", "which a plain transformers model cannot compute"),
    "gptq": ("configs/demo_gptq.yaml", "GPTQ 4-bit + LoRA", None),
}
#: Backends whose training keeps the full-precision weights (fake quantization) rather than a smaller copy.
FULL_PRECISION_IN_TRAINING = {"qat"}

CPU = torch.device("cpu")

#: Four steps of 4 rows, a checkpoint every 2, every step's loss logged, no validation or latency probe.
SHORT = (
    *("--trainer.max_epochs", "-1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "0"),
    *("--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0", "--latency.probe_samples", "0"),
    *("--data.init_args.batch_size", "4", "--data.init_args.limit_train_samples", "16"),
    *("--checkpoint.monitor", "null", "--checkpoint.save_top_k", "-1", "--checkpoint.every_n_train_steps", "2"),
    *("--model.init_args.lr_scheduler", "null"),
)


class StopAt(Callback):
    """Sends this process SIGTERM as training batch ``batch`` (counted from 0) starts, as a scheduler would."""

    def __init__(self, batch: int) -> None:
        self.batch, self.seen = batch, 0

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if self.seen == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)
        self.seen += 1


def fit(tmp: Path, config: str, *args: str, callbacks=()) -> QlitCLI:
    defaults = {**TRAINER_DEFAULTS, "callbacks": list(callbacks)}
    return QlitCLI(args=cli_args(tmp, "fit", "--config", str(ROOT / config), *SHORT, *args), trainer_defaults=defaults)


def losses(log_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for step, value in scalars(log_dir)["train/loss"]:
        out.setdefault(step, []).append(value)
    return out


@pytest.fixture(scope="module", params=list(BACKENDS))
def whole(request, tmp_path_factory):
    """An uninterrupted 4-step run of the backend's demo: its directory, CLI (module, trainer) and losses."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    cli = fit(tmp, BACKENDS[name][0], "--trainer.max_steps", "4")
    return name, tmp, cli, losses(tmp / "logs")


def run_dir(tmp: Path) -> Path:
    return Path(next((tmp / "logs").rglob("adapter_config.json")).parent.parent)


def test_a_run_stopped_by_sigterm_resumes_on_the_uninterrupted_trajectory(whole, tmp_path):
    name, _, _, expected = whole
    config = BACKENDS[name][0]
    assert sorted(expected) == [0, 1, 2, 3]
    with pytest.raises(SIGTERMException):
        fit(tmp_path, config, "--trainer.max_steps", "4", callbacks=(StopAt(2),))
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    # Lightning stops after the running batch: the checkpoint holds 3 steps.
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    fit(tmp_path, config, "--trainer.max_steps", "4", "--ckpt_path", str(last))
    got = losses(tmp_path / "logs")
    assert sorted(got) == [0, 1, 2, 3]
    for step, values in expected.items():
        assert got[step] == pytest.approx(values, abs=1e-6), (name, step, got, expected)


def test_the_adapter_is_peft_format_records_the_base_and_reloads_with_the_trained_logits(whole):
    from peft import PeftModel

    name, tmp, cli, _ = whole
    adapter = run_dir(tmp) / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "qlit_base.json"} <= {p.name for p in adapter.iterdir()}
    recorded = json.loads((adapter / "qlit_base.json").read_text())
    module = cli.model
    assert recorded["quantization"]["mode"] == module.quantization.mode
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    module.eval()
    with torch.no_grad():
        trained = module.model(input_ids=ids).logits
        base = load_causal_lm(module.pretrained, quantization=module.quantization, dtype=module.dtype_name, device=CPU)
        module.quantization.backend.convert(base, has_adapter=True)
        reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=0, atol=1e-5)


def test_export_merges_within_a_stated_tolerance_or_says_why_not(whole, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    name, tmp, cli, _ = whole
    adapter = run_dir(tmp) / "adapter"
    code = run_main("export", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    refusal = BACKENDS[name][2]
    if refusal is not None:
        assert code != 0 and refusal in capsys.readouterr().err
        assert not (tmp_path / "merged").exists()
        return
    assert code == 0, capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert getattr(merged.config, "quantization_config", None) is None  # a plain transformers model
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    module = cli.model.eval()
    with torch.no_grad():
        delta = (merged(input_ids=ids).logits - module.model(input_ids=ids).logits).abs().max().item()
    # The merge is base + scale·BA added once into the weights the quantized base computes with; what is left is
    # float32 rounding of that sum (a quantized kernel's own arithmetic may round differently, as torchao's int8 does).
    assert delta < 1e-3, (name, delta)


def test_the_callbacks_count_the_stored_weights_and_every_parameter(whole):
    name, tmp, cli, _ = whole
    logged = scalars(run_dir(tmp))
    plain = load_causal_lm(
        cli.model.pretrained.replace("-gptq", ""), quantization=Quantization(), dtype="float32", device=CPU
    )
    plain_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    trainable = sum(p.numel() for p in cli.model.model.parameters() if p.requires_grad)
    # Every weight counted at its logical size: the plain model's parameters plus the adapter's.
    assert logged["params/total"][0][1] == pytest.approx(count_parameters(plain)[1] + trainable)
    assert logged["params/trainable"][0][1] == trainable
    stored = logged["params/weight_gib"][0][1] * 2**30
    adapter_bytes = sum(p.numel() * p.element_size() for p in cli.model.model.parameters() if p.requires_grad)
    if name in FULL_PRECISION_IN_TRAINING:  # the fp32 weights the fake quantizer reads, and the adapter
        assert stored == pytest.approx(plain_bytes + adapter_bytes, rel=1e-3)
    else:  # stored below fp32 (the embeddings and lm_head stay): less than the plain model
        assert 0 < stored < plain_bytes


def test_compare_names_the_technique_and_a_study_offers_it(whole):
    name, tmp, _, _ = whole
    (row,) = table(collect_runs([str(tmp / "logs")]))
    assert row["technique"] == BACKENDS[name][1]
    offered = {
        tuple(sorted(s["set"]["model.init_args.quantization"].items()))
        for s in builtin_strategies().values()
        if s["set"].get("model.init_args.quantization") and s["set"].get("model.init_args.adapter")
    }
    # The mode the demo names (a pre-quantized checkpoint's is `prequantized`: the run records what it found).
    mode = yaml.safe_load((ROOT / BACKENDS[name][0]).read_text())["model"]["init_args"]["quantization"]["mode"]
    assert any(dict(q)["mode"] == mode for q in offered), f"no built-in strategy trains LoRA on {mode}"


def test_qlit_eval_scores_the_adapter(whole, tmp_path, capsys, monkeypatch):
    from test_eval import ROWS

    name, tmp, _, _ = whole
    (tmp_path / "qlit_mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    monkeypatch.chdir(tmp_path)  # where the task's data file is, as a user's folder
    adapter = run_dir(tmp) / "adapter"
    args = ("--adapter", str(adapter), "--tasks", "qlit_mc", "--include_path", str(ROOT / "tests/eval_tasks"))
    code = run_main("eval", *args, "--limit", "4", "--output_path", str(tmp_path / "eval"))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    results = json.loads(next((tmp_path / "eval").rglob("*.json")).read_text())
    assert 0 <= results["results"]["qlit_mc"]["acc,none"] <= 1
