"""CUDA graphs of the decoder layers: the padding to a fixed shape changes no loss or gradient, and an explicit request
that cannot apply is refused in one sentence. (Recording and replaying the graphs needs CUDA: tests/test_gpu.py.)"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import ROOT, packable_rows

from qlit.batch import IGNORE_INDEX
from qlit.data.batching import PackingCollator
from qlit.errors import QlitError
from qlit.models.graphs import LayerGraphs


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
    batch = PackingCollator()(packable_rows(module.model.config.vocab_size))  # 24 tokens, 3 samples, the longest 12
    graphs = LayerGraphs([], tokens=30, samples=4, longest=16)
    # Room for 4 real samples and 3 padding samples of at most 16 tokens (30 + 4 tokens over 15 per sample), and a
    # token for each of the 7 sample slots: 37 tokens.
    assert (graphs.static_samples, graphs.static_tokens) == (7, 37)
    padded = graphs.arm(batch)
    assert padded["input_ids"].shape == padded["labels"].shape == padded["position_ids"].shape == (1, 37)
    # The three samples, then 13 tokens of padding in 4 samples, none empty and none longer than 16.
    assert padded["cu_seq_lens"].tolist() == [0, 7, 19, 24, 28, 31, 34, 37]
    assert padded["cu_seq_lens"].dtype == torch.int32
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
    batch = PackingCollator()(packable_rows(100))  # 24 tokens, 3 samples, the longest 12
    for tokens, samples, longest in ((20, 8, 16), (40, 2, 16), (40, 8, 10)):
        graphs = LayerGraphs([], tokens=tokens, samples=samples, longest=longest)
        assert graphs.arm(batch) is batch and graphs.armed is None, (tokens, samples, longest)
    # The budget exactly full, and the longest sample as long as allowed: padding only in the samples' slots, each
    # of them between one token and the longest.
    graphs = LayerGraphs([], tokens=24, samples=3, longest=12)
    bounds = graphs.arm(batch)["cu_seq_lens"]
    sizes = (bounds[1:] - bounds[:-1]).tolist()
    assert sizes == [7, 12, 5, 2, 2, 2] and bounds[-1] == graphs.static_tokens == 30


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


def test_graphs_asked_for_on_the_cpu_are_one_sentence_and_auto_trains_without_them(tmp_path, capsys) -> None:
    from helpers import run_cli, run_main

    args = ["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.max_steps", "2"]
    args += ["--trainer.limit_val_batches", "0", "--data.init_args.packing", "true"]
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.default_root_dir", str(tmp_path)]
    code = run_main(*args, *logs, "--model.init_args.cuda_graphs", "true")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlit: error:")]
    assert code != 0 and len(err) == 1, err
    assert "model.cuda_graphs: true needs a CUDA device" in err[0], err
    assert not list((tmp_path / "logs").rglob("config.yaml"))  # the refused run left no run directory behind

    cli = run_cli(tmp_path / "auto", *args, "--model.init_args.cuda_graphs", "auto")
    assert cli.trainer.global_step == 2 and cli.model.graphs is None  # auto: quietly off without CUDA


def _replaying_recorder(callables, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None):
    """:func:`torch.cuda.make_graphed_callables` without CUDA: each callable runs eagerly at every call, but on the
    fixed input tensors it was recorded with, into fixed output and gradient tensors that every call reuses and hands
    out, as a graph's replays do. What it checks is qlit's side: which calls replay, on what, and what comes back."""
    return tuple(
        _replayed(func, args, tuple(func.parameters())) for func, args in zip(callables, sample_args, strict=True)
    )


def _replayed(func, static_inputs, params):
    state: dict = {}
    surface = (*static_inputs, *params)

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            for static, given in zip(static_inputs, inputs, strict=False):
                if static.data_ptr() != given.data_ptr():
                    static.copy_(given)
            with torch.enable_grad():
                state["out"] = func(*static_inputs)
            state.setdefault("static_out", torch.empty_like(state["out"])).copy_(state["out"].detach())
            return state["static_out"].detach()

        @staticmethod
        def backward(ctx, grad):
            wanted = [t for t in surface if t.requires_grad]
            grads = torch.autograd.grad(state.pop("out"), wanted, grad, allow_unused=True)
            buffers = state.setdefault("grads", [torch.empty_like(t) for t in wanted])
            for buffer, g in zip(buffers, grads, strict=True):
                buffer.copy_(g if g is not None else torch.zeros_like(buffer))
            handed = iter(buffers)
            return tuple(next(handed).detach() if t.requires_grad else None for t in surface)

    return lambda *user_args: Replay.apply(*user_args, *params)


@pytest.fixture
def emulated(monkeypatch):
    """The CUDA-only pieces of recording replaced: :func:`_replaying_recorder` for the recording, no pool."""
    from qlit.models import graphs

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _replaying_recorder)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    # The warm-up before recording runs for real, on the CPU's one stream.
    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(graphs, "_pool_idle_bytes", lambda pool: 0)
    return monkeypatch


def _tiny(checkpointed: int = 0, attn: str | None = None):
    """The tiny Qwen2 with LoRA in fp32, packed rows through the per-sample mask the variable-length path builds on
    the CPU from the sample bounds (or ``attn``), in training mode; the same weights every call."""
    from peft import LoraConfig

    from qlit.models import attention
    from qlit.module import QLitModule

    torch.manual_seed(0)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        dtype="float32",
        attn_implementation=attn or attention.VARLEN,
        adapter=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        gradient_checkpointing=checkpointed,  # recomputed layers are not graphed
    )
    module.configure_model()
    return module.train()


def _step(module, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One SGD step: the loss and the adapter gradients it took."""
    loss = module(batch).loss
    loss.backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in trainable]
    with torch.no_grad():
        for p in trainable:
            p -= 0.1 * p.grad
            p.grad = None
    return loss.detach(), grads


