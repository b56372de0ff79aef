"""LoRA over a 4-bit base in one autograd function per projection: the QLoRA forward and backward without the
element-wise passes around them.

peft's LoRA over a bitsandbytes ``Linear4bit`` computes ``base(x).clone() + lora_B(lora_A(x)) * scaling``: besides
the three matmuls, a copy of the output, a multiplication and an addition over it, casts of the adapter weights,
and the same again in the backward pass — per projection, seven per decoder layer. Here the scaled adapter product
is accumulated into the base output by the matmul itself (``addmm``), in the forward and the backward pass, and the
4-bit weight is de-quantized once for each (as bitsandbytes does, but in one kernel: the double-quantized block
scales are de-quantized once and kept). An fp32 adapter under bf16 autocast is cast to bf16 once per step, not in
every pass, and on CUDA its fp32 gradients come straight out of the matmuls. What is saved for the backward pass
is the input and the (tokens × rank) adapter activation, as with peft.

Projections that read one input — q/k/v and gate/up in transformers' decoder layers — run as one function without
LoRA dropout: their adapters' ``A`` stacked into one matmul in each pass, their input gradients accumulated by the
matmuls instead of summed afterwards, one autograd node instead of three (or two). The first projection called
computes its siblings' outputs too and hands each one over when it is called with the very same input.

With LoRA dropout, the adapter reads the dropped-out input (peft's own dropout module, the same random draws) and
that is saved too, as peft does. It applies where it computes what peft does: plain LoRA (no DoRA or other
variant, no LoRA bias), one active adapter, not merged, the adapter computing in the base's compute dtype (under
autocast of that dtype, or everything in fp32), and only in training mode; anything else (generation, a merged
or disabled adapter, several adapters) goes through peft's own forward.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from qlit.errors import QlitError
from qlit.models.graphs import capturing

FusedLoraChoice = Literal[True, False, "auto"]


class _LoRA4bit(torch.autograd.Function):
    """``x @ W.T + bias + scaling * (x_lora @ A.T) @ B.T`` with ``W`` de-quantized from 4 bits, where ``x_lora`` is
    the adapter's input: ``x`` after LoRA dropout, or ``x`` itself (``None``) without it. ``a`` and ``b`` are the
    adapter weights ``lora_a`` and ``lora_b`` in the compute dtype (the same tensors when no cast is needed); the
    gradients for ``lora_a`` and ``lora_b`` are returned in their own dtype. ``packed`` is the 4-bit weight,
    ``absmax`` its fp32 block scales and ``spec`` ``(blocksize, quant_type, shape)``."""

    @staticmethod
    def forward(  # noqa: PLR0913 (autograd passes the inputs positionally)
        ctx: Any,
        x: torch.Tensor,
        x_lora: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        spec: tuple[int, str, torch.Size],
        bias: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        xl = x2 if x_lora is None else x_lora.reshape(-1, x.shape[-1])
        weight = _dequantize(packed, absmax, spec, dtype)
        xa = xl @ a.t()
        out = torch.addmm(bias.to(dtype), x2, weight.t()) if bias is not None else x2 @ weight.t()
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(xl, xa, a, b, packed, absmax)
        ctx.spec, ctx.scaling, ctx.x_shape, ctx.dropout = spec, scaling, x.shape, x_lora is not None
        ctx.grad_dtypes = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xl, xa, a, b, packed, absmax = ctx.saved_tensors
        dtype, scaling = xl.dtype, ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        g_xa = g @ b  # (tokens × rank): the gradient reaching the adapter's inner activation
        grad_b = grad_a = None
        if ctx.needs_input_grad[3]:
            grad_b = _scaled_product(g.t(), xa, scaling, ctx.grad_dtypes[1])
        if ctx.needs_input_grad[2]:
            grad_a = _scaled_product(g_xa.t(), xl, scaling, ctx.grad_dtypes[0])
        grad_x = grad_x_lora = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ _dequantize(packed, absmax, ctx.spec, dtype)
            if not ctx.dropout:
                grad_x.addmm_(g_xa, a, alpha=scaling)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.dropout and ctx.needs_input_grad[1]:
            grad_x_lora = _scaled_product(g_xa, a, scaling, dtype).view(ctx.x_shape)  # on through dropout
        return grad_x, grad_x_lora, grad_a, grad_b, None, None, None, None, None, None, None


def _dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, spec: tuple[int, str, torch.Size], dtype: torch.dtype
) -> torch.Tensor:
    """The 4-bit weight in ``dtype``: bitsandbytes' de-quantization kernel on scales already in fp32 (one launch;
    its Python wrapper would first de-quantize the double-quantized scales, every call)."""
    blocksize, quant_type, shape = spec
    weight = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type, shape, dtype)
    return weight.t() if packed.shape[0] == 1 else weight  # bitsandbytes' layout for a transposed packed weight


def _scaled_product(m1: torch.Tensor, m2: torch.Tensor, scaling: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``scaling * m1 @ m2`` in ``out_dtype``: one matmul (beta=0: the zero is only broadcast, never read), which on
    CUDA also writes the fp32 gradient of an fp32 adapter straight from its bf16 operands, without a cast."""
    # Not while compiling: PyTorch 2.11's decomposition of the mixed-dtype addmm fails, and the graph fuses the cast.
    if out_dtype != m1.dtype and m1.is_cuda and _OUT_DTYPE_MATMUL and not torch.compiler.is_compiling():
        return torch.addmm(_zero(out_dtype, m1.device), m1, m2, out_dtype=out_dtype, beta=0, alpha=scaling)
    return torch.addmm(_zero(m1.dtype, m1.device), m1, m2, beta=0, alpha=scaling).to(out_dtype)


