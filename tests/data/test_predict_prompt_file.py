"""`qlit predict` on a file of prompts with a fine-tuned checkpoint: one generation per prompt, in file order."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import ROOT, run_cli, scalars

CONFIG = str(ROOT / "configs/demo_jsonl.yaml")


def test_predict_on_a_prompt_file_with_the_fine_tuned_checkpoint(tmp_path):
    fit = run_cli(
        tmp_path / "fit", "fit", "--config", CONFIG, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"
    )
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    prompts = ["What is the opposite of hot?", "Capitalise the word apple.", "Convert 10 C to Fahrenheit."]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    predict = run_cli(
        tmp_path / "predict",
        "predict",
        "--config",
        CONFIG,
        "--ckpt_path",
        str(ckpt),
        "--data.init_args.path",
        "json",
        "--data.init_args.data_files",
        f"{{test: {prompt_file}}}",
        "--data.init_args.test_split",
        "test",
    )
    rows = [json.loads(line) for line in (Path(predict.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == prompts
    assert all(isinstance(r["generation"], str) and r["reference"] == "" for r in rows)
    # The latency callback timed the generations (a predict step returns rows, not the timing).
    logged = scalars(predict.trainer.log_dir)
    assert logged["predict/latency_ms_mean"][0][1] > 0 and logged["predict/gen_tokens_per_sec"][0][1] > 0
    # The checkpoint's adapter weights were loaded: LoRA B is no longer its zero initialisation.
    lora_b = [p for n, p in predict.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