def _same_training(eager, other, batches) -> None:
    for step, batch in enumerate(batches):
        (loss_e, grads_e), (loss_o, grads_o) = _step(eager, batch), _step(other, batch)
        torch.testing.assert_close(loss_o, loss_e, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_o, grads_e, strict=True):
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-8, step


@pytest.mark.parametrize("checkpointed", [0, 1])
def test_layers_replayed_from_fixed_buffers_train_like_eager_ones(emulated, checkpointed: int) -> None:
    """Three SGD steps of the tiny Qwen2 with LoRA, on packed batches of different sizes, eager against its layers
    going through :class:`LayerGraphs` (the recorder emulated on the CPU): the same losses and adapter gradients,
    every graphed layer replayed at every step, and a batch larger than the recorded shape run eagerly. With the
    first layer checkpointed the graphed one's input needs a gradient; without, the first graphed layer's does not."""
    from qlit.models.graphs import graphable_layers

    eager, replayed = _tiny(checkpointed), _tiny(checkpointed)
    layers = graphable_layers(replayed.model)
    assert layers == list(replayed.model.base_model.model.model.layers)[checkpointed:]
    replayed.graphs = LayerGraphs(layers, tokens=40, samples=6, longest=16)
    rows = packable_rows(eager.model.config.vocab_size)
    # 24 tokens, then 19, then 48 (more than the recorded 40: eager)
    _same_training(eager, replayed, [PackingCollator()(rows), PackingCollator()(rows[:2]), PackingCollator()(rows * 2)])
    # The two batches within the recorded shape, each layer once; the third eagerly.
    assert replayed.graphs.replays == 2 * len(layers)


