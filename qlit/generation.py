"""Greedy generation at kernel speed: a static KV cache, left-padded batches and the decode step as a CUDA graph.

transformers' ``generate`` runs every decoding step through Python: its logits processors and stopping criteria,
the model's layers, peft's adapters, a mask built anew and a cache that grows. That is thousands of kernel launches
per token, and they bound a small model's decoding: 93 ms a token for Qwen2.5-0.5B NF4 + LoRA on one H100, nearly
all of it the host. Here a batch's prompts are prefilled once into a static cache (transformers' ``StaticCache``,
sized for the prompts and every new token), and each following step (the forward pass on one token per row, the
argmax, the end-of-sequence bookkeeping) is recorded once as a CUDA graph and replayed with one launch. The host's
cost per token then no longer depends on what the model holds: peft's adapter layers are replayed as their kernels,
without their Python, which is how adapters run here without peft's per-call overhead and still exactly as peft
computes them (qlit's fused LoRA, where it applies, is the model's own and runs in both paths).

**The same tokens as** ``generate(do_sample=False)``: the same positions (left padding, counted from each row's
first real token), the same masks (padding and causality; the cache's unused slots are masked too, which adds
exact zeros), the end-of-sequence token suppressed while ``min_new_tokens`` says so, a finished row padded with
``pad_token_id`` while the others go on, and the output trimmed where transformers' loop would have stopped. Greedy
means argmax: a checkpoint's generation config may carry a repetition penalty (Qwen2.5's instruct models do) or
beam search, which would make "greedy" differ between checkpoints by a setting no run chose, so both paths decode
without them; a config that sets other processors (forced or suppressed tokens) keeps transformers' ``generate``.

:class:`Generator` chooses the path (``QLitModule.generation``): ``graphs`` insists on the recorded decode step,
``eager`` keeps transformers' ``generate``, ``auto`` records where it can (one CUDA device, an unquantized or 4-bit
base, SDPA or eager attention, full attention in every layer, no prompt-learning adapter) and otherwise runs
``generate``, said in one line on a GPU. A recorded step (rows × cache length, rounded up) serves every later
call of its batch size whose prompt and new tokens its cache holds, until :meth:`Generator.release`. On the CPU
the static-cache loop runs without graphs when asked directly (:func:`greedy`), which is how its tokens are tested
against ``generate``.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Literal

import torch

from qlit.errors import QlitError

log = logging.getLogger(__name__)

GenerationChoice = Literal["auto", "graphs", "eager"]
_CHOICES = ("auto", "graphs", "eager")

#: Decoding steps of a new shape run eagerly (on a side stream) before the step is recorded: lazy set-up (cuBLAS
#: workspaces, kernel selection, the allocator's first blocks) then happens outside the graph.
WARMUP_STEPS = 2
#: Decoding steps between two checks that every row has ended (each check waits for the device).
CHECK_EVERY = 8
#: Cache lengths are rounded up to a multiple of this; a call takes the recorded step of its batch size whose cache
#: holds its prompt and new tokens, so that a pass's batches share a few recordings (masked slots add exact zeros).
LENGTH_STEP = 256
#: Recorded shapes kept at once (each holds a static cache of its rows × length); the least recently used goes first.
KEPT_SHAPES = 8

#: Generation-config settings that change greedy decoding and that both paths switch off (see the module docstring).
PLAIN_GREEDY: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}
#: Generation-config settings the recorded step does not implement: set in a checkpoint's config, they keep
#: transformers' ``generate``.
_PROCESSORS = (
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "min_length",
    "guidance_scale",
    "watermarking_config",
)
#: Attention implementations the recorded step can pass its prepared mask to (transformers' and qlit's, which sends
#: padded batches to SDPA).
_MASKED_ATTENTION = ("sdpa", "eager", "qlit_varlen")


def check_generation(choice: Any, option: str = "model.generation") -> None:
    """Refuse a ``generation`` choice that is not one of ``auto``, ``graphs``, ``eager`` (``option``: its name)."""
    if choice not in _CHOICES:
        raise QlitError(f"{option} must be auto, graphs or eager, got {choice!r}.")


@dataclass
class Generated:
    """One batch's greedy continuations and what they took.

    Args:
        tokens: ``(rows, new)`` generated ids; after a row's end-of-sequence token, ``pad_token_id``.
        prefill_seconds: the prompts' forward pass and the first token (synchronised).
        decode_seconds: every following step.
        decode_steps: the steps ``decode_seconds`` covers (one new token per row each).
        path: ``graphs`` (the recorded step), ``static`` (the static-cache loop, unrecorded) or ``eager``
            (transformers' ``generate``).
    """

    tokens: torch.Tensor
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    path: str

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    def new_tokens(self, eos_token_id: int | Sequence[int] | None) -> int:
        """Tokens generated over all rows: up to and including each row's first end-of-sequence token."""
        eos = _id_list(eos_token_id)
        if not eos:
            return int(self.tokens.numel())
        ended = torch.isin(self.tokens, torch.tensor(eos, device=self.tokens.device))
        before = ended.int().cumsum(dim=1)
        return int(((before == 0) | ((before == 1) & ended)).sum())


def _id_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inner_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (its adapter layers are in it), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _forward_params(model: Any) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _cache_keyword(model: Any) -> str:
    """The forward's name for the KV cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def graph_reasons(model: Any, device: torch.device, allows_graphs: bool) -> list[str]:
    """What the recorded decode step needs that this model lacks (empty: it applies)."""
    inner = inner_model(model)
    config = inner.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = _forward_params(inner)
    peft_configs = getattr(model, "peft_config", None) or {}
    generation_config = getattr(inner, "generation_config", None)
    processors = [name for name in _PROCESSORS if getattr(generation_config, name, None) not in (None, 0, [], {})]
    sharded = any(type(p).__name__ == "DTensor" for p in inner.parameters())
    return [
        reason
        for reason, holds in (
            ("a CUDA device", device.type == "cuda"),
            # The quantization backend says (LLM.int8()'s outlier split and BitNet's layers are not recorded).
            ("an unquantized or 4-bit base", allows_graphs),
            (
                "SDPA or eager attention (model.attn_implementation)",
                getattr(config, "_attn_implementation", None) in _MASKED_ATTENTION,
            ),
            (
                "full attention in every layer (no sliding window)",
                all(kind == "full_attention" for kind in (getattr(text, "layer_types", None) or ["full_attention"])),
            ),
            (
                "an adapter that is not prompt learning",
                not any(getattr(c, "is_prompt_learning", False) for c in peft_configs.values()),
            ),
            ("the model unsharded on one device", not sharded),
            ("a decoder-only model whose forward takes positions", "position_ids" in params),
            (
                f"plain greedy decoding (the checkpoint's generation config sets {', '.join(processors)})",
                not processors,
            ),
        )
        if not holds
    ]


class _StaticDecoder:
    """A static KV cache for ``rows`` × ``length`` tokens, its step's input and output buffers and, on CUDA, the
    decode step recorded as a CUDA graph (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        rows: int,
        length: int,
        device: torch.device,
        eos: list[int],
        pad: int,
        pool: Any = None,
    ) -> None:
        from transformers import StaticCache

        self.model = inner_model(model)
        self.rows, self.length, self.device, self.pad, self.pool = rows, length, device, pad, pool
        self.cache = StaticCache(config=self.model.config, max_cache_len=length)
        params = _forward_params(self.model)
        self.cache_keyword = _cache_keyword(self.model)
        self.keep_last = "logits_to_keep" in params
        # transformers' eager attention adds its mask; the others take it as booleans (True: attend).
        self.additive_mask = getattr(self.model.config, "_attn_implementation", None) == "eager"
        self.mask_dtype = self.model.get_input_embeddings().weight.dtype

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.ids = zeros(rows, 1)  # the token each row feeds to the next step
        self.positions = zeros(rows, 1)
        self.attend = zeros(rows, length, dtype=torch.bool)  # the cache slots each row attends to
        self.out = zeros(rows, length)  # the token chosen after each slot, at the slot's index + 1
        self.slot = zeros(1)  # the cache slot the fed token fills
        self.done = zeros(rows, dtype=torch.bool)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)
        self.eos_bias = zeros(1, dtype=torch.float32)  # -inf while the end-of-sequence token is suppressed
        self.graph: Any = None
        self.warm = 0

    # ----- one call -------------------------------------------------------------------------------------------------
    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        min_new_tokens: int,
        record: bool,
    ) -> Generated:
        prompt = input_ids.shape[1]
        _synchronize(self.device)
        start = perf_counter()
        self._prefill(input_ids, attention_mask, min_new_tokens)
        _synchronize(self.device)
        prefilled = perf_counter()
        steps = 0
        for k in range(1, max_new_tokens):
            if k == min_new_tokens:
                self.eos_bias.zero_()
            if (k - 1) % CHECK_EVERY == 0 and bool(self.done.all()):
                break
            self._advance(record)
            steps += 1
        _synchronize(self.device)
        end = perf_counter()
        tokens = self.out[:, prompt : prompt + 1 + steps].clone()
        return Generated(
            _trim(tokens, self.eos), prefilled - start, end - prefilled, steps, "graphs" if record else "static"
        )

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, min_new_tokens: int) -> None:
        prompt = input_ids.shape[1]
        self.cache.reset()
        self.attend.zero_()
        self.attend[:, :prompt] = attention_mask.bool()
        self.done.zero_()
        self.eos_bias.fill_(-float("inf") if min_new_tokens > 0 else 0.0)
        # transformers' positions for a left-padded prompt: counted from each row's first real token.
        positions = attention_mask.long().cumsum(-1) - 1
        positions.masked_fill_(attention_mask == 0, 0)
        causal = torch.ones(prompt, self.length, dtype=torch.bool, device=self.device).tril()
        logits = self._forward(input_ids, positions, self.attend[:, None, None, :] & causal)
        self.positions.copy_(positions[:, -1:])
        self.slot.fill_(prompt)
        self._choose(logits, self.slot)

    def _step(self) -> None:
        """One decoding step, reading and writing only the decoder's own buffers (what a CUDA graph replays)."""
        self.attend.index_fill_(1, self.slot, True)
        logits = self._forward(self.ids, self.positions, self.attend[:, None, None, :])
        self._choose(logits, self.slot + 1)
        self.slot.add_(1)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        mask = allowed
        if self.additive_mask:
            mask = torch.zeros(allowed.shape, dtype=self.mask_dtype, device=self.device)
            mask = mask.masked_fill(~allowed, torch.finfo(self.mask_dtype).min)
        kwargs: dict[str, Any] = {self.cache_keyword: self.cache}
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()

    def _choose(self, scores: torch.Tensor, index: torch.Tensor) -> None:
        """The greedy token of each row, as transformers' loop picks it: end-of-sequence suppressed by its bias,
        a finished row's token the padding one; written at ``index`` of the output and fed to the next step."""
        if self.eos.numel():
            scores[:, self.eos] = scores[:, self.eos] + self.eos_bias
        token = scores.argmax(dim=-1)
        token = torch.where(self.done, torch.full_like(token, self.pad), token)
        self.done |= (token[:, None] == self.eos).any(dim=1)  # a comparison: isin may sort, and a sort may sync
        self.out.index_copy_(1, index, token[:, None])
        self.ids.copy_(token[:, None])
        self.positions.add_(1)

    # ----- recording ------------------------------------------------------------------------------------------------
    def _advance(self, record: bool) -> None:
        if not record:
            self._step()
        elif self.graph is not None:
            self.graph.replay()
        elif self.warm < WARMUP_STEPS:
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._step()
            current.wait_stream(side)
            self.warm += 1
        else:
            graph = torch.cuda.CUDAGraph()
            # A cast cached by autocast while recording would be read outside the graph: recorded without the cache.
            with torch.autocast(
                "cuda",
                dtype=torch.get_autocast_dtype("cuda"),
                enabled=torch.is_autocast_enabled("cuda"),
                cache_enabled=False,
            ):
                # thread_local: a DataLoader's pinning thread may call CUDA while this thread records.
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    self._step()
            self.graph = graph
            graph.replay()  # recording ran nothing


