"""Sharded training on FSDP2: ``--trainer.strategy qlit_fsdp2``, for a model one device cannot hold.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` (PyTorch's per-parameter FSDP2, ``fully_shard``)
set up the way a qlit run needs it: every decoder layer is one ``fully_shard`` unit (the rest of the model, its
embeddings, final norm and output layer, is the root unit), each rank keeps ``1/N`` of every parameter (frozen 4-bit
weights, trainable LoRA weights and their gradients and optimizer state alike), each decoder layer is recomputed in
the backward pass, and the base can be loaded shard by shard: each rank builds the model without its weights (on the
meta device), shards it, then reads only its own rows of each tensor from the checkpoint
(:meth:`FSDP2Strategy.sharded_base`), where the checkpoint's format allows (``QuantBackend.empty_layout``).

What the module asks of the strategy, it asks by duck typing (no import of this module): ``sharded_base(module)``
before loading, ``shard_module(module)`` once the adapter is on, ``gathered_state_dict(model)`` for the end-of-fit
adapter.
Checkpoints hold only what trains, as one file (``save_distributed_checkpoint: false``, the default: the same
format a one-device run writes, so either resumes from the other) or one folder of per-rank shards (``true``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from qlit.errors import QlitError
from qlit.hub import looks_local, offline_unless_reachable
from qlit.models import layers
from qlit.models.dtypes import to_dtype
from qlit.models.loading import load_config, resolve_pretrained
from qlit.models.quant import backend_class, backend_modes
from qlit.models.quantization import DTypeName

#: The name ``--trainer.strategy`` knows this strategy by.
STRATEGY_NAME = "qlit_fsdp2"

#: Trainer precisions the strategy trains in: parameters kept in fp32 (``32-true``; ``bf16-mixed`` computes in bf16
#: under autocast), or cast to bf16/fp16 whole (``bf16-true``, ``16-true``). ``16-mixed``'s gradient scaler does not
#: handle sharded gradients.
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true")
_CAST_BY_PRECISION = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
#: The trainer's limit on the evaluation batches of each of its functions.
_EVAL_LIMITS = {"fit": "limit_val_batches", "test": "limit_test_batches", "predict": "limit_predict_batches"}


class FSDP2Strategy(ModelParallelStrategy):
    """Shard a qlit model over every rank with FSDP2: one ``fully_shard`` unit per decoder layer.

    Mixed precision: FSDP gathers each parameter for the forward pass in ``param_dtype`` and reduces gradients in
    ``reduce_dtype``; by default (both ``None``) each parameter is gathered and reduced in its own dtype, the one
    ``trainer.precision`` gives it (``32-true``: float32; ``bf16-true``: bfloat16 for every weight, the LoRA weights
    included). A 4-bit base whose packed weights are stored in a float dtype (``quantization.quant_storage``) must
    store them in the dtype they are gathered in, since a cast would change their bits; ``uint8`` storage is
    gathered as bytes whatever the policy.

    Args:
        activation_checkpointing: recompute each decoder layer in the backward pass (PyTorch's non-reentrant
            checkpoint on each sharded layer); ``model.gradient_checkpointing`` must then be ``false``.
        param_dtype: dtype the parameters are gathered and computed in (``None``: their own).
        reduce_dtype: dtype gradients are reduced in across the ranks (``None``: the gathered parameters' dtype).
        reshard_after_forward: free each layer's gathered parameters after its forward pass and gather them again for
            the backward pass (less memory, twice the gathers); ``false`` keeps them until the backward pass.
        load_by_shard: build the base without its weights and let each rank read only its own rows of each tensor
            from the checkpoint (``.safetensors`` files whose names are the model's; a 4-bit base quantizes each
            weight whole, one at a time); ``false``, or a format that cannot, loads the whole base on every rank
            before it is sharded.
        save_distributed_checkpoint: write each checkpoint as a folder of per-rank shards (no gather) instead of one
            file written by rank 0; both hold only what trains and both resume.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout: how long a collective waits for the other ranks.
    """

    def __init__(
        self,
        activation_checkpointing: bool = True,
        param_dtype: DTypeName | None = None,
        reduce_dtype: DTypeName | None = None,
        reshard_after_forward: bool = True,
        load_by_shard: bool = True,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.activation_checkpointing = activation_checkpointing
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        self.load_by_shard = load_by_shard
        #: The base built without weights, until :meth:`shard_module` fills each rank's rows.
        self._empty: _EmptyBase | None = None

    # ----- the process group ----------------------------------------------------------------------------------------
    def setup_environment(self) -> None:
        # One data-parallel dimension over every process of every node (Lightning's "auto" would give tensor
        # parallelism the processes of a node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def process_dataloader(self, dataloader: object) -> object:
        from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

        # Lightning wraps a sampler of its own order (qlit's, seeded by epoch) in a DistributedSampler that shuffles
        # that order once more, for training. Its split of the sampler's own order instead gives rank r the rows
        # r, r + N, ... of it: each global batch is the one a single process with N times the batch size trains.
        sampler = getattr(dataloader, "sampler", None)
        if isinstance(sampler, DistributedSamplerWrapper):
            sampler.shuffle = False
        self._check_even(dataloader)
        return dataloader

    def _check_even(self, dataloader: object) -> None:
        """Refuse an evaluation loader that gives the ranks different numbers of batches: each forward pass gathers
        every rank's shards, so a rank with a batch more would wait for the others forever."""
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        sampler, size = getattr(dataloader, "sampler", None), getattr(dataloader, "batch_size", None)
        if not isinstance(sampler, UnrepeatedDistributedSampler) or not size or self._lightning_module is None:
            return
        trainer = self.lightning_module.trainer
        fn = str(getattr(trainer.state.fn, "value", trainer.state.fn))
        limit = getattr(trainer, _EVAL_LIMITS.get(fn, "limit_val_batches"))
        rows, world = len(sampler.dataset), sampler.num_replicas
        counts = [math.ceil(len(range(rank, rows, world)) / size) for rank in range(world)]
        if isinstance(limit, int):
            counts = [min(n, limit) for n in counts]
        elif isinstance(limit, float) and limit < 1:
            counts = [int(n * limit) for n in counts]
        if len(set(counts)) > 1:
            raise QlitError(
                f"qlit_fsdp2 needs as many evaluation batches on every rank (each forward pass gathers the shards of "
                f"all of them), but {rows} rows in batches of {size} give {max(counts)} to rank 0 and {min(counts)} "
                f"to rank {world - 1}: set data.limit_val_samples to a multiple of {world * size}, or "
                "trainer.limit_val_batches to an int of at most the smaller."
            )

    @property
    def lightning_restore_optimizer(self) -> bool:
        # Lightning's ModelParallelStrategy loads the optimizer inside load_checkpoint, before the module has checked
        # the checkpoint; here it is loaded after (load_optimizer_state_dict).
        return True

    # ----- building the model (called by QLitModule.configure_model) --------------------------------------------------
    def sharded_base(self, module: Any) -> Any | None:
        """Check that ``module``'s settings can train sharded; the base built without weights, in the layout it
        trains in, for :meth:`shard_module` to fill, or ``None`` where the module should load it whole."""
        self._check(module)
        if not self.load_by_shard:
            return None
        empty = _empty_base(module, self.root_device)
        if isinstance(empty, str):
            rank_zero_info(f"qlit_fsdp2: every rank loads the whole base before sharding it: {empty}.")
            return None
        self._empty = empty
        return empty.model

    def _check(self, module: Any) -> None:
        precision = str(self.precision_plugin.precision)
        if precision not in PRECISIONS:
            choices = ", ".join(PRECISIONS)
            raise QlitError(f"trainer.precision {precision} does not train under qlit_fsdp2: use {choices}.")
        if module.gradient_checkpointing is not False:
            raise QlitError(
                f"model.gradient_checkpointing {module.gradient_checkpointing!r} does not apply under qlit_fsdp2, "
                "which recomputes each sharded decoder layer itself (its activation_checkpointing): set "
                "model.gradient_checkpointing: false (and memory_budget: auto)."
            )
        if module.compile_layers:
            raise QlitError("model.compile is not supported under qlit_fsdp2 yet: set model.compile: false.")
        spec = module.quantization
        if not spec.backend.allows_sharding:
            sharded = [mode for mode in backend_modes() if backend_class(mode).allows_sharding]
            raise QlitError(
                f"quantization mode '{spec.mode}' cannot train under qlit_fsdp2 (its layers were not checked with "
                f"FSDP2): use mode {' or '.join(sharded)}, or a strategy that does not shard (ddp)."
            )
        storage = to_dtype(spec.quant_storage)
        gathered = self._gathered_dtype(module, precision)
        if spec.is_4bit and storage.is_floating_point and gathered is not None and storage != gathered:
            name = str(gathered).removeprefix("torch.")
            raise QlitError(
                f"quantization.quant_storage {spec.quant_storage} stores the packed 4-bit weights as floats, which "
                f"qlit_fsdp2 would gather as {name} and so change their bits: set quantization.quant_storage: {name}."
            )

    def _gathered_dtype(self, module: Any, precision: str) -> torch.dtype | None:
        """The dtype the base's float parameters are gathered in (``None``: its own, not known before loading)."""
        if self.param_dtype is not None:
            return to_dtype(self.param_dtype)
        if precision in _CAST_BY_PRECISION:
            return _CAST_BY_PRECISION[precision]
        dtype = module.quantization.weights_dtype(module.dtype_name)
        return dtype if isinstance(dtype, torch.dtype) else None

    def shard_module(self, module: Any) -> None:
        """Shard ``module.model``: each decoder layer one ``fully_shard`` unit (recomputed in the backward pass when
        ``activation_checkpointing``), the rest the root unit; then fill each rank's rows of a base built empty."""
        from torch.distributed._composable import checkpoint
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        model = module.model
        decoder = layers.decoder_layers(model)
        if not decoder:
            raise QlitError(
                f"qlit_fsdp2 shards by decoder layer, and '{module.pretrained}' has none it knows (transformers' "
                "GradientCheckpointingLayer): use strategy ddp."
            )
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(
            param_dtype=to_dtype(self.param_dtype) if self.param_dtype else None,
            reduce_dtype=to_dtype(self.reduce_dtype) if self.reduce_dtype else None,
        )
        if self._empty is not None:
            self._empty.to_meta(model)
        for layer in decoder:
            if self.activation_checkpointing:
                checkpoint(layer)
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        # generate() does not pass through the root's forward, whose hook gathers the embeddings and output layer.
        register_fsdp_forward_method(model, "generate")
        # transformers' mark of a model FSDP shards: its generate() then keeps every rank stepping until all ranks'
        # sequences have ended (synced_gpus), since each step gathers every rank's shards.
        for submodule in model.modules():
            submodule._is_fsdp_managed_module = True
        loaded = "the base was loaded whole on every rank, then sharded"
        if self._empty is not None:
            self._empty.fill(model, self.root_device)
            self._empty = None
            loaded = "each rank read only its rows of the base's checkpoint"
        gathered = self.param_dtype or "each parameter's own dtype"
        reduced = self.reduce_dtype or "the gathered dtype"
        rank_zero_info(
            f"qlit_fsdp2: {len(decoder)} decoder layers sharded over {self.world_size} ranks"
            f"{', each recomputed in the backward pass' if self.activation_checkpointing else ''}; parameters "
            f"gathered in {gathered}, gradients reduced in {reduced}; {loaded}."
        )

    def gathered_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s trainable weights, whole, on rank 0's CPU (empty elsewhere): a collective of every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(model, options=options)

    # ----- checkpoints ------------------------------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # A qlit checkpoint holds only what trains (QLitModule.on_save_checkpoint): the frozen base is neither
        # gathered nor written, and is reloaded from model.pretrained on resume.
        options = StateDictOptions(
            full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True, ignore_frozen_params=True
        )
        assert self.model is not None
        return get_model_state_dict(self.model, options=options)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        # Keyed as torch.optim keys its own (by position in the parameter groups), so that the file is the one a
        # one-device run writes.
        return _by_position(state) if state else state

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        return self._load_sharded(path)

    def _load_sharded(self, path: Path) -> dict[str, Any]:
        """The checkpoint folder's metadata, its model tensors as this rank's shards (a tensor of another shape is
        left as an empty stand-in, for the module's check to name), and its optimizer states where it holds every
        trainable weight."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        assert self.model is not None
        checkpoint = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        ours = get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=True))
        wanted, stand_ins = {}, {}
        for name, value in ours.items():
            meta = stored.get(f"state_dict.{name}")
            if not isinstance(meta, TensorStorageMetadata):
                continue
            if tuple(meta.size) == tuple(value.shape):
                wanted[name] = torch.empty_like(value)
            else:
                stand_ins[name] = torch.empty(tuple(meta.size), device="meta")
        if wanted:
            dcp_load({"state_dict": wanted}, checkpoint_id=str(path))
        checkpoint["state_dict"] = {**wanted, **stand_ins}
        if len(wanted) == len(ours):
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            states = {f"optimizer_{i}": get_optimizer_state_dict(self.model, o) for i, o in enumerate(self.optimizers)}
            if states and all(any(k.startswith(f"{key}.") for k in stored) for key in states):
                dcp_load(states, checkpoint_id=str(path))
                checkpoint["optimizer_states"] = list(states.values())
        return checkpoint

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        # After QLitModule.on_load_checkpoint has checked the names and shapes: each rank copies its rows.
        assert self.model is not None
        state = checkpoint["state_dict"]
        tensors = dict(self.model.named_parameters())
        tensors.update({name: b for name, b in self.model.named_buffers() if name in state})
        missing = [name for name, p in tensors.items() if name not in state and p.requires_grad]
        if strict and missing:
            raise QlitError(f"the checkpoint does not hold '{missing[0]}' of this model.")
        with torch.no_grad():
            for name, value in state.items():
                if name in tensors:
                    _copy_rows(tensors[name], value)

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.model is not None
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            full = _is_full_optimizer_state(state)
            if full:
                state = _by_name(state, optimizer, self.model)
            # A file's states are whole on every rank: rank 0's are scattered, as Lightning does.
            options = StateDictOptions(full_state_dict=full, broadcast_from_rank0=full)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)


StrategyRegistry.register(
    STRATEGY_NAME, FSDP2Strategy, description="qlit's FSDP2 sharding: one fully_shard unit per decoder layer"
)


# ----- parameter and optimizer tensors ------------------------------------------------------------------------------
def _rows(tensor: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """This rank's own part of ``tensor`` (its local shard, or itself) and the rows of the whole it holds."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor, slice(None)
    if tuple(tensor.placements) != (Shard(0),):
        raise QlitError(f"qlit_fsdp2 loads tensors sharded by rows only, not {tensor.placements}.")
    mesh = tensor.device_mesh
    total, world = tensor.shape[0], mesh.size()
    # fully_shard splits as torch.chunk does: ceil(rows / world) rows each, the last ranks holding fewer or none.
    chunk = math.ceil(total / world) if total else 0
    start = min(mesh.get_local_rank() * chunk, total)
    local = tensor.to_local()
    return local, slice(start, start + local.shape[0])


def _copy_rows(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy into ``target`` (a sharded parameter, or a whole one) its part of ``value``, whole or sharded alike."""
    from torch.distributed.tensor import DTensor

    local, rows = _rows(target)
    source = value.to_local() if isinstance(value, DTensor) else value[rows]
    local.copy_(source.to(device=local.device, dtype=local.dtype))


def _is_full_optimizer_state(state: dict[str, Any]) -> bool:
    from torch.distributed.tensor import DTensor

    tensors = [t for one in state.get("state", {}).values() for t in one.values() if isinstance(t, torch.Tensor)]
    return not any(isinstance(t, DTensor) for t in tensors)


def _by_position(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name, keyed by position in its parameter groups instead."""
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]],
    }


