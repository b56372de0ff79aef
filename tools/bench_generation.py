"""Greedy generation speed on one GPU: qlit's recorded decode step against transformers' eager ``generate``.

Two measurements, on random-initialised Qwen2.5-shaped models (weights do not change speed) with LoRA r=16 on every
linear layer (its B matrices drawn, so the adapter changes the outputs):

    python tools/bench_generation.py decode    # prefill and ms per new token, batch 1 and 8, per model and base
    python tools/bench_generation.py squad     # the SQuAD v1.1 validation size (10,570 rows) through qlit validate

``decode`` times both paths on the same model and prompts, best of three after a warm-up (the recording), 32 new
tokens per row, and counts the rows whose tokens are the same. ``squad`` validates a Qwen2.5-0.5B-shaped NF4 + LoRA
model (``qlit-random/qwen2.5-0.5b``: the tiny tokenizer, whose prompts are longer in tokens than Qwen's) on 10,570
rows cycled from the bundled SQuAD sample, every row generated for (``generate_val_samples: auto`` under
``validate``), with ``configs/qwen_qlora_squad.yaml``'s batch and answer length; then ``generate`` on the first
``--eager-rows`` rows, for its time per row. Random weights rarely end an answer early: every row takes all its new
tokens, the slowest case. One JSON line per measurement, a table last.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import model_dir  # noqa: E402  # the same saved random models as the training bench

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")
#: The SQuAD v1.1 validation split's size.
SQUAD_ROWS = 10_570
#: (model, base) pairs ``decode`` measures: NF4 + LoRA and bf16 + LoRA.
DECODE_PLAN = (
    ("qwen2.5-0.5b", "nf4"),
    ("qwen2.5-0.5b", "none"),
    ("qwen2.5-7b", "nf4"),
    ("qwen2.5-7b", "none"),
)


def _lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _drawn_adapter(module: Any) -> None:
    for name, param in module.model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: an adapter that changes the outputs
            torch.nn.init.normal_(param, std=0.02)


def _module(pretrained: str, quant: str, **kwargs: Any) -> Any:
    from qlit.models.quantization import Quantization
    from qlit.module import QLitModule

    torch.manual_seed(0)
    quantization = Quantization(mode=quant, double_quant=True) if quant != "none" else Quantization()
    return QLitModule(pretrained=pretrained, quantization=quantization, dtype="bfloat16", adapter=_lora(), **kwargs)


def _timed(generate: Any) -> Any:
    """Best of three by decode time, after a warm-up (and, for the recorded step, the recording)."""
    generate()
    return min((generate() for _ in range(3)), key=lambda o: o.decode_seconds)


@torch.no_grad()
def _decode_row(module: Any, rows: int, new_tokens: int) -> dict[str, Any]:
    from qlit.generation import eager_generate

    g = torch.Generator().manual_seed(rows)
    lengths = [48 + 7 * r for r in range(rows)]  # mixed prompt lengths, left-padded
    width, vocab = max(lengths), module.model.config.vocab_size
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = torch.randint(5, vocab, (n,), generator=g)
        mask[r, width - n :] = 1
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    eager = _timed(lambda: eager_generate(module.model, ids, mask, **kwargs))
    fast = _timed(lambda: module.generator.generate(module.model, ids, mask, **kwargs))
    line = dict(
        rows=rows,
        path=fast.path,
        generate_prefill_ms=round(1000 * eager.prefill_seconds, 1),
        generate_ms_per_token=round(1000 * eager.decode_seconds / max(eager.decode_steps, 1), 2),
        qlit_prefill_ms=round(1000 * fast.prefill_seconds, 1),
        qlit_ms_per_token=round(1000 * fast.decode_seconds / max(fast.decode_steps, 1), 2),
        same_rows=f"{int((eager.tokens == fast.tokens).all(dim=1).sum())}/{rows}",
    )
    line["speedup"] = round(line["generate_ms_per_token"] / line["qlit_ms_per_token"], 2)
    return line


def decode(models: list[str], new_tokens: int, batches: list[int]) -> list[dict[str, Any]]:
    out = []
    for model, quant in DECODE_PLAN:
        if model not in models:
            continue
        module = _module(model_dir(model), quant, generation="graphs").to(CUDA)
        module.configure_model()
        module.eval()
        _drawn_adapter(module)
        base = "NF4 + LoRA" if quant == "nf4" else "bf16 + LoRA"
        for rows in batches:
            line = dict(measure="decode", model=model, base=base, **_decode_row(module, rows, new_tokens))
            print(json.dumps(line), flush=True)
            out.append(line)
        module.generator.release()
        del module
        gc.collect()
        torch.cuda.empty_cache()
    return out


def squad_rows(directory: Path, rows: int) -> Path:
    """``rows`` validation rows cycled from the bundled SQuAD sample (ids made unique), and its train split."""
    sample = ROOT / "qlit" / "data" / "samples" / "squad"
    source = [json.loads(line) for line in (sample / "validation.jsonl").read_text().splitlines() if line.strip()]
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "validation.jsonl", "w") as f:
        for k, row in zip(range(rows), itertools.cycle(source)):
            f.write(json.dumps({**row, "id": f"{row['id']}-{k}"}) + "\n")
    (directory / "train.jsonl").write_text((sample / "train.jsonl").read_text())
    return directory


def _validate(
    path: Path, generation: str, limit: int | None, batch: int, new_tokens: int, model: str
) -> dict[str, Any]:
    import lightning.pytorch as pl

    from qlit.data import SQuADDataModule

    module = _module(model, "nf4", generation=generation, max_new_tokens=new_tokens)
    data = SQuADDataModule(
        path=str(path),
        tokenizer=model,
        limit_val_samples=limit,
        max_length=768,
        eval_batch_size=batch,
        generate_val_samples="auto",
        cache=False,
    )
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[],
    )
    start = time.perf_counter()
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    wall = time.perf_counter() - start
    seconds, rows = module.task._generated
    out = dict(
        measure="squad",
        path=generation,
        rows=rows,
        batch=batch,
        new_tokens=new_tokens,
        generation_s=round(seconds, 1),
        ms_per_row=round(1000 * seconds / max(rows, 1), 2),
        validate_wall_s=round(wall, 1),
        f1=round(float(metrics.get("val/f1", float("nan"))), 2),
        f1_stderr=round(float(metrics.get("val/f1_stderr", float("nan"))), 2),
    )
    del trainer, module, data
    gc.collect()
    torch.cuda.empty_cache()
    return out


def squad(
    rows: int, eager_rows: int, batch: int, new_tokens: int, model: str = "qlit-random/qwen2.5-0.5b"
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = squad_rows(Path(tmp) / "squad", rows)
        out = [_validate(path, "auto", None, batch, new_tokens, model)]
        print(json.dumps(out[-1]), flush=True)
        if eager_rows:
            out.append(_validate(path, "eager", eager_rows, batch, new_tokens, model))
            print(json.dumps(out[-1]), flush=True)
    return out


def table(lines: list[dict[str, Any]]) -> str:
    text = []
    decodes = [line for line in lines if line["measure"] == "decode"]
    if decodes:
        text += [
            "| model | base | rows | generate: prefill ms, ms/token | qlit: prefill ms, ms/token | decode speed-up "
            "| same tokens |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for d in decodes:
            text.append(
                f"| {d['model']} | {d['base']} | {d['rows']} | {d['generate_prefill_ms']}, "
                f"{d['generate_ms_per_token']} | {d['qlit_prefill_ms']}, {d['qlit_ms_per_token']} | "
                f"{d['speedup']}× | {d['same_rows']} |"
            )
    squads = [line for line in lines if line["measure"] == "squad"]
    if squads:
        text += [
            "",
            "| path | rows generated for | generation s | ms per row | validate wall s |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in squads:
            text.append(
                f"| {s['path']} | {s['rows']:,} | {s['generation_s']} | {s['ms_per_row']} | {s['validate_wall_s']} |"
            )
        if len(squads) == 2 and squads[1]["rows"]:
            per_row = squads[1]["ms_per_row"] / 1000
            text.append(
                f"\n`generate` for all {squads[0]['rows']:,} rows, at its measured time per row: "
                f"{per_row * squads[0]['rows'] / 60:.1f} min; qlit: {squads[0]['generation_s'] / 60:.1f} min."
            )
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measure", nargs="+", choices=("decode", "squad"))
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-7b"], help="decode: the shapes")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="decode: rows per batch")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: new tokens per row")
    parser.add_argument("--rows", type=int, default=SQUAD_ROWS, help="squad: validation rows")
    parser.add_argument("--eager-rows", type=int, default=320, help="squad: rows generate answers (0: none)")
    parser.add_argument("--batch", type=int, default=32, help="squad: eval_batch_size (the SQuAD config's)")
    parser.add_argument("--answer-tokens", type=int, default=16, help="squad: max_new_tokens (the SQuAD config's)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    lines: list[dict[str, Any]] = []
    if "decode" in args.measure:
        lines += decode(args.models, args.new_tokens, args.batches)
    if "squad" in args.measure:
        lines += squad(args.rows, args.eager_rows, args.batch, args.answer_tokens)
    print(f"\n{torch.cuda.get_device_name()}\n{table(lines)}")


if __name__ == "__main__":
    main()
