"""``qlit eval`` on a GPU: a Qwen2.5-shaped NF4 + LoRA run scored on a local multiple-choice set, its time and peak
GPU memory, and its per-request log-likelihoods checked against lm-eval's own ``HFLM`` on the same quantized model.

    python tools/eval_gpu_check.py                                     # Qwen2.5-0.5B shapes, 200 documents
    python tools/eval_gpu_check.py --model qwen2.5-7b --docs 500 --batch-size 32
    python tools/eval_gpu_check.py --device cpu --docs 4 --no-reference          # a slow smoke run without a GPU

Nothing is downloaded: the model is random-initialised from qlit's Qwen2.5 shapes (weights do not change the time or
the memory) with the tiny offline tokenizer, the LoRA weights are random, and the documents are written here. The
run folder (``--workdir``, a temporary folder by default) ends up as ``qlit fit`` leaves one, so ``qlit compare
WORKDIR/logs`` shows the scores.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qlit.models.shapes import QWEN25

WORDS = "red green blue seven three river stone quick slow bright dark happy film plot dog cat fish tree".split()
TASK_YAML = """task: gpu_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""


def build_model(name: str, directory: Path, device: torch.device) -> Path:
    """A random bf16 model of the named Qwen2.5 shape, saved with qlit's tiny tokenizer (its ids fit any vocabulary)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from qlit.models.tiny import resolve_tiny

    if not (directory / "config.json").is_file():
        with device:
            model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=4096, **QWEN25[name])).to(torch.bfloat16)
        model.save_pretrained(directory)
        AutoTokenizer.from_pretrained(resolve_tiny("qlit-tiny/qwen2")).save_pretrained(directory)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return directory


def build_run(model_dir: Path, run_dir: Path, rank: int, device: torch.device) -> Path:
    """An NF4 + double-quantization + LoRA adapter saved by qlit in a run folder, as ``qlit fit`` leaves one.

    B is random: peft starts it at zero, which would make the adapter a no-op.
    """
    from peft import LoraConfig
    from torch.utils.tensorboard import SummaryWriter

    from qlit.models.loading import load_tokenizer
    from qlit.models.quantization import Quantization
    from qlit.module import QLitModule

    torch.manual_seed(0)
    module = QLitModule(
        pretrained=str(model_dir),
        quantization=Quantization(mode="nf4", double_quant=True, compute_dtype="bfloat16"),
        adapter=LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear"),
    ).to(device)
    module.configure_model()
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    module.tokenizer = load_tokenizer(str(model_dir))
    module.save_adapter_to(run_dir / "adapter")
    writer = SummaryWriter(log_dir=str(run_dir))  # the run's own training log, as fit writes one
    writer.add_scalar("train/loss", 2.0, global_step=100)
    writer.close()
    del module
    gc.collect()  # the peft model holds reference cycles: free the GPU before the measured evaluation
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run_dir / "adapter"


def write_task(directory: Path, docs: int) -> Path:
    """``docs`` four-choice questions in JSON Lines and the lm-eval task YAML reading them; the YAML's folder."""
    rng = random.Random(0)
    rows = []
    for _ in range(docs):
        question = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
        choices = [" " + " ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for _ in range(4)]
        rows.append({"question": question, "choices": choices, "answer": rng.randrange(4)})
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "gpu_mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "gpu_mc.yaml").write_text(TASK_YAML.format(data=data))
    return directory


def reference(adapter: Path, model_dir: Path, tasks: Path, batch_size: int, device: torch.device) -> list[list[float]]:
    """lm-eval's own run on the quantized base + adapter loaded as a model object: every request's log-likelihood."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlit.models.loading import load_causal_lm
    from qlit.models.quantization import Quantization

    nf4 = Quantization(mode="nf4", double_quant=True, compute_dtype="bfloat16")
    base = load_causal_lm(str(model_dir), quantization=nf4, dtype="auto", device=device)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(adapter), batch_size=batch_size)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    with torch.no_grad():
        out = lm_eval.simple_evaluate(model=lm, tasks=["gpu_mc"], task_manager=manager, log_samples=True)
    return loglikelihoods(out["samples"]["gpu_mc"])


def loglikelihoods(samples: list[dict[str, Any]]) -> list[list[float]]:
    return [[float(r[0][0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(QWEN25), help="shape of the base")
    parser.add_argument("--docs", type=int, default=200, help="multiple-choice documents (four choices each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--workdir", type=Path, help="where the model, run and data go (default: a temporary folder)")
    parser.add_argument("--no-reference", action="store_true", help="skip the check against lm-eval's own HFLM")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("eval_gpu_check: no CUDA GPU here (--device cpu runs it slowly on the CPU).")
    on_gpu = device.type == "cuda"

    from qlit.evaluate import evaluate_model
    from qlit.study.compare import table, to_markdown
    from qlit.study.runs import collect_runs

    work = args.workdir or Path(tempfile.mkdtemp(prefix="qlit-eval-gpu-"))
    model_dir = build_model(args.model, work / "models" / args.model, device)
    adapter = build_run(model_dir, work / "logs" / "eval_gpu_check" / "version_0", args.rank, device)
    tasks = write_task(work / "tasks", args.docs)

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    outcome = evaluate_model(
        "gpu_mc", adapter=adapter, include_path=tasks, batch_size=args.batch_size, log_samples=True, device=args.device
    )
    if on_gpu:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    requests = args.docs * 4
    where = torch.cuda.get_device_name(device) if on_gpu else "the CPU"
    print(f"\nqlit eval, {args.model} NF4 + LoRA r={args.rank}, {args.docs} documents ({requests} requests), "
          f"batch {args.batch_size}, on {where}:")  # fmt: skip
    print(f"  time {seconds:.1f} s (model load included), {requests / seconds:.1f} requests/s")
    if on_gpu:
        print(f"  peak GPU memory allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"  acc {outcome.scores['eval/gpu_mc/acc']:.4f} (random weights: about 0.25)")
    print(f"  results {outcome.path}")
    print(to_markdown(table(collect_runs([outcome.run_dir]))))

    if args.no_reference:
        return
    got = loglikelihoods([json.loads(line) for line in outcome.samples["gpu_mc"].read_text().splitlines()])
    if on_gpu:
        torch.cuda.empty_cache()
    expected = reference(adapter, model_dir, tasks, args.batch_size, device)
    gap = max(abs(a - b) for doc_a, doc_b in zip(got, expected, strict=True) for a, b in zip(doc_a, doc_b, strict=True))
    scale = max(abs(b) for doc in expected for b in doc)
    print(f"  per-request log-likelihoods against lm-eval's HFLM on the same NF4 model: max |difference| {gap:.3g} "
          f"(largest |log-likelihood| {scale:.3g})")  # fmt: skip
    if not math.isfinite(gap) or gap > 1e-3 * max(scale, 1.0):
        print("eval_gpu_check: qlit eval and lm-eval's HFLM disagree", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