def test_layers_that_cannot_be_recorded_run_eagerly_or_are_refused_when_insisted_on(emulated, caplog) -> None:
    """A model whose layers take a mask (SDPA builds one for a packed row) or whose recording fails (an operation a
    graph cannot hold) trains eagerly, said once; with ``cuda_graphs: true`` it is one sentence instead."""
    import logging

    from qlit.models.graphs import graphable_layers

    rows = packable_rows(100)
    batches = [PackingCollator()(rows), PackingCollator()(rows[:2])]
    masked = _tiny(attn="sdpa")
    masked.graphs = LayerGraphs(graphable_layers(masked.model), tokens=40, samples=6, longest=16)
    with caplog.at_level(logging.INFO):
        _same_training(_tiny(attn="sdpa"), masked, batches)
    assert masked.graphs.replays == 0 and "a mask or a cache" in masked.graphs.failed
    said = [r.getMessage() for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    assert len(said) == 1, said

    def failing(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    emulated.setattr(torch.cuda, "make_graphed_callables", failing)
    broken = _tiny()
    broken.graphs = LayerGraphs(graphable_layers(broken.model), tokens=40, samples=6, longest=16)
    _same_training(_tiny(), broken, batches)
    assert broken.graphs.replays == 0 and broken.graphs.graphed is None
    assert (
        broken.graphs.failed == "recording its decoder layers failed (operation not permitted when stream is capturing)"
    )

    insisted = _tiny()
    insisted.graphs = LayerGraphs(graphable_layers(insisted.model), tokens=40, samples=6, longest=16, insist=True)
    with pytest.raises(QlitError, match=r"^model.cuda_graphs: true cannot graph this model: recording its decoder"):
        insisted(batches[0])


def test_auto_on_a_gpu_says_why_a_run_trains_without_graphs(emulated, tmp_path, caplog) -> None:
    """``auto`` is the default: on a CUDA device (the check passed on the CPU) a run the graphs cannot apply to
    (here gradient accumulation) trains eagerly and says which requirement it misses, once."""
    import logging

    from helpers import run_cli

    from qlit import module as qlit_module

    emulated.setattr(qlit_module, "recordable", lambda device: True)
    args = ["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.max_steps", "2"]
    args += ["--trainer.limit_val_batches", "0", "--data.init_args.packing", "true"]
    args += [
        "--model.init_args.attn_implementation",
        "qlit_varlen",
        "--model.init_args.gradient_checkpointing",
        "false",
    ]
    with caplog.at_level(logging.INFO):
        cli = run_cli(tmp_path, *args, "--trainer.accumulate_grad_batches", "2")
    assert cli.trainer.global_step == 2 and cli.model.graphs is None
    said = [r.getMessage() for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    assert said == [
        "CUDA graphs off for this run (they need no gradient accumulation (trainer.accumulate_grad_batches: 1)); its "
        "layers run eagerly."
    ], said


def test_every_step_of_a_real_run_replays_every_layer_and_trains_like_eager(emulated, tmp_path) -> None:
    """The whole path as ``qlit fit`` runs it (the recorder emulated, the device check passed on the CPU): the demo's
    4-bit QLoRA on packed SST-2 batches for 12 steps, over two epochs (the second reshuffled). The static shape
    planned from the token budget and the first epoch's batches holds every step, so each layer replays at each
    step, and the losses are eager training's."""
    from helpers import run_cli, scalars

    from qlit import module as qlit_module

    emulated.setattr(qlit_module, "recordable", lambda device: True)
    args = ["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.max_steps", "12"]
    args += ["--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1", "--data.init_args.packing", "true"]
    args += [
        "--model.init_args.attn_implementation",
        "qlit_varlen",
        "--model.init_args.gradient_checkpointing",
        "false",
    ]
    curves = {}
    for choice in ("false", "true"):
        cli = run_cli(tmp_path / choice, *args, "--model.init_args.cuda_graphs", choice)
        curves[choice] = [v for _, v in sorted(scalars(cli.trainer.log_dir)["train/loss"])]
        assert cli.trainer.current_epoch >= 1  # the run reached a reshuffled epoch
    graphs = cli.model.graphs
    assert graphs is not None and graphs.failed is None
    assert len(graphs.layers) == cli.model.model.config.num_hidden_layers
    assert graphs.replays == 12 * len(graphs.layers), graphs.replays
    assert len(curves["true"]) == 12
    torch.testing.assert_close(curves["true"], curves["false"], rtol=1e-4, atol=1e-5)
