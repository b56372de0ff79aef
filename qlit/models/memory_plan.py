"""``model.memory_budget``: what each decoder layer does with its activations, planned to a budget of GPU memory.

Every decoder layer is one of three things between its forward and backward pass:

- **kept**: its activations stay on the GPU (fastest; the most memory; replayed as a CUDA graph where graphs apply);
- **recomputed**: only its input stays, and the layer runs again in the backward pass (~a third more compute);
- **offloaded**: recomputed, with its input in pinned host memory as well (:mod:`qlit.models.offload`).

The costs are measured on the model itself at the start of training, not taken from a table: one forward and
backward pass of a small packed batch at two lengths, every layer kept, gives per layer the bytes its activations
hold (a fixed part and a part per token), the bytes of one layer's input, and the transient peak of the backward
pass (the loss head and one layer's gradients). On CUDA these are the allocator's own numbers; on the CPU, where
there is no allocator count, the bytes autograd saves. The plan then keeps as many layers as the budget pays for,
recomputes the rest, and offloads inputs only when recomputation alone does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qlit.errors import QlitError

GIB = 2**30

#: Optimizer state bytes per trainable element planned for (AdamW's two fp32 moments); 8-bit optimizers use less,
#: so the plan errs on the side of the budget.
OPTIMIZER_BYTES = 8


def check_budget(value: Any) -> None:
    """Refuse, when the config is read, a budget that is neither ``auto``, a positive number of GiB nor a percentage."""
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or _percent(value) is not None):
        raise QlitError(
            f"model.memory_budget must be auto, a number of GiB (14) or a share of the GPU ('50%'), got {value!r}."
        )
    if isinstance(value, (int, float)) and not value > 0:
        raise QlitError(f"model.memory_budget must be above 0 GiB, got {value!r}.")


def _percent(value: Any) -> float | None:
    if not isinstance(value, str) or not value.strip().endswith("%"):
        return None
    try:
        share = float(value.strip()[:-1]) / 100
    except ValueError:
        return None
    if not 0 < share <= 1:
        raise QlitError(f"model.memory_budget as a share of the GPU must be above 0% and at most 100%, got {value!r}.")
    return share


def budget_bytes(value: Any, device: torch.device) -> int | None:
    """The budget in bytes on ``device`` (``None`` for ``auto``)."""
    if value is None or value == "auto":
        return None
    share = _percent(value)
    if share is None:
        return int(float(value) * GIB)
    if device.type != "cuda":
        raise QlitError(
            f"model.memory_budget {value!r} is a share of a GPU's memory, and this run is on the {device.type}: give a "
            "number of GiB instead."
        )
    return int(share * torch.cuda.get_device_properties(device).total_memory)


@dataclass(frozen=True)
class LayerCosts:
    """Bytes measured on the model: ``kept_fixed + kept_per_token × tokens`` per kept layer, ``input_per_token`` per
    recomputed layer, ``work_fixed + work_per_token × tokens`` on top at the peak of the backward pass."""

    kept_fixed: float
    kept_per_token: float
    input_per_token: float
    work_fixed: float
    work_per_token: float


@dataclass(frozen=True)
class MemoryPlan:
    """How many decoder layers are kept, recomputed and offloaded, and the peak that is expected of it."""

    budget: int
    layers: int
    kept: int
    recomputed: int
    offloaded: int
    estimate: int

    @property
    def fits(self) -> bool:
        return self.estimate <= self.budget

    def line(self) -> str:
        text = (
            f"Memory plan for {_gib(self.budget)} GiB: {self.kept} of {self.layers} layers kept, "
            f"{self.recomputed + self.offloaded} recomputed, activations of {self.offloaded} offloaded "
            f"(estimated peak {_gib(self.estimate)} GiB)"
        )
        if not self.fits:
            text += "; the budget is below what the smallest plan needs: lower data.max_tokens or raise the budget"
        return text + "."


def _gib(n: float) -> str:
    return f"{n / GIB:.3g}"


def estimate(
    costs: LayerCosts, static: int, tokens: int, layers: int, kept: int, on_gpu: int, graph_per_token: float = 0.0
) -> int:
    """Expected peak bytes of a plan with ``kept`` layers kept and ``on_gpu`` recomputed with their input on the GPU
    (the other ``layers - kept - on_gpu`` offloaded): what the model and optimizer hold, the kept layers' activations
    (and graph buffers), the recomputed layers' inputs, and the backward pass's transient — with one layer's
    activations made again on top of it where any layer is recomputed."""
    per_token = kept * (costs.kept_per_token + graph_per_token) + on_gpu * costs.input_per_token
    fixed = kept * costs.kept_fixed + costs.work_fixed
    per_token += costs.work_per_token
    if kept < layers:
        per_token += costs.kept_per_token
        fixed += costs.kept_fixed
    return int(static + tokens * per_token + fixed)


def plan(
    budget: int, static: int, tokens: int, layers: int, costs: LayerCosts, graph_per_token: float = 0.0
) -> MemoryPlan:
    """Keep as many layers as fit, recompute the others, offload recomputed inputs only where needed."""
    for kept in range(layers, -1, -1):
        peak = estimate(costs, static, tokens, layers, kept, layers - kept, graph_per_token)
        if peak <= budget:
            return MemoryPlan(budget, layers, kept, layers - kept, 0, peak)
    for offloaded in range(1, layers + 1):
        peak = estimate(costs, static, tokens, layers, 0, layers - offloaded, graph_per_token)
        if peak <= budget or offloaded == layers:
            return MemoryPlan(budget, layers, 0, layers - offloaded, offloaded, peak)
    raise AssertionError("unreachable")


def static_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """What training holds whatever the plan: the weights (as allocated now), the trainable parameters' gradients
    and the optimizer's state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    states = OPTIMIZER_BYTES * sum(p.numel() for p in trainable)
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device)
    else:
        held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return held + grads + states