#: ``torch.addmm(..., out_dtype=)`` for bf16/fp16 operands with an fp32 result on CUDA (torch 2.8 and later).
_OUT_DTYPE_MATMUL = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 8)


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling() or capturing():  # nothing traced or recorded may be kept beyond the graph
        return torch.zeros((), dtype=dtype, device=device)
    key = (dtype, device)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros((), dtype=dtype, device=device)
    return _ZEROS[key]


#: Advanced by a forward pre-hook on the model (see :func:`apply_fused_lora`): each model call is a new step, whose
#: adapter weights may have changed since the last; within one step they do not.
_STEP = [0]


def _next_step(*_: Any) -> None:
    _STEP[0] += 1


def _adapter_weights(module: Any, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter weights ``name`` of ``module`` in ``dtype``, cast once per step: the forward pass, a
    checkpointed layer's recomputation and the backward pass share one cast (an fp32 adapter under bf16 autocast)."""
    wa, wb = module.lora_A[name].weight, module.lora_B[name].weight
    if wa.dtype == dtype and wb.dtype == dtype:
        return wa, wb
    if torch.compiler.is_compiling() or capturing():  # a compiled layer fuses the casts; a CUDA graph replays them
        return wa.detach().to(dtype), wb.detach().to(dtype)
    key = (_STEP[0], name, dtype, wa._version, wb._version)
    cached = module.__dict__.get("_qlit_adapter_cast")
    if cached is None or cached[0] != key:
        cached = (key, wa.detach().to(dtype), wb.detach().to(dtype))
        module.__dict__["_qlit_adapter_cast"] = cached
    return cached[1], cached[2]


def _absmax(module: Any, quant_state: Any) -> torch.Tensor:
    """The fp32 block scales of ``module``'s 4-bit weight. A double-quantized weight's scales are de-quantized once
    and kept beside it (about 6 % of the weight's size in fp32): the base weights are frozen, and bitsandbytes would
    otherwise de-quantize them again, two more kernels, before every de-quantization of the weight."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    cached = module.__dict__.get("_qlit_absmax")
    # Keyed by the double-quantized scales themselves: moving the weight (``QuantState.to``) replaces them.
    if cached is not None and cached[0] is quant_state.absmax:
        return cached[1]
    import bitsandbytes.functional as bnbf

    absmax = (bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()
    if not (torch.compiler.is_compiling() or capturing()):  # a compiled layer or a CUDA graph computes them itself
        module.__dict__["_qlit_absmax"] = (quant_state.absmax, absmax)
    return absmax


def _lora_dtype(module: Any, x: torch.Tensor, adapter: str) -> torch.dtype:
    """The dtype peft's LoRA path computes in: autocast's, else the adapter weights' (peft casts the input)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return module.lora_A[adapter].weight.dtype


def _fusable(module: Any, x: torch.Tensor) -> tuple[str, Any, torch.dtype] | None:
    """``(adapter, quant_state, compute dtype)`` of one peft LoRA ``Linear4bit`` where the fused path computes what
    peft does for input ``x``, else ``None``."""
    # Training mode only (generation runs in eval mode, where bitsandbytes' kernel for a few rows is faster), with or
    # without gradients: reentrant checkpointing runs a layer's first forward without them and its recomputation
    # with them, and both must take one path, so that LoRA dropout draws the same masks in both.
    if not module.training or module.disable_adapters or module.merged:
        return None
    active = module.active_adapters
    if len(active) != 1 or active[0] not in module.lora_A or active[0] in getattr(module, "lora_variant", {}):
        return None
    name = active[0]
    if module.lora_B[name].bias is not None:
        return None
    base = module.base_layer
    if base.bias is not None and base.bias.requires_grad:
        return None
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)
    quant_state = base.weight.quant_state
    compute = base.compute_dtype or x.dtype
    if getattr(quant_state, "packing_format_for_cpu", False) or _lora_dtype(module, x, name) != compute:
        return None
    return name, quant_state, compute


