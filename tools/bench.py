"""Training throughput and peak GPU memory of qlit, side by side with the standard QLoRA recipe.

Random-initialised Qwen2.5-shaped models (weights do not change speed or memory) and random token rows. Two
workloads: ``full`` (every row ``seq`` tokens) and ``sft`` (SFT-like lengths: log-normal, median 256, clipped to
[16, seq], seeded), the rows the peer recipe reads, which qlit reads through its own batching (padding-free packing
by a token budget). tokens/s counts real tokens only.

    python tools/bench.py --against-peer PEER.py          # the five-row table: peer and qlit interleaved
    python tools/bench.py --against-peer HF.py TRL.py UNSLOTH.py --lean   # the best peers; qlit also at their memory
    python tools/bench.py --max-context qwen2.5-7b --against-peer UNSLOTH.py   # the longest row that trains
    python tools/bench.py --against-peer PEER.py --set cuda_graphs=false  # the same, qlit with other options
    python tools/bench.py --ablation                      # each optimisation added in turn, one process each
    python tools/bench.py --backends                      # qlit's LoRA on each quantization backend, against NF4
    python tools/bench.py '[{"model": "qwen2.5-0.5b", "workload": "sft", "bs": 8}]'   # qlit alone, JSON lines

``PEER.py`` is a peer's script, run as it is: the standard recipe (transformers ``Trainer`` + peft + bitsandbytes),
TRL's packing ``SFTTrainer`` or Unsloth; each takes a JSON plan and prints one JSON line per configuration
(``--peer-path DIR`` goes first on the peers' ``PYTHONPATH``, for packages only they use). With several peers the
table has a column per peer and qlit's ratios to the fastest peer of each row, speed and peak memory; ``--lean``
adds qlit at a ``memory_budget`` of the leanest peer's peak on that row. Absolute numbers drift between machines
and runs by 5-10 %: compare within one call, by the ratio.

Keys of a qlit spec: model (qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b), workload (full | sft), bs (rows per step; qlit
packs up to ``bs`` × ``seq`` tokens per step, what ``bs`` padded rows can hold), seq (longest row), steps (timed),
warmup (untimed), quant (none, a quantization mode or a built-in study strategy of a backend: nf4, qlora, lora-hqq4,
lora-torchao-int8, torchao-int4, qat-lora, gptq, ...; ``gptq`` is the model quantized by qlit's GPTQ once, then loaded
as stored), ckpt (gradient checkpointing: auto | true | false | layers), optim
(paged_adamw_32bit | paged_adamw_8bit | adamw_torch), r (LoRA rank), packing (default true), max_tokens (the packing
budget; default bs × seq, qlit's default), attention (auto | sdpa), kernels (auto | liger | none), compile (decoder
layers through torch.compile), prepare_kbit (auto, the default: fp32 copies of the frozen norms and embeddings
only for a float16 compute dtype | true: always, the QLoRA recipe), fused_lora (auto, the default | false: peft's
LoRA forward), cuda_graphs (auto, the default: the layers that are not checkpointed replayed as CUDA graphs |
false: eager), memory_budget (GiB, or "auto": ``gradient_checkpointing`` decides), callbacks (true: qlit's
measurement callbacks, false: none), logger (TensorBoard).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from qlit.models.shapes import QWEN25

MODELS_DIR = "/tmp/qlit-bench-models"

#: The table ``--against-peer`` prints: (workload, model, rows per step).
PLAN = (
    ("sft", "qwen2.5-0.5b", 8),
    ("sft", "qwen2.5-7b", 4),
    ("full", "qwen2.5-0.5b", 8),
    ("full", "qwen2.5-1.5b", 8),
    ("full", "qwen2.5-7b", 4),
)


#: ``--ablation``: from the recipe's shape to qlit's defaults, one optimisation added per row, then the opt-in
#: ``compile`` instead of the CUDA graphs.
ABLATION = (
    (
        "padded rows, SDPA, no fused kernels, fp32 frozen weights, peft's LoRA, every layer checkpointed",
        dict(
            packing=False,
            attention="sdpa",
            kernels="none",
            prepare_kbit=True,
            fused_lora=False,
            ckpt=True,
            cuda_graphs=False,
        ),
    ),
    ("+ packing by a token budget, variable-length flash attention", dict(packing=True, attention="auto")),
    ("+ Liger's fused linear + cross-entropy, RMSNorm, RoPE, SwiGLU", dict(kernels="auto")),
    ("+ bf16 frozen weights (`prepare_kbit: auto`)", dict(prepare_kbit="auto")),
    ("+ fused LoRA forward (`fused_lora: auto`)", dict(fused_lora="auto")),
    ("+ `gradient_checkpointing: auto`", dict(ckpt="auto")),
    (
        "+ CUDA graphs of the layers that are not checkpointed (`cuda_graphs: auto`, qlit's defaults)",
        dict(cuda_graphs="auto"),
    ),
    ("`compile: true` instead of the graphs", dict(compile=True, cuda_graphs=False)),
)
#: The workloads ``--ablation`` runs: (workload, model, rows per step).
ABLATION_PLAN = (("sft", "qwen2.5-0.5b", 8), ("full", "qwen2.5-7b", 4))


#: ``--backends``: the quantization backends qlit trains LoRA on, as ``quant`` spec values (NF4 + double quantization,
#: the QLoRA recipe's, first: the ratios' reference), and the rows they run on.
BACKENDS = (
    "qlora",
    "lora-int8",
    "lora-hqq4",
    "lora-torchao-int8",
    "torchao-int4",
    "qat-lora",
    "qlora-bitnet",
    "gptq",
    "none",
)
BACKENDS_PLAN = (("full", "qwen2.5-0.5b", 8), ("full", "qwen2.5-7b", 4))
#: ``quant`` values that are not a mode or a backend's study strategy.
EXTRA_QUANT: dict[str, dict[str, Any]] = {
    "torchao-int4": {"mode": "torchao", "scheme": "int4_weight_only"},
    "gptq": {"mode": "prequantized"},
}


def quantization_fields(quant: str) -> dict[str, Any]:
    """The ``Quantization`` fields of a ``quant`` spec value (see the module docstring)."""
    from qlit.models.quant.base import backend_modes, backend_strategies

    if quant in EXTRA_QUANT:
        return dict(EXTRA_QUANT[quant])
    strategies = backend_strategies()
    if quant in strategies:
        fields = {k: v for k, v in strategies[quant].items() if k != "lora" and v is not None}
        return fields
    if quant in backend_modes():
        return {"mode": quant}
    known = ", ".join(dict.fromkeys([*backend_modes(), *strategies, *EXTRA_QUANT]))
    raise SystemExit(f"quant {quant!r}: expected one of {known}.")


def gptq_dir(name: str) -> str:
    """The model of :func:`model_dir`, quantized once by qlit's GPTQ (4 bits, groups of 128, 16 calibration rows:
    speed and memory do not depend on the calibration) and saved as compressed-tensors stores it."""
    from qlit.models.loading import load_tokenizer
    from qlit.models.quant.prequantized import quantize_checkpoint

    source, target = model_dir(name), os.path.join(MODELS_DIR, f"{name}-gptq")
    if not os.path.isfile(os.path.join(target, "config.json")):
        if not os.path.isfile(os.path.join(source, "tokenizer_config.json")):  # calibration text needs a tokenizer
            load_tokenizer("qlit-random/qwen2.5-0.5b").save_pretrained(source)
        quantize_checkpoint(source, target, method="gptq", bits=4, group_size=128, calibration_rows=16, device="cuda")
    return target


def model_dir(name: str) -> str:
    """Save a random bf16 model of the named shape once; later runs (and the peer) reuse it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = os.path.join(MODELS_DIR, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        config = Qwen2Config(max_position_embeddings=4096, **QWEN25[name])
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return path


def workload_rows(workload: str, n: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """The peer recipe's rows, draw for draw (seed 0): the same generator calls in the same order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    if workload == "sft":
        lengths = torch.exp(torch.randn(n, generator=g) * 0.8 + torch.log(torch.tensor(256.0)))
        sizes = lengths.clamp(16, seq).long().tolist()
    else:
        sizes = [seq] * n
    rows = []
    for i, size in enumerate(sizes):
        ids = x[i, :size].tolist()
        rows.append({"input_ids": ids, "labels": ids, "prompt_length": 0})
    return rows


class StepTimer:
    """Wall time and real tokens of the steps after ``warmup``, and the peak memory over them.

    The clock stops at the end of the last timed step, not when ``fit`` returns: Lightning's tear-down (moving the
    model back to the CPU, seconds for a 7B model) is not training.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        import lightning.pytorch as pl

        timer = self

        class _Callback(pl.Callback):
            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
                timer.tick(batch)

        self.callback = _Callback()
        self.warmup, self.steps, self.done = warmup, steps, 0
        self.start = self.end = 0.0
        self.tokens: list[torch.Tensor] = []

    def tick(self, batch: dict[str, Any]) -> None:
        self.done += 1
        if self.done > self.warmup:
            self.tokens.append(batch["attention_mask"].sum())  # summed at the end: no sync per step
        if self.done == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
            torch.cuda.reset_peak_memory_stats()
        elif self.done == self.warmup + self.steps:
            torch.cuda.synchronize()
            self.end = time.perf_counter()


def optimizer(name: str) -> Any:
    import bitsandbytes as bnb

    classes = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_torch": torch.optim.AdamW,
    }
    return functools.partial(classes[name], lr=2e-4)


