"""GPU memory (allocated, reserved, per-epoch peaks) per device during training, the largest over the devices; the
process's peak RSS where there is no GPU; and the bytes each rank holds of the parameters, gradients and optimizer
state, which show how a sharded run splits them."""

from __future__ import annotations

import resource
import sys

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from qlit.callbacks._common import GIB, log_to_loggers, optimizer_step_done
from qlit.metrics import MetricSpec

#: The metrics of :func:`state_bytes`: what a rank holds of the parameters, their gradients and the optimizer state.
STATE_METRICS = ("memory/params_gib", "memory/grads_gib", "memory/optimizer_gib")


def _local_bytes(tensor: torch.Tensor) -> int:
    """The bytes this process holds of ``tensor``: its own shard where it is sharded (a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def state_bytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """The bytes this process holds of ``module``'s parameters (packed weights at their stored size), of their
    gradients, and of ``optimizers``' state, by the names of :data:`STATE_METRICS`."""
    params = list(module.parameters())
    optimizer_tensors = [
        value
        for optimizer in optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    return {
        "memory/params_gib": sum(_local_bytes(p) for p in params),
        "memory/grads_gib": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "memory/optimizer_gib": sum(_local_bytes(t) for t in optimizer_tensors),
    }


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


class GPUMemoryMonitor(Callback):
    """Log GPU memory per device every N optimizer steps and at each training epoch's end.

    ``gpu/allocated_gib`` and ``gpu/reserved_gib`` are the memory in use by tensors and held by PyTorch's caching
    allocator now; ``gpu/peak_allocated_gib`` and ``gpu/peak_reserved_gib`` their peaks since the current training
    epoch began (the peak counters are reset at each epoch start, so the value logged at an epoch's end is that
    epoch's peak, validation included). The numbers come from the allocator's own counters, which cost no device
    synchronisation. Without CUDA the process's peak resident memory is logged instead (``cpu/peak_rss_gib``, since
    the process started), which one info line says at set-up.

    ``memory/params_gib``, ``memory/grads_gib`` and ``memory/optimizer_gib`` are the bytes this rank holds of the
    parameters (packed weights at their stored size; bitsandbytes' 4-bit quantization constants, which are no
    parameters, are not counted), of their gradients and of the optimizer state: a sharded run's are its shards
    (``1/N`` each on ``N`` ranks), which one info line per fit says for every rank (:attr:`rank_bytes`).

    Every value is one device's (one process's) own, never a sum: under several processes each rank reads its own
    device and the largest value over the ranks is logged (one ``all_reduce`` per log), the memory the fullest device
    needs, which is what decides whether a run fits.

    Args:
        log_every_n_steps: Log every this many optimizer steps; ``None`` follows the trainer's ``log_every_n_steps``.
    """

    metric_specs = (
        MetricSpec("gpu/allocated_gib", "GiB", higher_is_better=False, aggregate=None),
        MetricSpec("gpu/reserved_gib", "GiB", higher_is_better=False, aggregate=None),
        MetricSpec("gpu/peak_allocated_gib", "GiB", higher_is_better=False, aggregate=None, study=True),
        MetricSpec("gpu/peak_reserved_gib", "GiB", higher_is_better=False, aggregate=None),
        MetricSpec("cpu/peak_rss_gib", "GiB", higher_is_better=False, aggregate=None, study=True),
        # The comparison's one memory column: GPU-allocated and CPU-RSS peaks are different quantities, so a
        # "peak_memory_of" column says which each run's is.
        MetricSpec(
            "peak_memory_gib",
            "GiB",
            higher_is_better=False,
            aggregate="max",
            sources=(("gpu/peak_allocated_gib", "gpu allocated"), ("cpu/peak_rss_gib", "cpu rss")),
            source_column="peak_memory_of",
        ),
        *(MetricSpec(name, "GiB", higher_is_better=False, aggregate=None) for name in STATE_METRICS),
    )

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be at least 1, got {log_every_n_steps}.")
        self.log_every_n_steps = log_every_n_steps
        self._device: torch.device | None = None
        self._every = 1
        self._last_step = 0
        self._said_cpu = False
        self._said_ranks = False
        #: Each rank's :func:`state_bytes` at the latest log, in rank order (on every rank).
        self.rank_bytes: list[dict[str, int]] = []

    @property
    def _cuda(self) -> bool:
        return self._device is not None and self._device.type == "cuda"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device
        self._every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if not self._cuda and not self._said_cpu:
            self._said_cpu = True
            rank_zero_info(
                f"GPUMemoryMonitor: no CUDA device ({self._device}); logging the process's peak resident memory "
                "(cpu/peak_rss_gib) instead of GPU memory."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        self._said_ranks = False

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self._device)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if not optimizer_step_done(trainer, self._last_step):
            return  # mid gradient accumulation
        self._last_step = trainer.global_step
        if trainer.global_step % self._every == 0:
            self._log(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer)

    def read(self, held_bytes: int = 0) -> dict[str, float]:
        """The memory metrics now, in GiB; ``held_bytes`` is memory that CUDA graphs hold outside the allocated
        count (``QLitModule.graph_held_bytes``)."""
        if not self._cuda:
            return {"cpu/peak_rss_gib": peak_rss_bytes() / GIB}
        # One snapshot of the allocator's counters (host-side bookkeeping: no sync) rather than four calls.
        stats = torch.cuda.memory_stats(self._device)
        return {
            "gpu/allocated_gib": (stats.get("allocated_bytes.all.current", 0) + held_bytes) / GIB,
            "gpu/reserved_gib": stats.get("reserved_bytes.all.current", 0) / GIB,
            "gpu/peak_allocated_gib": (stats.get("allocated_bytes.all.peak", 0) + held_bytes) / GIB,
            "gpu/peak_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / GIB,
        }

    def _log(self, trainer: Trainer) -> None:
        held = getattr(trainer.lightning_module, "graph_held_bytes", 0)
        own = state_bytes(trainer.lightning_module, trainer.optimizers)
        self.rank_bytes = self._every_rank(trainer, own)
        if len(self.rank_bytes) > 1 and not self._said_ranks:
            self._said_ranks = True
            ranks = "; ".join(
                f"rank {rank} " + ", ".join(_size(state[name]) for name in STATE_METRICS)
                for rank, state in enumerate(self.rank_bytes)
            )
            rank_zero_info(f"Held per rank (parameters, gradients, optimizer state): {ranks}.")
        values = {**self.read(held), **{name: n / GIB for name, n in own.items()}}
        log_to_loggers(trainer, self._largest_over_ranks(trainer, values))

    def _every_rank(self, trainer: Trainer, own: dict[str, int]) -> list[dict[str, int]]:
        dist = torch.distributed
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return [own]
        mine = torch.tensor(list(own.values()), dtype=torch.float64, device=self._device)
        every = [torch.empty_like(mine) for _ in range(trainer.world_size)]
        dist.all_gather(every, mine)
        return [dict(zip(own, (int(v) for v in t.tolist()), strict=True)) for t in every]

    def _largest_over_ranks(self, trainer: Trainer, values: dict[str, float]) -> dict[str, float]:
        # Called by every rank at the same steps (the global step is the same on all): a collective.
        dist = torch.distributed
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return values
        gathered = torch.tensor(list(values.values()), dtype=torch.float64, device=self._device)
        dist.all_reduce(gathered, op=dist.ReduceOp.MAX)
        return dict(zip(values, gathered.tolist(), strict=True))
