"""Checkpointed decoder layers whose saved input waits in host memory until the backward pass needs it.

Recomputation (activation checkpointing) keeps one tensor per decoder layer alive between the forward and the
backward pass: the layer's input, (tokens × hidden). At long context that is what is left on the GPU — 28 layers of
a 64k-token Qwen2.5-7B row hold 13 GiB of inputs. Unsloth's ``use_gradient_checkpointing="unsloth"`` moves them to
CPU memory; this is the same trade, written for transformers' checkpointed layers
(``GradientCheckpointingLayer._gradient_checkpointing_func``):

- forward: the input is copied to pinned host memory on a side stream, so the copy overlaps the layer's own
  kernels, and the layer runs without keeping its activations (``no_grad``);
- backward: the input comes back (fetched ahead while the layer after it back-propagates), the layer is run again
  with gradients under the forward's RNG and autocast state, and its gradients flow on.

The result is exactly recomputation's: the same kernels on the same values (tested against
``torch.utils.checkpoint`` in fp32 on the CPU, where the "host copy" is a plain copy).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch


class _Saved:
    """One offloaded input: its host copy, the event that ends the copy, and (once fetched) the device copy."""

    __slots__ = ("host", "copied", "device", "fetched", "prev", "used", "requires_grad")

    def __init__(self, host: torch.Tensor, copied: Any, prev: _Saved | None, requires_grad: bool) -> None:
        self.host, self.copied, self.prev, self.requires_grad = host, copied, prev, requires_grad
        self.device: torch.Tensor | None = None
        self.fetched: Any = None
        self.used = False


class Offloader:
    """Moves checkpointed layers' inputs to host memory and back; one per model (its side stream, its last input)."""

    def __init__(self) -> None:
        self._stream: Any = None
        self._last: _Saved | None = None
        #: Bytes of inputs held in host memory now (what the GPU no longer holds).
        self.held_bytes = 0

    def _side(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def put(self, x: torch.Tensor) -> _Saved:
        """Start copying ``x`` to host memory; the device tensor may be freed as soon as the copy ends."""
        prev = self._last if self._last is not None and not self._last.used else None
        if x.device.type != "cuda":
            saved = _Saved(x.detach().clone(), None, prev, x.requires_grad)
        else:
            side, main = self._side(x.device), torch.cuda.current_stream(x.device)
            side.wait_stream(main)  # x is complete
            with torch.cuda.stream(side):
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)  # the caching host allocator reuses it
                host.copy_(x.detach(), non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            x.record_stream(side)  # not reused by the allocator before the copy has read it
            saved = _Saved(host, copied, prev, x.requires_grad)
        self.held_bytes += saved.host.numel() * saved.host.element_size()
        self._last = saved
        return saved

    def _fetch(self, saved: _Saved, device: torch.device) -> None:
        """Copy ``saved`` back to ``device`` on the side stream (ahead of its backward pass)."""
        if saved.device is not None or saved.used or device.type != "cuda":
            return
        side = self._side(device)
        with torch.cuda.stream(side):
            side.wait_event(saved.copied)
            saved.device = saved.host.to(device, non_blocking=True)
            saved.fetched = torch.cuda.Event()
            saved.fetched.record(side)

    def get(self, saved: _Saved, device: torch.device) -> torch.Tensor:
        """The input back on ``device``; starts fetching the previous layer's input, whose backward comes next."""
        if device.type != "cuda":
            x = saved.host
        else:
            self._fetch(saved, device)
            main = torch.cuda.current_stream(device)
            main.wait_event(saved.fetched)
            x = saved.device
            x.record_stream(main)  # allocated on the side stream, used (and freed) on the main one
            if saved.prev is not None:
                self._fetch(saved.prev, device)
        saved.used, saved.device = True, None
        self.held_bytes -= saved.host.numel() * saved.host.element_size()
        if self._last is saved:
            self._last = None
        return x


class _OffloadedLayer(torch.autograd.Function):
    """A decoder layer run without saving its activations; its input kept in host memory for the recomputation."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., Any], offloader: Offloader, x: torch.Tensor, *rest: Any) -> Any:
        ctx.run, ctx.offloader, ctx.rest, ctx.device = run, offloader, rest, x.device
        ctx.autocast = _autocast_state(x.device)
        ctx.rng = _rng_state(x.device)
        ctx.saved = offloader.put(x)
        with torch.no_grad():
            out = run(x, *rest)
        ctx.tuple_out = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        x = ctx.offloader.get(ctx.saved, ctx.device).detach().requires_grad_(ctx.saved.requires_grad)
        device_type, enabled, dtype = ctx.autocast
        with (
            torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else [], device_type=device_type),
            torch.enable_grad(),
            torch.autocast(device_type, dtype=dtype, enabled=enabled),
        ):
            _set_rng_state(ctx.device, ctx.rng)
            out = ctx.run(x, *ctx.rest)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g)
            for o, g in zip(outs, grads, strict=False)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, x.grad if ctx.saved.requires_grad else None, *(None for _ in ctx.rest))


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    kind = device.type
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def offloaded_checkpoint(offloader: Offloader, run: Callable[..., Any], x: torch.Tensor, *rest: Any) -> Any:
    """transformers' ``_gradient_checkpointing_func`` signature: ``run`` is the layer's forward with its keyword
    arguments bound, ``x`` the hidden states."""
    return _OffloadedLayer.apply(run, offloader, x, *rest)


def offload_layers(layers: list[torch.nn.Module], offloader: Offloader) -> int:
    """Checkpoint ``layers`` with their inputs offloaded to host memory; return how many."""
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(offloaded_checkpoint, offloader)
    return len(layers)