def run(
    model: str,
    workload: str = "full",
    bs: int = 8,
    seq: int = 1024,
    steps: int = 20,
    warmup: int = 5,
    quant: str = "nf4",
    ckpt: bool | int | str = "auto",
    optim: str = "paged_adamw_32bit",
    r: int = 16,
    packing: bool = True,
    max_tokens: int | None = None,
    attention: str = "auto",
    kernels: str = "auto",
    callbacks: bool = True,
    logger: bool = True,
    compile: bool = False,
    prepare_kbit: bool | str = "auto",
    fused_lora: bool | str = "auto",
    cuda_graphs: bool | str = "auto",
    memory_budget: float | str = "auto",
) -> dict[str, Any]:
    """Train qlit on one configuration and return its measurements."""
    import lightning.pytorch as pl
    from peft import LoraConfig

    from qlit.callbacks import ALWAYS_ON
    from qlit.callbacks.params import weight_bytes
    from qlit.data.batching import Collator, PackingCollator, data_loader
    from qlit.models.quantization import Quantization
    from qlit.module import QLitModule

    fields = quantization_fields(quant) if quant != "none" else {}
    path = gptq_dir(model) if fields.get("mode") == "prequantized" else model_dir(model)
    gc.collect()  # nothing of an earlier run in this process may count in this one's peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    module = QLitModule(
        pretrained=path,
        dtype="bfloat16",
        attn_implementation=attention,
        kernels=kernels,
        quantization=Quantization(**fields),
        adapter=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        gradient_checkpointing=ckpt,
        compile=compile,
        prepare_kbit=prepare_kbit,
        fused_lora=fused_lora,
        cuda_graphs=cuda_graphs,
        memory_budget=memory_budget,
        optimizer=optimizer(optim),
        save_adapter=False,
    )
    timer = StepTimer(warmup, steps)
    measuring = [ALWAYS_ON[key]() for key in ("params", "memory", "throughput", "timing")] if callbacks else []
    n, vocab = bs * (steps + warmup), QWEN25[model]["vocab_size"]
    # The peer's rows, then spare ones in case packing takes more than bs rows per step.
    rows = workload_rows(workload, n, seq, vocab) + workload_rows(workload, n, seq, vocab, seed=1)
    if packing:
        # qlit's default budget: the tokens of bs rows of the longest length, the padded batch's memory bound.
        budget = max_tokens or bs * seq
        loader = data_loader(rows, PackingCollator(), batch_size=bs, max_tokens=budget, shuffle=False, seed=0)
    else:
        budget = None
        loader = data_loader(rows, Collator(pad_token_id=0), batch_size=bs, shuffle=False, seed=0)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps + warmup,
        logger=pl.loggers.TensorBoardLogger("/tmp/qlit-bench-logs") if logger else False,
        callbacks=[timer.callback, *measuring],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    trainer.fit(module, train_dataloaders=loader)
    elapsed = timer.end - timer.start
    packed = module.quantization.backend.packed_layers(module.model)
    tokens = int(torch.stack(timer.tokens[:steps]).sum())
    out = dict(
        tool="qlit",
        model=model,
        workload=workload,
        bs=bs,
        max_tokens=budget,
        seq=seq,
        quant=quant,
        ckpt=ckpt,
        optim=optim,
        r=r,
        packing=packing,
        compile=compile,
        prepare_kbit=prepare_kbit,
        fused_lora=module.fused_lora_layers,
        cuda_graphs=f"{len(module.graphs.layers)} layers, {module.graphs.replays} replays" if module.graphs else None,
        attention=module.model.config._attn_implementation,
        kernels=module.kernels_applied,
        memory_budget=memory_budget,
        memory_plan=module.memory_plan.line() if module.memory_plan else None,
        checkpointed=module.checkpointed_layers,
        tokens_per_s=round(tokens / elapsed),
        # The graphs' pool holds the activations they keep between replays outside the allocated count: add it.
        peak_alloc_gib=round((torch.cuda.max_memory_allocated() + module.graph_held_bytes) / 2**30, 2),
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
        step_s=round(elapsed / steps, 4),
        weight_gib=round(weight_bytes(module.model, packed) / 2**30, 3),
        technique=_technique(module),
    )
    del trainer, module
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _technique(module: Any) -> str | None:
    """How a study names the technique a run trained (``QLoRA (NF4 + DQ)``, ``HQQ 4-bit + LoRA``)."""
    from qlit.study.techniques import technique

    q = module.quantization
    return technique(q.mode, "LoraConfig", q.uses_double_quant, "bfloat16", q.bits, q.scheme)


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _subprocess(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [line for line in _json_lines(done.stdout) if "tokens_per_s" in line or "error" in line]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return lines[-1]


#: What each peer's script takes beyond the standard recipe's plan keys, per workload: Unsloth's own checkpointing
#: (activations offloaded to host memory) and, on SFT-length rows, its padding-free packed rows.
PEER_KEYS: dict[str, Any] = {
    "peer_unsloth": lambda workload: dict(padding_free=workload == "sft"),
}


def _peer_name(peer: str) -> str:
    return os.path.splitext(os.path.basename(peer))[0]


def _peer_env(peer_path: str | None) -> dict[str, str] | None:
    if not peer_path:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (peer_path, env.get("PYTHONPATH")) if p)
    return env