def measure(
    model: torch.nn.Module,
    layers: list[torch.nn.Module],
    step: Callable[[int], torch.Tensor],
    lengths: tuple[int, int] = (128, 256),
) -> LayerCosts:
    """Measure :class:`LayerCosts` by running ``step(tokens)`` (a forward pass of a packed batch of that many tokens,
    returning the loss) at two lengths with every layer kept, then its backward pass; gradients are cleared after."""
    device = next(model.parameters()).device
    flags = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        points = [_measure_once(model, layers, step, n, device) for n in lengths]
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.gradient_checkpointing = flag
        for p in model.parameters():
            p.grad = None
    (n1, kept1, input1, work1), (n2, kept2, input2, work2) = points
    slope = lambda a, b: max(0.0, (b - a) / (n2 - n1))  # noqa: E731
    kept_pt, work_pt = slope(kept1, kept2), slope(work1, work2)
    return LayerCosts(
        kept_fixed=max(0.0, kept1 - kept_pt * n1),
        kept_per_token=kept_pt,
        input_per_token=max(input1 / n1, input2 / n2),
        work_fixed=max(0.0, work1 - work_pt * n1),
        work_per_token=work_pt,
    )


def _measure_once(
    model: torch.nn.Module, layers: list[torch.nn.Module], step: Callable[[int], torch.Tensor], tokens: int, device: Any
) -> tuple[int, float, float, float]:
    """(tokens, median bytes a kept layer holds, bytes of a layer's input, backward transient above the forward)."""
    cuda = device.type == "cuda"
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    per_layer: list[float] = []
    inputs: list[float] = []
    state: dict[str, Any] = {"saved": None}

    def pack(t: torch.Tensor) -> torch.Tensor:
        bucket = state["saved"]
        if bucket is not None and t.untyped_storage().data_ptr() not in params:
            bucket.setdefault((t.untyped_storage().data_ptr(), t.device), t.untyped_storage().nbytes())
        return t

    def before(module: Any, args: Any, kwargs: Any) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        inputs.append(float(x.numel() * x.element_size()))
        state["saved"], state["start"] = {}, torch.cuda.memory_allocated(device) if cuda else 0

    def after(module: Any, args: Any, kwargs: Any, out: Any) -> None:
        saved = state["saved"] or {}
        held = torch.cuda.memory_allocated(device) - state["start"] if cuda else sum(saved.values())
        per_layer.append(float(held))
        state["saved"] = head  # after the last layer: the final norm and the loss

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in layers]
    handles += [layer.register_forward_hook(after, with_kwargs=True) for layer in layers]
    head: dict[tuple[int, Any], int] = {}
    try:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            state["saved"] = head  # what the embedding, the final norm and the loss save outside the layers
            loss = step(tokens)
            state["saved"] = None
        forward = (torch.cuda.memory_allocated(device) - base) if cuda else sum(per_layer) + sum(head.values())
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
            work = torch.cuda.max_memory_allocated(device) - base - forward
        else:  # one layer's activations and its gradients, on top of the loss head's saved tensors
            work = sum(head.values()) + _median(per_layer) + 2 * _median(inputs)
    finally:
        for handle in handles:
            handle.remove()
    del loss
    return tokens, _median(per_layer), _median(inputs), float(max(work, 0))


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
