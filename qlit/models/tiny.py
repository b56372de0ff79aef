"""Tiny offline models of real architectures, so the demo and the tests never need a model hub.

A name such as ``qlit-tiny/qwen2`` given where a hub id is expected resolves to a local directory holding a
randomly initialised model of that architecture and a byte-level BPE tokenizer trained on qlit's bundled
samples (with a ChatML chat template for the instruct-style architectures). The directory is built once,
atomically, under the qlit cache and then loaded through the ordinary ``from_pretrained`` path.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from qlit.errors import QlitError
from qlit.io import atomic_dir
from qlit.models.shapes import TINY_DECODER, TINY_GPT2
from qlit.paths import SAMPLES_DIR, cache_root

TINY_PREFIX = "qlit-tiny/"
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

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_VOCAB_SIZE = 1024


def tiny_architectures() -> list[str]:
    """The architectures ``qlit-tiny/<arch>`` can build."""
    return sorted(_ARCHITECTURES)


def is_tiny(name: str) -> bool:
    return name.startswith(TINY_PREFIX)


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


def _fingerprint(arch: str, corpus: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(_ARCHITECTURES[arch], sort_keys=True).encode())
    h.update(_BUILDER_VERSION.encode())
    for line in corpus:
        h.update(line.encode())
    return h.hexdigest()[:12]


def resolve_tiny(name: str) -> str:
    """Return the local directory of the tiny model ``name`` (``qlit-tiny/<arch>``), building it on first use."""
    arch = name[len(TINY_PREFIX) :]
    if arch not in _ARCHITECTURES:
        raise QlitError(
            f"Unknown tiny model '{name}': qlit builds {', '.join(TINY_PREFIX + a for a in tiny_architectures())}."
        )
    corpus = _corpus()
    target = cache_root() / "tiny" / f"{arch}-{_fingerprint(arch, corpus)}"
    if not (target / "config.json").is_file():
        with atomic_dir(target, replace=False) as staging:  # two processes building it: the first one wins
            build_tiny(arch, staging, corpus)
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
    import torch
    import transformers

    spec = _ARCHITECTURES[arch]
    tokenizer = build_tokenizer(corpus if corpus is not None else _corpus(), chat=spec["chat"])
    config_cls = getattr(transformers, spec["config_class"])
    config = config_cls(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        **spec["config"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
