"""CUDA graphs of the decoder layers in training: each layer's forward and backward pass replayed as one graph.

A small model's step is bound by the host, not the GPU: thousands of kernels a step, each launched from Python
through transformers', peft's and autograd's layers, while the GPU waits between them. A CUDA graph records a
layer's kernels once and replays them with one launch, so the host's cost per layer no longer depends on what is
inside it. PyTorch's :func:`torch.cuda.make_graphed_callables` does the recording: every graphed layer becomes one
autograd node whose forward and backward passes are graphs, sharing one memory pool.

A graph replays fixed shapes and fixed memory, so it applies where the step is packed (one row, sample bounds in
``cu_seq_lens``) and every packed step has one shape: :meth:`LayerGraphs.arm` pads a packed batch to a fixed token
count (the token budget, and a token per sample slot) in a fixed number of samples, the padding as extra samples
whose labels are ignored (each attends only to itself, so no real sample's loss or gradient changes). Padding costs
the compute of the missing tokens: under a token budget batches are full but for their last row.

Only layers that are not checkpointed are graphed (a graph keeps its activations; recomputation is the opposite
trade), only in training with gradients, and only on one device without gradient accumulation: a graph's
gradients live in its own buffers, which a second backward pass before the optimizer step would overwrite. Anything
else — validation, generation, a batch longer than the budget — runs the same layers eagerly.

The memory a graph's pool holds counts as allocated: :attr:`LayerGraphs.held_bytes` is what the pool reserves
beyond the tensors the allocator counts (the activations the graphs keep between their forward and backward
replays), and qlit's memory figures add it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from qlit.batch import IGNORE_INDEX
from qlit.errors import QlitError

GraphsChoice = Literal[True, False, "auto"]


def capturing() -> bool:
    """Whether a CUDA graph is being recorded on the current stream: nothing computed now may be cached for later
    use outside the graph, and nothing cached from outside may stand in for a computation the graph must replay."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def recordable(device: torch.device) -> bool:
    """Whether CUDA graphs can be recorded on ``device``."""
    return device.type == "cuda"


def check_graphs(choice: GraphsChoice, compile_layers: bool, checkpointing: Any, attn_implementation: Any) -> None:
    """Refuse, when the config is read, ``cuda_graphs: true`` with settings it cannot apply under (what depends on
    the device, the data and the trainer is checked when training starts)."""
    if not (isinstance(choice, bool) or choice == "auto"):
        raise QlitError(f"model.cuda_graphs must be true, false or auto, got {choice!r}.")
    if choice is not True:
        return
    if compile_layers:
        raise QlitError(
            "model.cuda_graphs: true and model.compile: true both take over the decoder layers: set one of them to "
            "false (or cuda_graphs to auto)."
        )
    if checkpointing is True:
        raise QlitError(
            "model.cuda_graphs: true graphs the decoder layers that are not checkpointed, and "
            "model.gradient_checkpointing: true checkpoints all of them: set gradient_checkpointing to auto or a "
            "number of layers, or cuda_graphs to auto."
        )
    from qlit.models.attention import VARLEN

    if attn_implementation not in ("auto", VARLEN):
        raise QlitError(
            f"model.cuda_graphs: true needs packed batches through the variable-length kernel, which "
            f"model.attn_implementation {attn_implementation!r} does not use: set it to auto, or cuda_graphs to auto."
        )