def _by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """An optimizer state keyed by position in ``optimizer``'s parameter groups, keyed by parameter name instead."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    order = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(group["params"]) for group in state["param_groups"]):
        raise QlitError("the checkpoint's optimizer state is of another set of trainable weights than this model's.")

    def named(key: Any) -> Any:
        return order[key] if isinstance(key, int) else key

    return {
        "state": {named(k): v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [named(k) for k in g["params"]]} for g in state["param_groups"]],
    }


# ----- a base built without its weights -----------------------------------------------------------------------------
def _placeholder(device: torch.device) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor]:
    """Tensors of any shape that hold no memory (one zero, expanded): what the base's parameters are while peft puts
    its adapter on (it keeps the adapter's weights on the base's device, so they keep their initial values), until
    :meth:`_EmptyBase.to_meta`."""

    def make(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=device).expand(shape)

    return make


@dataclass
class _EmptyBase:
    """A model built without its weights and the checkpoint tensors that fill it, rank by rank."""

    model: Any
    #: (module, parameter or buffer name, checkpoint tensor name, is a buffer), one per tensor to fill.
    targets: list[tuple[torch.nn.Module, str, str, bool]]
    #: The checkpoint's files by tensor name.
    files: dict[str, Path]
    #: The dtype the checkpoint's tensors are cast to before being stored.
    dtype: torch.dtype
    #: How a tensor the format stores in another layout is made from its whole checkpoint tensor, by name.
    stored: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    def to_meta(self, model: torch.nn.Module) -> None:
        """Turn the base's parameters (placeholders, on which peft has put its adapter) into meta tensors, which
        ``fully_shard`` shards without allocating (it needs contiguous tensors, which a placeholder is not)."""
        base = {id(owner._parameters[name]) for owner, name, _, is_buffer in self.targets if not is_buffer}
        _swap_parameters(model, base, lambda p: torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def fill(self, model: torch.nn.Module, device: torch.device) -> None:
        """Allocate this rank's shard of each sharded base parameter on ``device`` and read its rows from the
        checkpoint (the whole tensor where the format stores it in another layout)."""
        from safetensors import safe_open

        meta = {id(p) for p in model.parameters() if p.is_meta}
        # FSDP picks the new tensors up (and pads them to its shard size) when it first runs.
        _swap_parameters(model, meta, lambda p: torch.empty_like(p, device=device))
        handles: dict[Path, Any] = {}
        with torch.no_grad():
            for owner, name, key, is_buffer in self.targets:
                target = owner._buffers[name] if is_buffer else owner._parameters[name]
                path = self.files[key]
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt", device="cpu")
                reader = handles[path]
                local, rows = _rows(target)
                make = self.stored.get(key)
                if make is not None:
                    whole = make(reader.get_tensor(key).to(device=local.device, dtype=self.dtype))
                    if whole.shape[1:] != local.shape[1:] or (rows.stop or whole.shape[0]) > whole.shape[0]:
                        raise QlitError(f"'{key}' is stored as {tuple(whole.shape)}, not as the model's layout.")
                    part = whole[rows]
                elif rows.start is None:
                    part = reader.get_tensor(key)
                else:
                    part = reader.get_slice(key)[rows.start : rows.stop]
                local.copy_(part.to(device=local.device, dtype=local.dtype))


def _swap_parameters(
    model: torch.nn.Module, chosen: set[int], make: Callable[[torch.nn.Parameter], torch.Tensor]
) -> None:
    """Replace each parameter of ``model`` whose ``id`` is in ``chosen`` by a new one of ``make(old)``, wherever it is
    registered (a tied weight stays one parameter)."""
    made: dict[int, torch.nn.Parameter] = {}
    for owner in model.modules():
        for name, param in list(owner._parameters.items()):
            if param is None or id(param) not in chosen:
                continue
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(make(param), requires_grad=param.requires_grad)
            owner._parameters[name] = made[id(param)]


def _empty_base(module: Any, device: torch.device) -> _EmptyBase | str:
    """``module``'s base built without its weights on ``device``, with the checkpoint tensors that fill it; or why it
    cannot be (the sentence's end)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    backend = module.quantization.backend
    files = _checkpoint_files(module.pretrained, module.revision)
    if files is None:
        return f"'{module.pretrained}' is not stored in .safetensors files"
    config = load_config(module.pretrained, revision=module.revision, trust_remote_code=module.trust_remote_code)
    dtype = module.quantization.weights_dtype(module.dtype_name)
    if not isinstance(dtype, torch.dtype):  # auto, unquantized: the checkpoint's own dtype
        stored_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, stored_dtype) if isinstance(stored_dtype, str) else stored_dtype
    # Buffers (rotary frequencies) are computed at construction: real; parameters on the meta device.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            attn_implementation=module._attention(device),
            trust_remote_code=module.trust_remote_code,
        )
    placeholder = _placeholder(device)
    stored = backend.empty_layout(model, placeholder)
    if stored is None:
        return f"quantization mode '{module.quantization.mode}' cannot be built without its weights"
    meta = {id(p) for p in model.parameters() if p.is_meta}
    _swap_parameters(model, meta, lambda p: placeholder(tuple(p.shape), p.dtype))
    for owner in model.modules():
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None:
                owner._buffers[name] = buffer.to(device)
    targets = _targets(model, files)
    if isinstance(targets, str):
        return targets
    source = resolve_pretrained(module.pretrained)
    model.config._name_or_path = source  # as from_pretrained records it (peft's adapter_config names it)
    try:
        model.generation_config = GenerationConfig.from_pretrained(source, revision=module.revision)
    except OSError:
        pass  # none stored: the one built from the config
    return _EmptyBase(model=model, targets=targets, files=files, dtype=dtype, stored=stored)


