"""Tiny offline models of real architectures, so the demo and the tests never need a model hub.

A name such as ``qlit-tiny/qwen2`` given where a hub id is expected resolves to a local directory holding a
randomly initialised model of that architecture and a byte-level BPE tokenizer trained on qlit's bundled
samples (with a ChatML chat template for the instruct-style architectures). The directory is built once,
atomically, under the qlit cache and then loaded through the ordinary ``from_pretrained`` path.

``qlit-random/<shape>`` (``qwen2.5-0.5b``, ``gpt2-124m``) is built the same way in a real model's shape, vocabulary
size included (the tiny tokenizer uses the first ids): what a GPU measurement of memory and speed needs, offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from qlit.errors import QlitError
from qlit.io import atomic_dir
from qlit.models.shapes import GPT2_124M, QWEN25, TINY_DECODER, TINY_GPT2
from qlit.paths import SAMPLES_DIR, cache_root

TINY_PREFIX = "qlit-tiny/"
RANDOM_PREFIX = "qlit-random/"
_BUILDER_VERSION = "1"

# ChatML, the format of Qwen2 instruct models; the tiny tokenizer carries it so the chat-template path is real.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2": {"config_class": "Qwen2Config", "chat": True, "config": TINY_DECODER},
    "llama": {"config_class": "LlamaConfig", "chat": True, "config": TINY_DECODER},
    "gpt2": {"config_class": "GPT2Config", "chat": False, "config": TINY_GPT2},
}

#: Real models' shapes with random weights, by the name after ``qlit-random/``.
_SHAPED: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {"config_class": "Qwen2Config", "chat": True, "config": QWEN25["qwen2.5-0.5b"]},
    "gpt2-124m": {"config_class": "GPT2Config", "chat": False, "config": GPT2_124M},
}

#: Tiny models stored quantized, as compressed-tensors writes them (``qlit.models.quant.prequantized``): the
#: architecture and the method that quantizes it, 4-bit weights in groups of 32.
_QUANTIZED: dict[str, dict[str, Any]] = {
    f"{arch}-{method}": {**_ARCHITECTURES[arch], "quantize": method}
    for arch in ("qwen2", "llama")
    for method in ("gptq", "awq")
}

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_VOCAB_SIZE = 1024


def tiny_architectures() -> list[str]:
    """The architectures ``qlit-tiny/<arch>`` can build."""
    return sorted(_ARCHITECTURES)


def is_tiny(name: str) -> bool:
    """Whether ``name`` is a model qlit builds itself: ``qlit-tiny/<arch>`` or ``qlit-random/<shape>``."""
    return name.startswith((TINY_PREFIX, RANDOM_PREFIX))


def stores_quantized(name: str) -> bool:
    """Whether ``name`` is a tiny model qlit builds stored quantized (``qlit-tiny/qwen2-gptq``)."""
    return name.startswith(TINY_PREFIX) and name[len(TINY_PREFIX) :] in _QUANTIZED


def _spec(name: str) -> tuple[str, dict[str, Any]]:
    """The cache folder's stem and the build spec of ``name``."""
    table, prefix = (_SHAPED, RANDOM_PREFIX) if name.startswith(RANDOM_PREFIX) else (_ARCHITECTURES, TINY_PREFIX)
    key = name[len(prefix) :]
    if stores_quantized(name):
        return key, _QUANTIZED[key]
    if key not in table:
        known = [TINY_PREFIX + a for a in [*tiny_architectures(), *sorted(_QUANTIZED)]]
        known += [RANDOM_PREFIX + s for s in sorted(_SHAPED)]
        raise QlitError(f"Unknown qlit model '{name}': qlit builds {', '.join(known)}.")
    return (key if table is _ARCHITECTURES else f"random-{key}"), table[key]


def _corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every string in the bundled samples, in a fixed order."""
    lines: list[str] = []
    for path in sorted(SAMPLES_DIR.rglob("*.jsonl")):
        for raw in path.read_text(encoding="utf-8").splitlines():
            if raw.strip():
                lines.extend(_strings(json.loads(raw)))
    lines.append("The quick brown fox jumps over the lazy dog. 0123456789 $ % , . ; : ! ? ( ) [ ] { } def return")
    return lines


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _fingerprint(spec: dict[str, Any], corpus: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(spec, sort_keys=True).encode())
    h.update(_BUILDER_VERSION.encode())
    for line in corpus:
        h.update(line.encode())
    return h.hexdigest()[:12]


def resolve_tiny(name: str) -> str:
    """Return the local directory of the model ``name`` (``qlit-tiny/<arch>``, ``qlit-random/<shape>``), building it
    on first use."""
    stem, spec = _spec(name)
    corpus = _corpus()
    target = cache_root() / "tiny" / f"{stem}-{_fingerprint(spec, corpus)}"
    if not (target / "config.json").is_file():
        with atomic_dir(target, replace=False) as staging:  # two processes building it: the first one wins
            _build(spec, staging, corpus)
    return str(target)


def build_tokenizer(corpus: list[str], chat: bool):
    """A byte-level BPE tokenizer (GPT-2/Qwen2 style) trained on ``corpus``; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    kwargs: dict[str, Any] = dict(tokenizer_object=tok, pad_token="<|endoftext|>")
    if chat:
        kwargs.update(eos_token="<|im_end|>", bos_token=None)
    else:
        kwargs.update(eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    hf_tok = PreTrainedTokenizerFast(**kwargs)
    if chat:
        hf_tok.chat_template = CHATML_TEMPLATE
    return hf_tok


def build_tiny(arch: str, directory: str | os.PathLike, corpus: list[str] | None = None) -> None:
    """Write a randomly initialised ``arch`` model and its tokenizer to ``directory`` (``save_pretrained`` format)."""
    _build(_ARCHITECTURES[arch], directory, corpus)


def _build(spec: dict[str, Any], directory: str | os.PathLike, corpus: list[str] | None = None) -> None:
    import torch
    import transformers

    tokenizer = build_tokenizer(corpus if corpus is not None else _corpus(), chat=spec["chat"])
    config_cls = getattr(transformers, spec["config_class"])
    options = {"vocab_size": len(tokenizer), **spec["config"]}  # a real shape keeps its own vocabulary size
    config = config_cls(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        **options,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if spec.get("quantize"):
        from qlit.models.quant.prequantized import quantize_checkpoint

        quantize_checkpoint(directory, directory, method=spec["quantize"])