def _link_models(model: str) -> None:
    """The peers read their models from /tmp/models/NAME: the same saved model as qlit's."""
    env_models = os.path.join("/tmp", "models")
    os.makedirs(env_models, exist_ok=True)
    link = os.path.join(env_models, model)
    if not os.path.lexists(link):  # a link left dangling by a removed model stays (it resolves again)
        os.symlink(os.path.join(MODELS_DIR, model), link)


def run_peer(peer: str, spec: dict[str, Any], peer_path: str | None = None) -> dict[str, Any]:
    """One configuration of a peer's script, in its own process."""
    extra = PEER_KEYS.get(_peer_name(peer))
    spec = {**spec, **(extra(spec["lengths"]) if extra else {})}
    return _subprocess([sys.executable, peer, json.dumps([spec])], env=_peer_env(peer_path))


def against_peer(
    peers: str | list[str],
    steps: int,
    warmup: int,
    plan: list[tuple[str, str, int]],
    options: dict[str, Any] | None = None,
    lean: bool = False,
    peer_path: str | None = None,
) -> list[dict[str, Any]]:
    """Run each peer and qlit (its defaults, changed by ``options``; with ``lean`` also at a memory budget of the
    leanest peer's peak) on each row of ``plan``, interleaved, each in its own process."""
    peers = [peers] if isinstance(peers, str) else peers
    results = []
    for workload, model, bs in plan:
        model_dir(model)  # all read the same saved model
        _link_models(model)
        peer_spec = dict(
            name=model, quant="nf4", bs=bs, seq=1024, steps=steps, warmup=warmup, ckpt=True,
            optim="paged_adamw_32bit", lengths=workload,
        )  # fmt: skip
        outs = {_peer_name(peer): run_peer(peer, peer_spec, peer_path) for peer in peers}
        qlit_spec = dict(model=model, workload=workload, bs=bs, steps=steps, warmup=warmup, **(options or {}))
        qlit_out = _subprocess([sys.executable, __file__, json.dumps([qlit_spec])])
        row = dict(workload=workload, model=model, bs=bs, peers=outs, qlit=qlit_out)
        if len(peers) == 1:
            row["peer"] = next(iter(outs.values()))
        peaks = [out["peak_alloc_gib"] for out in outs.values() if "tokens_per_s" in out]
        if lean and peaks:
            lean_spec = {**qlit_spec, "memory_budget": min(peaks), "ckpt": "auto"}
            row["lean"] = _subprocess([sys.executable, __file__, json.dumps([lean_spec])])
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def trains_at(tool: str, model: str, length: int, memory_budget: Any, peer_path: str | None) -> dict[str, Any]:
    """Train one packed row of ``length`` tokens for 3 steps (the last 2 timed) with qlit or a peer's script."""
    if tool == "qlit":
        spec = dict(
            model=model, workload="full", bs=1, seq=length, steps=2, warmup=1, memory_budget=memory_budget,
            callbacks=False, logger=False,
        )  # fmt: skip
        return _subprocess([sys.executable, __file__, json.dumps([spec])])
    spec = dict(
        name=model, quant="nf4", bs=1, seq=length, steps=2, warmup=1, ckpt=True, optim="paged_adamw_32bit",
        lengths="full",
    )  # fmt: skip
    return run_peer(tool, spec, peer_path)