def _trim(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """``tokens`` cut after the step where every row had ended, where transformers' loop stops."""
    if not eos.numel() or not tokens.shape[1]:
        return tokens
    ended = torch.isin(tokens, eos).int().cumsum(dim=1) > 0
    running = (~ended).sum(dim=0)  # rows still running after each step
    stopped = (running == 0).nonzero()
    return tokens[:, : int(stopped[0]) + 1] if len(stopped) else tokens


def _cache_length(prompt: int, max_new_tokens: int, cache_length: int | None) -> int:
    needed = prompt + max_new_tokens
    if cache_length is not None and cache_length >= needed:
        return cache_length
    return -(-needed // LENGTH_STEP) * LENGTH_STEP


@torch.no_grad()
def greedy(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    min_new_tokens: int = 0,
    cache_length: int | None = None,
) -> Generated:
    """The static-cache loop on any device, without recording: greedy continuations of left-padded prompts
    (``input_ids`` ``(rows, prompt)``) that are ``generate(do_sample=False)``'s tokens."""
    eos, pad = _special_ids(model, eos_token_id, pad_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows, prompt = input_ids.shape
    decoder = _StaticDecoder(
        model, rows, _cache_length(prompt, max_new_tokens, cache_length), input_ids.device, eos, pad
    )
    return decoder.run(input_ids, attention_mask, max_new_tokens, min_new_tokens, record=False)


@torch.no_grad()
def eager_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    min_new_tokens: int = 0,
) -> Generated:
    """transformers' ``generate``, greedy without the checkpoint's penalties (:data:`PLAIN_GREEDY`), timed: the
    prefill ends where the first token's scores are ready (a logits processor takes the time)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    device = input_ids.device

    class _Clock(LogitsProcessor):
        first: float | None = None

        def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.first is None:
                _synchronize(device)
                self.first = perf_counter()
            return scores

    eos, pad = _special_ids(model, eos_token_id, pad_token_id)
    clock = _Clock()
    _synchronize(device)
    start = perf_counter()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=eos or None,
        logits_processor=LogitsProcessorList([clock]),
        **PLAIN_GREEDY,
    )
    _synchronize(device)
    end = perf_counter()
    new = out[:, input_ids.shape[1] :]
    first = clock.first if clock.first is not None else end
    return Generated(new, first - start, end - first, max(new.shape[1] - 1, 0), "eager")


def _special_ids(
    model: Any, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None
) -> tuple[list[int], int]:
    """The end-of-sequence ids and the padding id, as ``generate`` resolves them: the given ones (``None`` or none),
    else the model's generation config's, padding falling back to the first end-of-sequence id."""
    config = getattr(inner_model(model), "generation_config", None)
    eos = _id_list(eos_token_id) or _id_list(getattr(config, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)


class Generator:
    """Greedy generation for a module: the recorded decode step where it applies, else transformers' ``generate``
    (see the module docstring).

    Args:
        choice: ``auto``, ``graphs`` (insist: an error where the recorded step cannot apply) or ``eager``.
        option: the choice's name in error messages.
    """

    def __init__(self, choice: GenerationChoice = "auto", option: str = "model.generation") -> None:
        check_generation(choice, option)
        self.choice = choice
        self.option = option
        #: Why the recorded step does not apply (or failed), once known; ``None`` while it may.
        self.off_because: str | None = None
        self._checked: int | None = None  # id of the model the reasons were checked for
        self._decoders: OrderedDict[tuple[Any, ...], _StaticDecoder] = OrderedDict()
        self._pool: Any = None

    @torch.no_grad()
    def generate(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None,
        min_new_tokens: int = 0,
        allows_graphs: bool = True,
        cache_length: int | None = None,
    ) -> Generated:
        """Greedy continuations of left-padded prompts.

        Args:
            model: the transformers or peft model.
            input_ids: ``(rows, prompt)`` prompts, left-padded.
            attention_mask: their mask (``None``: no padding).
            max_new_tokens: the most tokens each row generates.
            eos_token_id: the end-of-sequence id(s) a row stops at (``None``: the model's generation config's).
            pad_token_id: what a finished row gets (``None``: the config's, or the first end-of-sequence id).
            min_new_tokens: end-of-sequence is suppressed until this many tokens.
            allows_graphs: whether the quantization backend lets its layers be recorded.
            cache_length: the static cache's length (at least prompt plus new tokens; ``None``: that, rounded up),
                so that calls with different prompts can share one recorded step.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.choice != "eager" and self._applies(model, input_ids.device, allows_graphs):
            # A right-padded batch (no qlit batch is) is left to generate, which pads on whichever side it is given.
            if bool(attention_mask[:, -1].all()):
                try:
                    return self._recorded(
                        model,
                        input_ids,
                        attention_mask,
                        max_new_tokens,
                        eos_token_id,
                        pad_token_id,
                        min_new_tokens,
                        cache_length,
                    )
                except (RuntimeError, AssertionError) as err:  # an operation a CUDA graph cannot record
                    torch.cuda.synchronize(input_ids.device)
                    self.release()
                    self._give_up(f"recording the decode step failed ({str(err).splitlines()[0][:160]})")
        return eager_generate(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            min_new_tokens=min_new_tokens,
        )

    def release(self) -> None:
        """Free the recorded steps and their static caches (the next call records again)."""
        self._decoders.clear()
        self._pool = None

    def _applies(self, model: Any, device: torch.device, allows_graphs: bool) -> bool:
        if self._checked != id(model):  # checked once per model: a refusal is an error or one line
            self._checked = id(model)
            self.off_because = None
            reasons = graph_reasons(model, device, allows_graphs)
            if reasons:
                self.release()
                if self.choice == "graphs":
                    raise QlitError(f"{self.option}: graphs needs {'; '.join(reasons)}: set it to auto or eager.")
                if device.type == "cuda":  # on a GPU, say why the recorded step's speed-up is not there
                    _info(
                        f"Generation runs transformers' generate (the recorded decode step needs {'; '.join(reasons)})."
                    )
                self.off_because = "; ".join(reasons)
        return self.off_because is None

    def _give_up(self, why: str) -> None:
        if self.choice == "graphs":
            raise QlitError(f"{self.option}: graphs cannot record this model's decode step: {why}.")
        _info(f"Generation runs transformers' generate from now on: {why}.")
        self.off_because = why

    def _recorded(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None,
        min_new_tokens: int,
        cache_length: int | None,
    ) -> Generated:
        eos, pad = _special_ids(model, eos_token_id, pad_token_id)
        rows, prompt = input_ids.shape
        length = _cache_length(prompt, max_new_tokens, cache_length)
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        same = (id(model), rows, tuple(eos), pad, autocast)
        # The shortest recorded cache of this kind that holds the call (its prompt and every new token).
        fitting = [k for k in self._decoders if k[:2] + k[3:] == same and k[2] >= prompt + max_new_tokens]
        key = min(fitting, key=lambda k: k[2]) if fitting else (id(model), rows, length, tuple(eos), pad, autocast)
        decoder = self._decoders.get(key)
        if decoder is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            while len(self._decoders) >= KEPT_SHAPES:
                self._decoders.popitem(last=False)
            decoder = _StaticDecoder(model, rows, length, input_ids.device, eos, pad, self._pool)
            self._decoders[key] = decoder
        self._decoders.move_to_end(key)
        return decoder.run(input_ids, attention_mask, max_new_tokens, min_new_tokens, record=True)


def _info(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(message)