def _targets(model: Any, files: dict[str, Path]) -> list[tuple[torch.nn.Module, str, str, bool]] | str:
    """Each parameter (once, however many names it has) and persistent buffer of ``model`` with its checkpoint
    tensor's name; or why the checkpoint's names are not the model's."""
    names: dict[int, list[str]] = {}
    for full, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(full)
    targets, seen = [], set()
    for prefix, owner in model.named_modules():
        stem = f"{prefix}." if prefix else ""
        for name, param in owner._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            key = next((n for n in names[id(param)] if n in files), None)
            if key is None:
                return f"its checkpoint holds no tensor named '{stem}{name}' (transformers renames it while loading)"
            targets.append((owner, name, key, False))
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set and f"{stem}{name}" in files:
                targets.append((owner, name, f"{stem}{name}", True))
    return targets


def _checkpoint_files(name: str, revision: str | None) -> dict[str, Path] | None:
    """The ``.safetensors`` file holding each tensor of model ``name``'s checkpoint; ``None`` where it has none."""
    from safetensors import safe_open

    source = resolve_pretrained(name)
    if looks_local(source):
        directory = Path(source).expanduser()
    else:
        try:
            from huggingface_hub import snapshot_download

            with offline_unless_reachable():
                patterns = ["*.safetensors", "*.safetensors.index.json"]
                directory = Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
        except Exception:  # the hub's failures have no common type; the whole-model load reports them
            return None
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        paths = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (directory / "model.safetensors").is_file():
        paths = [directory / "model.safetensors"]
    else:
        return None
    files: dict[str, Path] = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files