def max_context(
    tool: str,
    model: str,
    memory_budget: Any = "100%",
    start: int = 8192,
    limit: int = 262144,
    step: int = 4096,
    peer_path: str | None = None,
) -> dict[str, Any]:
    """The longest single packed row ``tool`` trains without running out of memory: doubling from ``start``, then
    bisecting to ``step`` tokens; with tokens/s and peak memory at that length."""
    model_dir(model)
    _link_models(model)
    tries: dict[int, dict[str, Any]] = {}

    def ok(length: int) -> bool:
        tries[length] = out = trains_at(tool, model, length, memory_budget, peer_path)
        print(
            json.dumps(
                dict(tool=tool, length=length, **{k: out.get(k) for k in ("tokens_per_s", "peak_alloc_gib", "error")})
            ),
            flush=True,
        )
        return "tokens_per_s" in out

    good, bad = 0, None
    length = start
    while length <= limit:
        if not ok(length):
            bad = length
            break
        good, length = length, length * 2
    if bad is not None:
        while bad - good > step:
            mid = (good + bad) // 2 // step * step
            if mid <= good:
                break
            if ok(mid):
                good = mid
            else:
                bad = mid
    best = tries.get(good, {})
    return dict(
        tool=tool if tool == "qlit" else _peer_name(tool), model=model, longest=good, failed_at=bad,
        tokens_per_s=best.get("tokens_per_s"), peak_alloc_gib=best.get("peak_alloc_gib"),
    )  # fmt: skip


