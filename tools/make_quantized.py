"""Quantize a model with GPTQ (or AWQ) on the CPU and write it as llm-compressor does: compressed-tensors'
``pack-quantized`` weights, a ``quantization_config`` in ``config.json`` and a ``recipe.yaml`` naming the method.

qlit then loads the directory as it is stored and trains an adapter on it (``quantization.mode: prequantized``).
Meant for the tiny offline models, whose calibration takes seconds; ``qlit-tiny/qwen2-gptq`` is the same build,
made on first use. Run from the repository root::

    python tools/make_quantized.py qlit-tiny/qwen2 my-gptq-model --method gptq --bits 4 --group-size 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlit.errors import QlitError
from qlit.models.loading import resolve_pretrained
from qlit.models.quant.prequantized import METHODS, quantize_checkpoint


def main(argv: list[str] | None = None) -> Path:
    """Parse the arguments and write the quantized model; the directory it went to."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="model directory, or a qlit model name such as qlit-tiny/qwen2")
    parser.add_argument("target", type=Path, help="directory to write the quantized model to (must not exist)")
    parser.add_argument("--method", choices=METHODS, default="gptq")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--group-size", type=int, default=32, help="weights sharing one scale (divides the inputs)")
    parser.add_argument("--calibration-rows", type=int, default=64, help="SST-2 sample sentences to calibrate on")
    parser.add_argument("--device", default="cpu", help="where to calibrate and round (cuda for a large model)")
    args = parser.parse_args(argv)
    if args.target.exists():
        parser.error(f"{args.target} exists: choose a new directory")
    source = resolve_pretrained(args.source)
    return quantize_checkpoint(
        source,
        args.target,
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        calibration_rows=args.calibration_rows,
        device=args.device,
    )


if __name__ == "__main__":
    try:
        print(f"quantized model written to {main()}")
    except QlitError as err:
        sys.exit(f"make_quantized: {err}")
