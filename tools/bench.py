"""Training throughput and peak GPU memory of qlit, side by side with the standard QLoRA recipe.

Random-initialised Qwen2.5-shaped models (weights do not change speed or memory) and random token rows. Two
workloads: ``full`` (every row ``seq`` tokens) and ``sft`` (SFT-like lengths: log-normal, median 256, clipped to
[16, seq], seeded), the rows the peer recipe reads, which qlit reads through its own batching (padding-free packing
by a token budget). tokens/s counts real tokens only.

    python tools/bench.py --against-peer PEER.py          # the five-row table: peer and qlit interleaved
    python tools/bench.py --against-peer PEER.py --set cuda_graphs=false  # the same, qlit with other options
    python tools/bench.py --ablation                      # each optimisation added in turn, one process each
    python tools/bench.py '[{"model": "qwen2.5-0.5b", "workload": "sft", "bs": 8}]'   # qlit alone, JSON lines

``PEER.py`` is the standard recipe (transformers ``Trainer`` + peft + bitsandbytes), run as it is: it takes a JSON
plan and prints one JSON line per configuration. Absolute numbers drift between machines and runs by 5-10 %:
compare within one call, by the ratio.

Keys of a qlit spec: model (qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b), workload (full | sft), bs (rows per step; qlit
packs up to ``bs`` × ``seq`` tokens per step, what ``bs`` padded rows can hold), seq (longest row), steps (timed),
warmup (untimed), quant (nf4 | none), ckpt (gradient checkpointing: auto | true | false | layers), optim
(paged_adamw_32bit | paged_adamw_8bit | adamw_torch), r (LoRA rank), packing (default true), max_tokens (the packing
budget; default bs × seq, qlit's default), attention (auto | sdpa), kernels (auto | liger | none), compile (decoder
layers through torch.compile), prepare_kbit (auto, the default: fp32 copies of the frozen norms and embeddings
only for a float16 compute dtype | true: always, the QLoRA recipe), fused_lora (auto, the default | false: peft's
LoRA forward), cuda_graphs (auto, the default: the layers that are not checkpointed replayed as CUDA graphs |
false: eager), callbacks (true: qlit's measurement callbacks, false: none), logger (TensorBoard).
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
) -> dict[str, Any]:
    """Train qlit on one configuration and return its measurements."""
    import lightning.pytorch as pl
    from peft import LoraConfig

    from qlit.callbacks import ALWAYS_ON
    from qlit.data.batching import Collator, PackingCollator, data_loader
    from qlit.models.quantization import Quantization
    from qlit.module import QLitModule

    path = model_dir(model)
    gc.collect()  # nothing of an earlier run in this process may count in this one's peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    module = QLitModule(
        pretrained=path,
        dtype="bfloat16",
        attn_implementation=attention,
        kernels=kernels,
        quantization=Quantization(mode=quant) if quant != "none" else Quantization(),
        adapter=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        gradient_checkpointing=ckpt,
        compile=compile,
        prepare_kbit=prepare_kbit,
        fused_lora=fused_lora,
        cuda_graphs=cuda_graphs,
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
        tokens_per_s=round(tokens / elapsed),
        # The graphs' pool holds the activations they keep between replays outside the allocated count: add it.
        peak_alloc_gib=round((torch.cuda.max_memory_allocated() + module.graph_held_bytes) / 2**30, 2),
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
        step_s=round(elapsed / steps, 4),
    )
    del trainer, module
    gc.collect()
    torch.cuda.empty_cache()
    return out


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


def _subprocess(argv: list[str]) -> dict[str, Any]:
    done = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in _json_lines(done.stdout) if "tokens_per_s" in line or "error" in line]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return lines[-1]


def against_peer(
    peer: str, steps: int, warmup: int, plan: list[tuple[str, str, int]], options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run the peer recipe and qlit (its defaults, changed by ``options``) on each row of ``plan``, interleaved, each
    in its own process."""
    results = []
    for workload, model, bs in plan:
        model_dir(model)  # both read the same saved model
        peer_spec = dict(
            name=model, quant="nf4", bs=bs, seq=1024, steps=steps, warmup=warmup, ckpt=True,
            optim="paged_adamw_32bit", lengths=workload,
        )  # fmt: skip
        env_models = os.path.join("/tmp", "models")
        os.makedirs(env_models, exist_ok=True)
        link = os.path.join(env_models, model)
        if not os.path.lexists(link):  # a link left dangling by a removed model stays (it resolves again)
            os.symlink(os.path.join(MODELS_DIR, model), link)
        peer_out = _subprocess([sys.executable, peer, json.dumps([peer_spec])])
        qlit_spec = dict(model=model, workload=workload, bs=bs, steps=steps, warmup=warmup, **(options or {}))
        qlit_out = _subprocess([sys.executable, __file__, json.dumps([qlit_spec])])
        row = dict(workload=workload, model=model, bs=bs, peer=peer_out, qlit=qlit_out)
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


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


def _cell(r: dict[str, Any]) -> str:
    if "tokens_per_s" not in r:
        return f"error: {str(r.get('error'))[:60]}"
    return f"{r['tokens_per_s']:,} ({r['peak_alloc_gib']:.2f})"


def ablation_table(plan: list[tuple[str, str, int]], rows: list[tuple[str, list[dict[str, Any]]]]) -> str:
    heads = [f"{model} `{workload}`, {bs}: tokens/s (peak GiB)" for workload, model, bs in plan]
    lines = ["| qlit configuration | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(plan)]
    lines += [f"| {label} | " + " | ".join(_cell(r) for r in results) + " |" for label, results in rows]
    return "\n".join(lines)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | model, batch | peer tokens/s (peak GiB) | qlit tokens/s (peak GiB) | qlit / peer |",
        "|---|---|---:|---:|---:|",
    ]
    for row in results:
        peer, ours = row["peer"], row["qlit"]
        ratio = (
            f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}×"
            if "tokens_per_s" in ours and "tokens_per_s" in peer
            else "—"
        )
        lines.append(f"| {row['workload']} | {row['model']}, {row['bs']} | {_cell(peer)} | {_cell(ours)} | {ratio} |")
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
    parser.add_argument("--against-peer", metavar="PEER.py", help="the standard recipe's script, run as it is")
    parser.add_argument("--ablation", action="store_true", help="qlit alone, one optimisation added per row")
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
    if args.against_peer:
        plan = _plan(args.only, PLAN)
        results = against_peer(args.against_peer, args.steps, args.warmup, plan, options)
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
