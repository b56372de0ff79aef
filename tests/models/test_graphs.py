"""CUDA graphs of the decoder layers: the padding to a fixed shape changes no loss or gradient, and an explicit request
that cannot apply is refused in one sentence. (Recording and replaying the graphs needs CUDA: tests/test_gpu.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT

from qlit.batch import IGNORE_INDEX
from qlit.data.batching import PackingCollator
from qlit.errors import QlitError
from qlit.models.graphs import LayerGraphs


def _rows(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((7, 3), (12, 5), (5, 2)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "prompt_length": prompt})
    return rows


def test_a_packed_batch_padded_to_the_graphs_shape_has_the_same_loss_and_gradients() -> None:
    from peft import LoraConfig

    from qlit.module import QLitModule

    torch.manual_seed(0)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        dtype="float32",
        adapter=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        cuda_graphs=False,
    )
    module.configure_model()
    batch = PackingCollator()(_rows(module.model.config.vocab_size))  # 24 tokens, 3 samples, the longest 12
    graphs = LayerGraphs([], tokens=40, samples=6, longest=16)
    padded = graphs.arm(batch)
    assert padded["input_ids"].shape == padded["labels"].shape == padded["position_ids"].shape == (1, 40)
    # The three samples, one padding sample of 16 tokens, then two empty ones: a fixed count of bounds.
    assert padded["cu_seq_lens"].tolist() == [0, 7, 19, 24, 40, 40, 40]
    assert padded["labels"][0, 24:].eq(IGNORE_INDEX).all() and padded["max_length"] == 16
    assert graphs.armed is padded["cu_seq_lens"]

    trainable = [p for p in module.parameters() if p.requires_grad]
    losses, grads = [], []
    for b in (batch, padded):
        loss = module(b).loss  # transformers' mean over the learned tokens, through the per-sample mask on the CPU
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, trainable))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[1], grads[0], strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_a_batch_that_does_not_fit_the_graphs_shape_runs_as_it_is() -> None:
    batch = PackingCollator()(_rows(100))  # 24 tokens, 3 samples, the longest 12
    for tokens, samples, longest in ((20, 8, 16), (40, 3, 16), (40, 8, 10)):
        graphs = LayerGraphs([], tokens=tokens, samples=samples, longest=longest)
        assert graphs.arm(batch) is batch and graphs.armed is None, (tokens, samples, longest)
    # Exactly full: no padding sample, only empty ones.
    graphs = LayerGraphs([], tokens=24, samples=4, longest=12)
    assert graphs.arm(batch)["cu_seq_lens"].tolist() == [0, 7, 19, 24, 24]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(compile=True), "model.cuda_graphs: true and model.compile: true both take over the decoder layers"),
        (dict(gradient_checkpointing=True), "model.gradient_checkpointing: true checkpoints all of them"),
        (dict(attn_implementation="sdpa"), "model.attn_implementation 'sdpa' does not use"),
        (dict(cuda_graphs="yes"), "model.cuda_graphs must be true, false or auto, got 'yes'."),
    ],
)
def test_an_explicit_request_for_graphs_that_cannot_apply_is_refused_when_read(kwargs, message) -> None:
    from qlit.module import QLitModule

    with pytest.raises(QlitError, match=message):
        QLitModule(**{"cuda_graphs": True, **kwargs})


def test_graphs_asked_for_on_the_cpu_are_one_sentence_and_the_default_trains_without_them(tmp_path, capsys) -> None:
    from helpers import run_cli, run_main

    from qlit.cli import main  # noqa: F401 (the command the user runs)

    args = ["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.max_steps", "2"]
    args += ["--trainer.limit_val_batches", "0", "--data.init_args.packing", "true"]
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.default_root_dir", str(tmp_path)]
    code = run_main(*args, *logs, "--model.init_args.cuda_graphs", "true")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlit: error:")]
    assert code != 0 and len(err) == 1, err
    assert "model.cuda_graphs: true needs a CUDA device" in err[0], err
    assert not list((tmp_path / "logs").rglob("config.yaml"))  # the refused run left no run directory behind

    cli = run_cli(tmp_path / "auto", *args)
    assert cli.trainer.global_step == 2 and cli.model.graphs is None