def ablation(steps: int, warmup: int, plan: list[tuple[str, str, int]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Run qlit with each row of :data:`ABLATION` added in turn, on each workload of ``plan``, each in its own
    process; return (row label, one result per workload)."""
    rows: list[tuple[str, list[dict[str, Any]]]] = [(label, []) for label, _ in ABLATION]
    for workload, model, bs in plan:
        model_dir(model)
        spec: dict[str, Any] = dict(model=model, workload=workload, bs=bs, steps=steps, warmup=warmup)
        for (label, change), (_, results) in zip(ABLATION, rows, strict=True):
            spec.update(change)
            out = _subprocess([sys.executable, __file__, json.dumps([spec])])
            print(json.dumps(dict(row=label, **out)), flush=True)
            results.append(out)
    return rows


def backends(
    steps: int, warmup: int, plan: list[tuple[str, str, int]], quants: tuple[str, ...] = BACKENDS
) -> list[tuple[str, list[dict[str, Any]]]]:
    """qlit's defaults with the base stored by each of ``quants`` (the first is the reference), on each row of
    ``plan``, each in its own process; return (quant, one result per row)."""
    rows: list[tuple[str, list[dict[str, Any]]]] = [(quant, []) for quant in quants]
    for workload, model, bs in plan:
        model_dir(model)
        for quant, results in rows:
            spec = dict(model=model, workload=workload, bs=bs, steps=steps, warmup=warmup, quant=quant)
            out = _subprocess([sys.executable, __file__, json.dumps([spec])])
            print(json.dumps(dict(backend=quant, **out)), flush=True)
            results.append(out)
    return rows


def backends_table(plan: list[tuple[str, str, int]], rows: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """Per backend and row: tokens/s, peak GiB and weight GiB, and the three as ratios to the first backend's."""
    heads = [
        f"{model} `{workload}`, {bs}: tokens/s, peak GiB, weight GiB (× {rows[0][0]})" for workload, model, bs in plan
    ]
    lines = ["| technique | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(plan)]
    reference = rows[0][1]
    for quant, results in rows:
        named = next((r["technique"] for r in results if r.get("technique")), quant)
        cells = []
        for out, ref in zip(results, reference, strict=True):
            if "tokens_per_s" not in out:
                cells.append(f"error: {str(out.get('error'))[:80]}")
                continue
            ratios = ", ".join(_ratio(out, ref, key) for key in ("tokens_per_s", "peak_alloc_gib", "weight_gib"))
            cells.append(f"{out['tokens_per_s']:,}, {out['peak_alloc_gib']:.2f}, {out['weight_gib']:.2f} ({ratios})")
        lines.append(f"| {named} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(r: dict[str, Any]) -> str:
    if "tokens_per_s" not in r:
        return f"error: {str(r.get('error'))[:60]}"
    return f"{r['tokens_per_s']:,} ({r['peak_alloc_gib']:.2f})"


def ablation_table(plan: list[tuple[str, str, int]], rows: list[tuple[str, list[dict[str, Any]]]]) -> str:
    heads = [f"{model} `{workload}`, {bs}: tokens/s (peak GiB)" for workload, model, bs in plan]
    lines = ["| qlit configuration | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(plan)]
    lines += [f"| {label} | " + " | ".join(_cell(r) for r in results) + " |" for label, results in rows]
    return "\n".join(lines)


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    if key in a and key in b and b[key]:
        return f"{a[key] / b[key]:.2f}×"
    return "—"


def table(results: list[dict[str, Any]]) -> str:
    """One line per row: each peer's tokens/s (peak GiB), qlit's (and the lean budget's), and qlit's ratios to the
    fastest peer of the row (speed, then peak memory; the lean run's memory against the leanest peer)."""
    names = list(results[0]["peers"]) if results and "peers" in results[0] else ["peer"]
    lean = any("lean" in row for row in results)
    heads = [f"{name} tokens/s (GiB)" for name in names] + ["qlit tokens/s (GiB)", "qlit / best: speed, memory"]
    if lean:
        heads += ["qlit lean tokens/s (GiB)", "lean / leanest: speed, memory"]
    lines = ["| workload | model, batch | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    for row in results:
        peers = row.get("peers") or {"peer": row["peer"]}
        ran = [out for out in peers.values() if "tokens_per_s" in out]
        best = max(ran, key=lambda out: out["tokens_per_s"], default={})
        leanest = min(ran, key=lambda out: out["peak_alloc_gib"], default={})
        cells = [_cell(peers[name]) for name in names] + [_cell(row["qlit"])]
        cells.append(f"{_ratio(row['qlit'], best, 'tokens_per_s')}, {_ratio(row['qlit'], best, 'peak_alloc_gib')}")
        if lean:
            out = row.get("lean", {})
            cells += [_cell(out), f"{_ratio(out, leanest, 'tokens_per_s')}, {_ratio(out, leanest, 'peak_alloc_gib')}"]
        lines.append(f"| {row['workload']} | {row['model']}, {row['bs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plan(only: list[str] | None, default: tuple[tuple[str, str, int], ...]) -> list[tuple[str, str, int]]:
    if not only:
        return list(default)
    plan = []
    for row in only:
        parts = row.split(":")
        if len(parts) != 3 or parts[0] not in ("full", "sft") or parts[1] not in QWEN25 or not parts[2].isdigit():
            raise SystemExit(
                f"--only {row!r}: expected WORKLOAD:MODEL:BS, e.g. full:qwen2.5-1.5b:8 (workload full or sft, model "
                f"one of {', '.join(sorted(QWEN25))})."
            )
        plan.append((parts[0], parts[1], int(parts[2])))
    return plan


def _options(pairs: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as qlit spec keys (values read as JSON where they parse: true, 8; else text)."""
    import inspect

    fixed = {"model", "workload", "bs", "steps", "warmup"}  # what the table's rows and --steps/--warmup set
    known = sorted(set(inspect.signature(run).parameters) - fixed)
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(known)}.")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", nargs="?", help="JSON list of qlit specs (see the module docstring)")
    parser.add_argument(
        "--against-peer", nargs="+", metavar="PEER.py", help="peers' scripts, run as they are (one column each)"
    )
    parser.add_argument("--peer-path", metavar="DIR", help="put first on the peers' PYTHONPATH (their own packages)")
    parser.add_argument("--lean", action="store_true", help="also qlit at a memory budget of the leanest peer's peak")
    parser.add_argument("--max-context", metavar="MODEL", help="the longest packed row MODEL trains, qlit and peers")
    parser.add_argument("--budget", default="100%", help="--max-context: qlit's memory_budget (GiB or a share)")
    parser.add_argument("--ablation", action="store_true", help="qlit alone, one optimisation added per row")
    parser.add_argument(
        "--backends", nargs="*", metavar="QUANT", help="qlit alone on each quantization backend (default: all)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--only", nargs="*", metavar="WORKLOAD:MODEL:BS", help="rows of the table (the workloads of --ablation)"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        metavar="KEY=VALUE",
        help="with --against-peer: qlit options other than its defaults (spec keys, e.g. cuda_graphs=false)",
    )
    args = parser.parse_args(argv)
    options = _options(args.set)
    if options and not args.against_peer:
        raise SystemExit("--set applies to --against-peer; a JSON plan names its options in each spec.")
    if args.ablation:
        plan = _plan(args.only, ABLATION_PLAN)
        print(ablation_table(plan, ablation(args.steps, args.warmup, plan)))
        return
    if args.backends is not None:
        quants = tuple(args.backends) or BACKENDS
        for quant in quants:
            if quant != "none":
                quantization_fields(quant)  # an unknown name is one sentence before anything runs
        plan = _plan(args.only, BACKENDS_PLAN)
        print(backends_table(plan, backends(args.steps, args.warmup, plan, quants)))
        return
    if args.max_context:
        if args.max_context not in QWEN25:
            raise SystemExit(f"--max-context {args.max_context!r}: expected one of {', '.join(sorted(QWEN25))}.")
        budget = json.loads(args.budget) if args.budget.replace(".", "", 1).isdigit() else args.budget
        rows = [max_context("qlit", args.max_context, budget)]
        rows += [max_context(peer, args.max_context, peer_path=args.peer_path) for peer in args.against_peer or []]
        print("| tool | longest row (tokens) | fails at | tokens/s there | peak GiB |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            cells = (r["tool"], f"{r['longest']:,}", r["failed_at"] or "—", r["tokens_per_s"], r["peak_alloc_gib"])
            print("| " + " | ".join(str(c) for c in cells) + " |")
        return
    if args.against_peer:
        plan = _plan(args.only, PLAN)
        results = against_peer(
            args.against_peer, args.steps, args.warmup, plan, options, lean=args.lean, peer_path=args.peer_path
        )
        if options:  # the table says which qlit it measured
            print("qlit with " + ", ".join(f"{key}={json.dumps(value)}" for key, value in options.items()) + ":")
        print(table(results))
        return
    if not args.plan:
        parser.error("give a JSON plan or --against-peer PEER.py")
    for spec in json.loads(args.plan):
        try:
            print(json.dumps(run(**spec)), flush=True)
        except Exception as err:  # report and go on with the rest of the plan
            print(json.dumps(dict(error=repr(err)[:500], **spec)), flush=True)
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
