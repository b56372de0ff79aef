"""Training throughput and peak GPU memory of qlit, measured like the common HF Trainer + peft QLoRA recipe.

Random-initialised Qwen2.5-shaped models (weights do not change speed or memory) and random token batches with no
padding, so every configuration is comparable with any other run of the same plan. Prints one JSON line per
configuration; run it in the same GPU session as the recipe you compare against and quote ratios.

    python tools/bench.py '[{"model": "qwen2.5-0.5b", "quant": "nf4", "bs": 8, "seq": 1024, "steps": 20,
                             "warmup": 5, "ckpt": true, "optim": "paged_adamw_32bit"}]'

Keys: model (qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b), quant (nf4 | none), bs, seq, steps (timed), warmup
(untimed), ckpt (gradient checkpointing), optim (paged_adamw_32bit | paged_adamw_8bit | adamw_torch), r (LoRA rank,
default 16), callbacks (true: all of qlit's measurement callbacks, false: none, or a list of memory | throughput |
params | latency | timing), logger (TensorBoard logging on, default true), reentrant (reentrant activation
checkpointing, default true).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from qlit.models.shapes import QWEN25


def model_dir(name: str, root: str = "/tmp/qlit-bench-models") -> str:
    """Save a random bf16 model of the named shape once; later runs reuse it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        config = Qwen2Config(max_position_embeddings=4096, **QWEN25[name])
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return path


class RandomTokens(Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.x = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i], "attention_mask": torch.ones_like(self.x[i])}


class StepTimer(pl.Callback):
    """Wall time of the steps after ``warmup``, and the peak memory over them."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.start = warmup, 0, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
            torch.cuda.reset_peak_memory_stats()


def optimizer(name: str):
    import bitsandbytes as bnb

    classes = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_torch": torch.optim.AdamW,
    }
    return functools.partial(classes[name], lr=2e-4)


def run(
    model: str,
    quant: str,
    bs: int,
    seq: int,
    steps: int,
    warmup: int,
    ckpt: bool,
    optim: str,
    r: int = 16,
    callbacks: bool | list[str] = True,
    logger: bool = True,
    reentrant: bool = True,
) -> dict[str, Any]:
    from peft import LoraConfig

    from qlit.callbacks import ALWAYS_ON
    from qlit.callbacks.flops import flops_per_token
    from qlit.models.quantization import Quantization
    from qlit.module import QLitModule

    path = model_dir(model)
    torch.cuda.reset_peak_memory_stats()
    module = QLitModule(
        pretrained=path,
        dtype="bfloat16",
        quantization=Quantization(mode=quant, compute_dtype="bfloat16") if quant != "none" else Quantization(),
        adapter=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        optimizer=optimizer(optim),
        save_adapter=False,
    )
    timer = StepTimer(warmup)
    available = {key: cls for key, cls in ALWAYS_ON.items() if key not in ("interrupt", "predictions")}
    chosen = list(available) if callbacks is True else list(callbacks or [])
    extra = [available[name]() for name in chosen]
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps + warmup,
        logger=pl.loggers.TensorBoardLogger("/tmp/qlit-bench-logs") if logger else False,
        callbacks=[timer, *extra],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    data = DataLoader(
        RandomTokens(bs * (steps + warmup), seq, QWEN25[model]["vocab_size"]),
        batch_size=bs,
        num_workers=2,
        pin_memory=True,
    )
    trainer.fit(module, train_dataloaders=data)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - timer.start
    tokens_per_s = bs * seq * steps / elapsed
    config = module.model.config
    out = dict(
        tool="qlit",
        model=model,
        quant=quant,
        bs=bs,
        seq=seq,
        ckpt=ckpt,
        optim=optim,
        r=r,
        callbacks=chosen,
        logger=logger,
        reentrant=reentrant,
        tokens_per_s=round(tokens_per_s),
        peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
        mfu=round(flops_per_token(config, seq) * tokens_per_s / 989.5e12, 4),
        step_s=round(elapsed / steps, 4),
    )
    del trainer, module
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    for spec in json.loads(sys.argv[1]):
        try:
            print(json.dumps(run(**spec)), flush=True)
        except Exception as err:  # report and go on with the rest of the plan
            print(json.dumps(dict(error=repr(err)[:500], **spec)), flush=True)
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