def _fused_forward(module: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The fused forward of one peft LoRA ``Linear4bit``, or ``None`` where it would not compute what peft does."""
    fusable = _fusable(module, x)
    if fusable is None:
        return None
    name, quant_state, compute = fusable
    dropout = module.lora_dropout[name]
    dtype = x.dtype
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(compute)
        out = _LoRA4bit.apply(
            x,
            None if isinstance(dropout, torch.nn.Identity) else dropout(x),
            module.lora_A[name].weight,
            module.lora_B[name].weight,
            *_adapter_weights(module, name, compute),
            module.base_layer.weight,
            _absmax(module, quant_state),
            (quant_state.blocksize, quant_state.quant_type, quant_state.shape),
            module.base_layer.bias,
            float(module.scaling[name]),
        )
    return out.to(dtype)  # bitsandbytes returns the input's dtype, and peft's sum keeps it


class _LoRA4bitGroup(torch.autograd.Function):
    """:class:`_LoRA4bit` for ``n`` projections of one input without LoRA dropout (q/k/v, gate/up): one matmul for
    the adapters' inner activations (their ``A`` stacked), one for their gradient, one for the ``A`` gradients, and
    one input gradient accumulated by the matmuls, where separate projections take ``n`` of each and sum.

    Inputs after ``x`` and ``plan`` (``(n, ranks, specs, scaling)``), ``n`` of each: ``lora_a``, ``lora_b`` (the
    parameters, for their gradients), then the stacked ``a`` and ``n`` ``b`` in the compute dtype, the 4-bit weights,
    their fp32 scales and their biases (or ``None``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: tuple[Any, ...], *tensors: Any) -> tuple[torch.Tensor, ...]:
        n, ranks, specs, scaling = plan
        lora_a, lora_b = tensors[:n], tensors[n : 2 * n]
        a_cat = tensors[2 * n]
        b, packed, absmax, bias = (tensors[2 * n + 1 + k * n : 2 * n + 1 + (k + 1) * n] for k in range(4))
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a_cat.t()  # (tokens × the ranks' sum)
        outs, start = [], 0
        for i in range(n):
            weight = _dequantize(packed[i], absmax[i], specs[i], dtype)
            out = torch.addmm(bias[i].to(dtype), x2, weight.t()) if bias[i] is not None else x2 @ weight.t()
            out.addmm_(xa[:, start : start + ranks[i]], b[i].t(), alpha=scaling)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
            start += ranks[i]
        ctx.save_for_backward(x2, xa, a_cat, *b, *packed, *absmax)
        ctx.plan, ctx.x_shape = plan, x.shape
        ctx.grad_dtypes = [t.dtype for t in lora_a], [t.dtype for t in lora_b]
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n, ranks, specs, scaling = ctx.plan
        x2, xa, a_cat, *rest = ctx.saved_tensors
        b, packed, absmax = rest[:n], rest[n : 2 * n], rest[2 * n :]
        dtype = x2.dtype
        g = [grad.reshape(-1, grad.shape[-1]).to(dtype) for grad in grads]
        g_xa = torch.cat([g[i] @ b[i] for i in range(n)], dim=1)  # (tokens × the ranks' sum)
        needs = ctx.needs_input_grad
        grad_a: list[torch.Tensor | None] = [None] * n
        grad_b: list[torch.Tensor | None] = [None] * n
        bounds = [sum(ranks[:i]) for i in range(n + 1)]
        if any(needs[2 : 2 + n]):
            stacked = _scaled_product(g_xa.t(), x2, scaling, ctx.grad_dtypes[0][0])
            grad_a = [stacked[bounds[i] : bounds[i + 1]] if needs[2 + i] else None for i in range(n)]
        for i in range(n):
            if needs[2 + n + i]:
                grad_b[i] = _scaled_product(g[i].t(), xa[:, bounds[i] : bounds[i + 1]], scaling, ctx.grad_dtypes[1][i])
        grad_x = None
        if needs[0]:
            for i in range(n):
                weight = _dequantize(packed[i], absmax[i], specs[i], dtype)
                grad_x = g[i] @ weight if grad_x is None else grad_x.addmm_(g[i], weight)
            grad_x = grad_x.addmm_(g_xa, a_cat, alpha=scaling).view(ctx.x_shape)
        return grad_x, None, *grad_a, *grad_b, *([None] * (4 * n + 1))


#: Sibling projections that read the same input in the decoder layers transformers ships.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """Sibling projections that read one input (q/k/v, gate/up): the first one called computes all of them in one
    :class:`_LoRA4bitGroup` and hands each sibling its output when that sibling is called with the same input (the
    same tensor, unchanged); a call with any other input computes alone."""

    def __init__(self, members: list[Any]) -> None:
        self.members = members
        self.pending: dict[int, torch.Tensor] = {}
        self.source: tuple[torch.Tensor, int] | None = None

    def forward(self, module: Any, x: torch.Tensor) -> torch.Tensor | None:
        if self.pending and self.source is not None and self.source[0] is x and self.source[1] == x._version:
            out = self.pending.pop(id(module), None)
            if not self.pending:
                self.source = None
            if out is not None:
                return out
        if torch.compiler.is_compiling():  # a compiled layer fuses its own graph; no state kept across calls
            return None
        outs = _group_forward(self.members, x)
        if outs is None:
            return None
        self.pending = {id(m): out for m, out in zip(self.members, outs, strict=True) if m is not module}
        self.source = (x, x._version)
        return outs[self.members.index(module)]


def _group_forward(members: list[Any], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """All members' fused outputs for ``x``, or ``None`` where one of them would not compute what peft does in the
    grouped function (LoRA dropout, differing adapters, scalings or dtypes)."""
    checks = [_fusable(m, x) for m in members]
    if any(c is None for c in checks):
        return None
    names = [c[0] for c in checks]
    compute = checks[0][2]
    scaling = float(members[0].scaling[names[0]])
    for m, (name, _, dtype) in zip(members, checks, strict=True):
        if (
            dtype != compute
            or float(m.scaling[name]) != scaling
            or not isinstance(m.lora_dropout[name], torch.nn.Identity)
        ):
            return None
    lora_a = [m.lora_A[name].weight for m, name in zip(members, names, strict=True)]
    lora_b = [m.lora_B[name].weight for m, name in zip(members, names, strict=True)]
    if len({w.dtype for w in lora_a}) != 1:
        return None
    a_cat, b = _group_adapter_weights(members, names, compute)
    specs = tuple((c[1].blocksize, c[1].quant_type, c[1].shape) for c in checks)
    plan = (len(members), tuple(w.shape[0] for w in lora_a), specs, scaling)
    dtype = x.dtype
    with torch.autocast(x.device.type, enabled=False):
        outs = _LoRA4bitGroup.apply(
            x.to(compute),
            plan,
            *lora_a,
            *lora_b,
            a_cat,
            *b,
            *(m.base_layer.weight for m in members),
            *(_absmax(m, c[1]) for m, c in zip(members, checks, strict=True)),
            *(m.base_layer.bias for m in members),
        )
    return tuple(out.to(dtype) for out in outs)


def _group_adapter_weights(
    members: list[Any], names: list[str], dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The members' ``A`` stacked and their ``B``, in ``dtype``: built once per step (see :func:`_adapter_weights`),
    kept on the first member."""
    weights = [(m.lora_A[n].weight, m.lora_B[n].weight) for m, n in zip(members, names, strict=True)]
    if capturing():  # a CUDA graph replays the casts
        return torch.cat([wa.detach() for wa, _ in weights]).to(dtype), [wb.detach().to(dtype) for _, wb in weights]
    key = (_STEP[0], tuple(names), dtype, tuple((wa._version, wb._version) for wa, wb in weights))
    cached = members[0].__dict__.get("_qlit_group_cast")
    if cached is None or cached[0] != key:
        a_cat = torch.cat([wa.detach() for wa, _ in weights]).to(dtype)
        cached = (key, a_cat, [wb.detach().to(dtype) for _, wb in weights])
        members[0].__dict__["_qlit_group_cast"] = cached
    return cached[1], cached[2]


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of peft's LoRA ``Linear4bit`` whose forward is fused where that is exact."""
    if cls not in _FUSED_CLASSES:

        def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = None
            if not args and not kwargs:
                group = self.__dict__.get("_qlit_group")
                out = group.forward(self, x) if group is not None else None
                if out is None:
                    out = _fused_forward(self, x)
            return out if out is not None else cls.forward(self, x, *args, **kwargs)

        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _FUSED_CLASSES[cls]


def _form_groups(model: Any, fusable: set[int]) -> None:
    """Tie the fused projections of each parent that :data:`GROUPS` names into a :class:`_Group`."""
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if all(m is not None and id(m) in fusable for m in members):
                if len({m.in_features for m in members}) == 1:
                    group = _Group(members)
                    for m in members:
                        m.__dict__["_qlit_group"] = group


def lora_4bit_modules(model: Any) -> list[Any]:
    """peft's LoRA layers over bitsandbytes 4-bit linear layers in ``model``."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes support
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def check_fused_lora(choice: FusedLoraChoice, adapter: Any, base_allows: bool) -> None:
    """Refuse, when the config is read, ``fused_lora: true`` for a run it cannot apply to; ``base_allows``: the
    quantization backend allows the fused path (``QuantBackend.allows_fused_lora``)."""
    if choice is not True:
        return
    from peft import LoraConfig

    from qlit.models.quant import backend_class, backend_modes

    if not base_allows:
        modes = " or ".join(m for m in backend_modes() if backend_class(m).allows_fused_lora)
        raise QlitError(f"model.fused_lora: true needs a 4-bit base (quantization.mode {modes}): set it to auto.")
    if adapter is None:
        return  # an adapter loaded from adapter_path: checked once it is loaded
    if type(adapter) is not LoraConfig:
        raise QlitError(f"model.fused_lora: true fuses plain LoRA, not {type(adapter).__name__}: set it to auto.")
    reasons = []
    if getattr(adapter, "use_dora", False):
        reasons.append("use_dora")
    if getattr(adapter, "lora_bias", False):
        reasons.append("lora_bias")
    if reasons:
        raise QlitError(f"model.fused_lora: true cannot fuse an adapter with {', '.join(reasons)}: set it to auto.")


def apply_fused_lora(model: Any, choice: FusedLoraChoice) -> int:
    """Give every fusable LoRA 4-bit layer of ``model`` the fused forward; return how many there are.

    Each layer still checks, call by call, that the fused path computes what peft's would (see the module
    docstring) and otherwise runs peft's forward. ``true`` insists that some layer can take it.
    """
    if choice is False:
        return 0
    fusable = []
    for module in lora_4bit_modules(model):
        plain = [
            name
            for name in module.lora_A
            if module.lora_B[name].bias is None and name not in getattr(module, "lora_variant", {})
        ]
        if plain:
            fusable.append(module)
    if choice is True and not fusable:
        raise QlitError(
            "model.fused_lora: true found no LoRA layer it can fuse (plain LoRA on a 4-bit base, without DoRA or "
            "LoRA bias): set it to auto."
        )
    for module in fusable:
        module.__class__ = _fused_class(type(module))
    _form_groups(model, {id(m) for m in fusable})
    if fusable and _next_step not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_next_step)
    return len(fusable)