class _LayerCall(torch.nn.Module):
    """One decoder layer called with the tensors of a packed step as positional arguments, as
    :func:`torch.cuda.make_graphed_callables` takes them; the step's constants (the longest sample) are fixed."""

    def __init__(self, layer: torch.nn.Module, eager: Any, names: tuple[str, ...], constants: dict[str, Any]) -> None:
        super().__init__()
        self.layer = layer
        self.eager = eager
        self.names = names
        self.constants = constants

    def forward(self, hidden: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs = dict(self.constants)
        for name, value in zip(self.names, tensors, strict=True):
            kwargs[name] = value
        cos, sin = kwargs.pop("cos"), kwargs.pop("sin")
        bounds = kwargs.pop("bounds")
        out = self.eager(hidden, position_embeddings=(cos, sin), cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if capturing():
            self.__dict__["_recorded"] = out  # not a submodule's state: released by release_recording()
        return out

    def release_recording(self) -> None:
        """Free the autograd graph of the recorded forward pass (see :meth:`LayerGraphs._make`)."""
        out = self.__dict__.pop("_recorded", None)
        if out is not None and out.grad_fn is not None and not out._is_view():
            out.detach_()  # the graph's static output itself, which make_graphed_callables keeps


class LayerGraphs:
    """The CUDA graphs of a model's non-checkpointed decoder layers (see the module docstring).

    :meth:`arm` prepares each training step's packed batch; the layers' forward then replays their graphs for that
    batch (recording them at the first armed step) and runs eagerly for anything else.

    Args:
        layers: the decoder layers to graph, in the order the model calls them (consecutive).
        tokens: the most tokens a step may hold (the token budget), or ``None`` for the first armed batch's.
        samples: the most samples a step may hold, or ``None`` for the first armed batch's, doubled.
        longest: the longest sample a step may hold, or ``None`` for ``tokens``.
        insist: a model whose layers cannot be recorded is an error (``cuda_graphs: true``); otherwise its layers
            run eagerly, said once.
    """

    def __init__(
        self,
        layers: list[torch.nn.Module],
        tokens: int | None,
        samples: int | None,
        longest: int | None,
        insist: bool = False,
    ) -> None:
        self.layers = layers
        self.insist = insist
        # A padding sample holds at least one token, so the longest the kernel is told of is at least two.
        self.tokens, self.samples = tokens, samples
        self.longest = max(longest, 2) if longest is not None else None
        self.graphed: list[Any] | None = None
        self.armed: torch.Tensor | None = None  # the padded sample bounds of the step being run
        self.failed: str | None = None
        self.input_requires_grad: list[bool] = []  # per layer, as recorded
        self.replays = 0
        #: Bytes the graphs' memory pool holds beyond the allocator's allocated count, once recorded.
        self.held_bytes = 0
        self._spec: tuple[tuple[str, ...], dict[str, Any]] | None = None
        self._shared: tuple[torch.Tensor, ...] = ()  # the recorded inputs every layer shares
        self._loaded: torch.Tensor | None = None  # the armed bounds whose step the shared inputs hold
        for index, layer in enumerate(layers):
            eager = layer.forward
            layer.forward = self._dispatcher(index, layer, eager)  # an instance attribute: nn.Module calls it
            layer.__dict__["_qlit_eager_forward"] = eager

    # ----- the step -------------------------------------------------------------------------------------------------
    def arm(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` (packed: ``input_ids``, ``labels``, ``position_ids``, ``cu_seq_lens``, ``max_length``) padded to
        the graphs' static shape, with the graphs armed for it; unchanged and disarmed where it does not fit.

        The static shape: :attr:`static_tokens` tokens in :attr:`static_samples` samples. After the real samples come
        padding samples, as many as make up the count, each of at least one token (variable-length attention kernels
        have had bugs with empty samples) and at most ``longest`` (the longest sample the kernel is told of), their
        labels ignored."""
        self.armed = None
        if self.failed is not None:
            return batch
        ids, bounds = batch["input_ids"], batch["cu_seq_lens"]
        n_tokens, n_samples, longest = ids.shape[1], bounds.shape[0] - 1, int(batch["max_length"])
        if self.tokens is None:
            self.tokens = n_tokens
        if self.samples is None:
            self.samples = 2 * n_samples
        if self.longest is None:
            self.longest = max(self.tokens, 2)
        if n_tokens > self.tokens or longest > self.longest or n_samples > self.samples:
            return batch  # does not fit the recorded shape: this step runs eagerly
        pad, slots = self.static_tokens - n_tokens, self.static_samples - n_samples
        base, extra = divmod(pad, slots)  # slots of base + 1 tokens for the first `extra`, base for the rest
        device = ids.device
        padded = dict(batch)
        padded["input_ids"] = torch.cat([ids, ids.new_zeros(1, pad)], dim=1)
        padded["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, pad), IGNORE_INDEX)], dim=1)
        padded["position_ids"] = torch.cat([batch["position_ids"], batch["position_ids"].new_zeros(1, pad)], dim=1)
        # Where each padding sample ends, computed on the device from host numbers (no copy that would wait).
        j = torch.arange(1, slots + 1, device=device, dtype=torch.int32)
        ends = n_tokens + base * j + torch.clamp(j, max=extra)
        padded["cu_seq_lens"] = torch.cat([bounds.to(torch.int32), ends])
        padded["max_length"] = self.longest
        self.armed = padded["cu_seq_lens"]
        return padded

    @property
    def padding_samples(self) -> int:
        """Padding samples beyond the real ones' room: enough that any step's padding fits in samples of at most
        ``longest`` tokens."""
        return -(-(self.tokens + self.samples) // (self.longest - 1))

    @property
    def static_samples(self) -> int:
        return self.samples + self.padding_samples

    @property
    def static_tokens(self) -> int:
        # The budget, and room for one token in each sample slot, so that no padding sample is ever empty.
        return self.tokens + self.static_samples

    # ----- the layers -----------------------------------------------------------------------------------------------
    def _dispatcher(self, index: int, layer: torch.nn.Module, eager: Any) -> Any:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if (
                self.armed is not None
                and not args
                and kwargs.get("cu_seq_lens_q") is self.armed
                and layer.training
                and torch.is_grad_enabled()
            ):
                if self.graphed is None and index == 0 and self.failed is None:
                    self._record(hidden_states, kwargs)
                tensors = self._tensors(kwargs) if self.graphed is not None else None
                if tensors is not None and hidden_states.requires_grad == self.input_requires_grad[index]:
                    if index and self._loaded is self.armed:
                        # The first layer's replay copied this step's rotary embeddings and bounds into the inputs
                        # every layer shares: passed as they are, they are not copied again.
                        tensors = self._shared
                    self.replays += 1
                    out = self.graphed[index](hidden_states, *tensors)
                    self._loaded = self.armed if index == 0 else self._loaded
                    return out
            return eager(hidden_states, *args, **kwargs)

        return forward

    def _split(self, kwargs: dict[str, Any]) -> tuple[tuple[str, ...], list[torch.Tensor], dict[str, Any]] | None:
        """The armed call's keyword arguments as graph inputs (names, tensors) and constants, or ``None`` for a call
        a graph cannot take (a mask, a cache)."""
        names, tensors, constants = [], [], {}
        for key, value in kwargs.items():
            if key in ("cu_seq_lens_q", "cu_seq_lens_k"):
                continue
            if key == "position_embeddings":
                if not (isinstance(value, tuple) and len(value) == 2):
                    return None
                names += ["cos", "sin"]
                tensors += list(value)
            elif isinstance(value, torch.Tensor):
                if key == "attention_mask":
                    return None
                names.append(key)
                tensors.append(value)
            elif key == "past_key_values" and value is not None:
                return None
            else:
                constants[key] = value
        if "cos" not in names:
            return None
        names.append("bounds")
        tensors.append(kwargs["cu_seq_lens_q"])
        return tuple(names), tensors, constants

    def _tensors(self, kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
        split = self._split(kwargs)
        if split is None or self._spec is None or split[0] != self._spec[0] or split[2] != self._spec[1]:
            return None
        return split[1]

    def _record(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        split = self._split(kwargs)
        if split is None:
            return self._give_up("its decoder layers are called with a mask or a cache, or without rotary embeddings")
        try:
            self._make(hidden, *split)
        except (RuntimeError, AssertionError) as err:  # an operation that CUDA graphs cannot record (a host sync)
            self.graphed = None
            torch.cuda.synchronize()
            self._give_up(f"recording its decoder layers failed ({str(err).splitlines()[0][:160]})")

    def _give_up(self, why: str) -> None:
        self.failed = why
        if self.insist:
            raise QlitError(
                f"model.cuda_graphs: true cannot graph this model: {why}. Set cuda_graphs to auto or false."
            )
        rank_zero_info(f"CUDA graphs off for this run: {why}; its layers run eagerly.")

    def _make(
        self, hidden: torch.Tensor, names: tuple[str, ...], tensors: list[torch.Tensor], constants: dict[str, Any]
    ) -> None:
        self._spec = (names, constants)
        calls = tuple(
            _LayerCall(layer, layer.__dict__["_qlit_eager_forward"], names, constants) for layer in self.layers
        )
        shared = tuple(t.detach().clone() for t in tensors)  # read-only inputs: one static copy serves every layer
        self._shared = shared
        # A layer's input needs a gradient where the first one's does or an earlier layer trains (a graph's inputs
        # must need gradients as the real ones will).
        samples, needs = [], hidden.requires_grad
        for layer in self.layers:
            self.input_requires_grad.append(needs)
            samples.append((hidden.detach().clone().requires_grad_(needs), *shared))
            needs = needs or any(p.requires_grad for p in layer.parameters())
        dtype = torch.get_autocast_dtype("cuda")
        pool = torch.cuda.graph_pool_handle()
        # make_graphed_callables records under autocast only without its cast cache (a cached cast made while
        # recording would be read outside the graph, or a cast made before it stand in for one the graph must redo).
        with torch.autocast("cuda", dtype=dtype, enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
            _warm_up(calls, samples)
            graphed = torch.cuda.make_graphed_callables(
                calls, tuple(samples), num_warmup_iters=0, allow_unused_input=True, pool=pool
            )
        # The trainable parameters' gradient accumulators are made, once, by the first forward pass that uses them,
        # on the stream it runs on, and each backward pass through an accumulator made on another stream than its
        # own is ordered with an event and warned about (AccumulateGrad's stream mismatch). The recording makes
        # them on its stream, and the recorded forward passes' autograd graphs (which no replay uses: each graphed
        # layer is one autograd node of its own) would keep them for every later step: released, the first replay
        # makes them anew on the training stream. Accumulators made before recording, on the training stream, would
        # fail the recording instead: that is the legacy default stream, and a recorded backward pass that reaches
        # one is refused ("operation would make the legacy stream depend on a capturing blocking stream").
        for call in calls:
            call.release_recording()
        self.graphed = list(graphed)
        self.held_bytes = _pool_idle_bytes(pool)


def _warm_up(calls: tuple[_LayerCall, ...], samples: list[tuple[torch.Tensor, ...]], iterations: int = 2) -> None:
    """Run each layer's forward and backward pass on a side stream before recording, so that lazy set-up (cuBLAS
    handles and workspaces, kernel selection, the allocator's first blocks) happens outside the graphs.

    make_graphed_callables' own warm-up does the same, but keeps the autograd graph of its last layer's last pass
    alive while it records: that layer's gradient accumulators, made on the warm-up stream, then meet the recording
    stream's gradients, with AccumulateGrad's stream-mismatch warning. Here each pass is dropped before the next.
    """
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        for call, args in zip(calls, samples, strict=True):
            inputs = tuple(t for t in (*args, *call.parameters()) if t.requires_grad)
            for _ in range(iterations):
                out = call(*args)
                if out.requires_grad:
                    torch.autograd.grad(out, inputs, grad_outputs=torch.empty_like(out), allow_unused=True)
                del out
    torch.cuda.synchronize()


def _pool_idle_bytes(pool: Any) -> int:
    """Bytes of ``pool``'s segments that no live tensor occupies (kept for the graphs' replays)."""
    idle = 0
    for segment in torch.cuda.memory_snapshot():
        if tuple(segment.get("segment_pool_id", ())) == tuple(pool):
            idle += segment["total_size"] - segment["allocated_size"]
    return idle


def graphable_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers that would be graphed: those not checkpointed, when they are the last ones."""
    from qlit.models.layers import decoder_layers

    layers = decoder_layers(model)
    kept = [layer for layer in layers if not getattr(layer, "gradient_checkpointing", False)]
    if kept and kept != layers[len(layers) - len(kept) :]:
        return []  # checkpointed layers between graphed ones: not a plan this module makes
    return kept
