"""qlit: fine-tune quantized Hugging Face language models with PEFT adapters, one YAML file per experiment."""

import logging as _logging

# bitsandbytes warns on every CPU import that an optional kernels package is missing; it runs without it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"
