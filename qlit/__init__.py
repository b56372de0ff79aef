"""qlit: fine-tune quantized Hugging Face language models with PEFT adapters, one YAML file per experiment."""

import logging as _logging

# bitsandbytes warns on every CPU import that an optional kernels package is missing; it runs without it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# torchao, which transformers imports whenever it is installed, says on every import that its kernels built for other
# GPUs could not be loaded, and registers its enums with PyTorch's pytree in a way PyTorch now calls deprecated.
_logging.getLogger("torchao").addFilter(lambda record: not str(record.msg).startswith("Failed to load"))
_logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in str(record.msg))
# bitsandbytes fetches its CPU kernels through the kernels package, which says offline that it skips the hub's
# publisher check of the copy already in its cache: nothing a user of qlit can act on.
_logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not str(record.msg).startswith("Skipping publisher trust check")
)

__version__ = "0.1.0"
