"""The ``qlit`` command's subcommands: what its help lists, and what a study may run (``qlit eval`` for its cells)."""

SUBCOMMANDS = {
    "fit": "train: qlit fit --config configs/demo.yaml",
    "validate": "evaluate a checkpoint on the validation split (--ckpt_path)",
    "test": "evaluate a checkpoint on the test split (--ckpt_path)",
    "predict": "generate for a split or a prompt file; writes predictions.jsonl",
    "export": "merge a trained adapter into a plain transformers model",
    "eval": "score a run on lm-evaluation-harness benchmarks (MMLU, HellaSwag, your own tasks)",
    "compare": "runs side by side: a table, CSV and plots",
    "sweep": "run a study (strategies × axes), one run per cell, then a report",
    "board": "TensorBoard on the runs, opening on loss, task metric, memory and tokens/s",
}
