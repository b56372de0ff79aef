"""qlit: fine-tune quantized Hugging Face language models with PEFT adapters, one YAML file per experiment."""

__version__ = "0.1.0"
