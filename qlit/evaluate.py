"""``qlit eval``: score a trained run on lm-evaluation-harness benchmarks (MMLU, HellaSwag, ARC, your own task YAMLs).

The model is evaluated as it was trained: the base loaded by qlit's own path with the quantization recorded beside
the adapter (``qlit_base.json``: an NF4 base stays NF4), the adapter on top, and the model object handed to lm-eval
(``HFLM(pretrained=model)``). lm-eval's loading by name would rebuild the base unquantized, scoring another model.
The benchmarks are lm-eval's; nothing here re-implements one.

    qlit eval --adapter logs/demo/version_0/adapter --tasks mmlu,hellaswag --limit 200

Scores land in lm-eval's results JSON (in the run's ``eval/`` folder), as TensorBoard scalars
``eval/<task>/<metric>`` in the run directory (so ``qlit compare`` shows them as columns), and in a table on stdout.
The options that lm-eval's own ``lm-eval run`` also has carry its names and meaning (``--output_path``,
``--include_path``, ``--gen_kwargs``, and ``--model_args`` where a key has a meaning here), so one of its command
lines runs here with the adapter added. Importing this module loads neither PyTorch nor lm-eval, so
``qlit eval --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlit.errors import QlitError
from qlit.hub import looks_local
from qlit.metrics import STDERR_SUFFIX

if TYPE_CHECKING:
    from qlit.models.quantization import Quantization

#: TensorBoard tags of benchmark scores: ``eval/<task>/<metric>`` (``eval/mmlu/acc``, ``eval/mmlu/acc_stderr``).
EVAL_PREFIX = "eval/"

INSTALL = "pip install 'qlit[eval]' (or pip install lm-eval)"
ADAPTER_CONFIG = "adapter_config.json"
#: lm-eval's names of the model type qlit evaluates (``lm-eval run --model hf``): Hugging Face transformers.
HF_MODEL_TYPES = ("hf", "hf-auto", "huggingface")
#: ``--model_args`` keys of lm-eval's ``hf`` model that have a meaning here, and the option each one sets.
MODEL_ARGS = {
    "pretrained": "model (with --adapter: base)",
    "peft": "adapter",
    "revision": "revision",
    "dtype": "dtype",
    "trust_remote_code": "trust_remote_code",
    "device": "device",
    "batch_size": "batch_size",
    "max_length": "max_length",
    "load_in_4bit": "quantization",
    "load_in_8bit": "quantization",
    "bnb_4bit_quant_type": "quantization",
    "bnb_4bit_compute_dtype": "quantization",
    "bnb_4bit_use_double_quant": "quantization",
}
#: ``dtype`` values lm-eval takes beside the dtype names, as qlit names them.
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class EvalResult:
    """What one ``qlit eval`` produced.

    Args:
        results: lm-eval's results (``results``, ``configs``, ``n-shot``, ...), without the per-request samples,
            plus ``qlit``: what was evaluated (adapter, base, quantization).
        path: the results JSON.
        scores: the TensorBoard tags and values (``eval/<task>/<metric>``), one per requested task or group.
        run_dir: the TensorBoard run the scores were logged to, ``None`` where there is none.
        step: the step they were logged at (the run's last training step, or the checkpoint's).
        samples: the per-request files (``--log_samples``) by task.
        truncated: requests longer than the model's context, which lm-eval cut from the left.
        max_length: the model's context as lm-eval used it, in tokens.
    """

    results: dict[str, Any]
    path: Path
    scores: dict[str, float]
    run_dir: Path | None
    step: int
    samples: dict[str, Path] = field(default_factory=dict)
    truncated: int = 0
    max_length: int | None = None


@dataclass
class _Source:
    """What to evaluate and the run it belongs to."""

    adapter: Path | None  # an adapter directory or a checkpoint
    model: str | None  # or a plain (exported) model: a directory or hub id
    run_config: Path | None  # for a checkpoint: the run's config.yaml
    run_dir: Path | None  # the TensorBoard run the scores go to


def evaluate_model(
    tasks: str | Sequence[str],
    *,
    adapter: str | Path | None = None,
    model: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    output: str | Path | None = None,
    include_path: str | Path | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    base: str | None = None,
    quantization: Quantization | None = None,
    run_config: str | Path | None = None,
    log_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    gen_kwargs: dict[str, Any] | str | None = None,
    revision: str | None = None,
    dtype: str | None = None,
    max_length: int | None = None,
    generation: str = "auto",
) -> EvalResult:
    """Evaluate a trained adapter (on its base, quantized as in training) or a plain model with lm-eval.

    Every option is checked, and every task found and its data loaded, before any weight is loaded.

    Args:
        tasks: lm-eval task, group or tag names (``mmlu``, ``hellaswag``, ``arc_easy``), or paths of task YAML
            files; each name is split at commas, as lm-eval does.
        adapter: a trained adapter in peft format (``logs/<name>/version_N/adapter``), or a checkpoint of a qlit run
            (``logs/<name>/version_N/checkpoints/last.ckpt``).
        model: instead of ``adapter``, a plain model: a ``qlit export`` directory, another local model, or a hub id.
        limit: documents per task: a count (``200``) or a fraction of each task (``0.1``); ``None``: all.
        num_fewshot: few-shot examples per prompt (``None``: each task's default, else 0).
        batch_size: requests per forward pass.
        device: where to load the model: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``,
            ``cuda:1``.
        output: folder for the results JSON (``results_<time>.json``) and the per-request samples (``None``: the
            run's ``eval/`` folder, or ``eval/`` beside a model with no run); as in lm-eval, a path ending in
            ``.json`` names the results file instead (``<name>_<time>.json``, the samples beside it).
        include_path: a folder of your own task YAML files (e.g. a local copy of a benchmark, ``dataset_path: json``
            with ``dataset_kwargs: {data_files: ...}``).
        log_samples: also write every request with its log-likelihoods or generation (``samples_<task>_<time>.jsonl``).
        apply_chat_template: format prompts with the tokenizer's chat template (instruct models).
        base: hub id or local directory of the adapter's base instead of the recorded one (e.g. a local copy).
        quantization: how to store the base instead of the recorded one; with ``model``, how to load that model
            (``None``: unquantized).
        run_config: for a checkpoint, its run's ``config.yaml`` (``None``: the one two levels above it).
        log_dir: the TensorBoard run directory to log the scores to (``None``: the run the adapter or checkpoint
            belongs to; an exported model has none).
        trust_remote_code: run model code shipped in a hub repository; off unless you trust its author.
        gen_kwargs: generation settings for the tasks that generate (``generate_until``), as lm-eval takes them:
            ``{"max_gen_toks": 64, "temperature": 0}`` or ``"max_gen_toks=64,temperature=0"``; they update each such
            task's own ``generation_kwargs``.
        revision: the hub revision (branch, tag or commit) of ``model``, or of the adapter's base instead of the
            recorded one.
        dtype: the dtype to load ``model`` in, or the adapter's base instead of the recorded one (``auto``,
            ``float32``, ``bfloat16``, ``float16``; ``None``: ``auto``, or the recorded dtype).
        max_length: the longest prompt + continuation lm-eval gives the model, in tokens (``None``: the model's
            own limit); longer requests lose their beginning.
        generation: how the generating tasks decode when greedy (``QLitModule.generation``, :mod:`qlit.generation`):
            ``auto`` replays the decode step as a CUDA graph where it applies, ``graphs`` insists, ``eager`` keeps
            lm-eval's call of transformers' ``generate``. Sampling settings always go to ``generate``.

    Returns:
        The results, where they were written and the scores logged.

    Raises:
        QlitError: a bad option, a missing adapter or model, an unknown task, a task whose data cannot be loaded,
            lm-eval not installed, or an adapter that does not fit its base.
    """
    names = _task_names(tasks)
    limit = _check_limit(limit)
    if num_fewshot is not None and num_fewshot < 0:
        raise QlitError(f"--num_fewshot must be 0 or more, got {num_fewshot}.")
    if batch_size < 1:
        raise QlitError(f"--batch_size must be 1 or more, got {batch_size}.")
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise QlitError(f"--include_path '{include_path}' is not a folder: pass the folder holding your task YAMLs.")
    if output is not None and Path(output).expanduser().is_file() and Path(output).suffix != ".json":
        raise QlitError(f"--output_path '{output}' is a file: pass a folder, or a .json file name, for the results.")
    if max_length is not None and max_length < 1:
        raise QlitError(f"max_length (the model's context, in tokens) must be 1 or more, got {max_length}.")
    dtype = _check_dtype(dtype)
    from qlit.generation import Generator

    generator = Generator(generation, option="--generation")  # type: ignore[arg-type]  # one sentence if not a choice
    source = _source(adapter, model, run_config, log_dir)
    include = str(Path(include_path).expanduser()) if include_path is not None else None
    target = _device(device)

    lm_eval = _import_lm_eval()
    generation = _gen_kwargs(gen_kwargs)
    manager, loaded = _load_tasks(names, include)

    import torch

    loading = _Loading(base, quantization, target, trust_remote_code, revision, dtype)
    with _evaluable(source, loading) as (model_object, tokenizer, info):
        from lm_eval.models.huggingface import HFLM

        lengths = {} if max_length is None else {"max_length": max_length}
        with _quiet("lm_eval"):  # its warnings about a model object concern launchers qlit skips
            lm = _generating_lm(HFLM)(pretrained=model_object, tokenizer=tokenizer, batch_size=batch_size, **lengths)
        from qlit.models.quant import backend_class

        lm.qlit_generator = generator
        lm.qlit_allows_graphs = backend_class(info["quantization"]["mode"]).allows_cuda_graphs
        roots = [obj for name in names for obj in _roots(loaded[name])]
        with torch.no_grad(), _lm_eval_console() as console:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=roots,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=batch_size,
                log_samples=log_samples,
                apply_chat_template=apply_chat_template,
                gen_kwargs=generation,
            )
    results["qlit"] = info
    scores = _scores(results, roots)
    step = _step(source)
    path, samples = _write(results, _output_dir(output, source), log_samples)
    if source.run_dir is not None:
        _log_scalars(source.run_dir, scores, step)
    return EvalResult(
        results=results,
        path=path,
        scores=scores,
        run_dir=source.run_dir,
        step=step,
        samples=samples,
        truncated=console.truncated,
        max_length=lm.max_length,
    )


@functools.cache
def _generating_lm(hflm: type) -> type:
    """lm-eval's ``HFLM`` whose greedy generations (``generate_until``) go through :mod:`qlit.generation`: the
    same tokens as its call of transformers' ``generate``, decoded by the recorded step where it applies."""

    class QlitLM(hflm):  # type: ignore[misc, valid-type]
        qlit_generator: Any = None
        qlit_allows_graphs = False

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
            import torch

            options = dict(kwargs)
            mask = options.pop("attention_mask", None)
            temperature = options.pop("temperature", 0.0)
            greedy = options.pop("do_sample", None) in (None, False) and not temperature and not options
            if self.qlit_generator is None or self.qlit_generator.choice == "eager" or not greedy:
                return super()._model_generate(context, max_length, stop, **kwargs)
            pad = self.tokenizer.pad_token_id
            if mask is None:  # as generate infers it: padding where the pad id is no end-of-sequence id
                mask = context.ne(pad) if pad is not None else torch.ones_like(context)
            dtype = getattr(self, "mixed_precision_dtype", None)
            with torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
                # End-of-sequence ids: the model's generation config's, as generate takes them from it. The stop
                # strings are not watched: lm-eval cuts each answer at the first of them, and the tokens before it
                # are the same.
                out = self.qlit_generator.generate(
                    self.model,
                    context,
                    mask,
                    max_new_tokens=max(max_length - context.shape[1], 1),
                    eos_token_id=None,
                    pad_token_id=pad,
                    allows_graphs=self.qlit_allows_graphs,
                )
            return torch.cat([context, out.tokens.to(context.device)], dim=1)

    return QlitLM


# ----- checking the options -------------------------------------------------------------------------------------------
def _task_names(tasks: str | Sequence[str]) -> list[str]:
    raw = [name for part in ([tasks] if isinstance(tasks, str) else tasks) for name in str(part).split(",")]
    names = list(dict.fromkeys(name.strip() for name in raw if name.strip()))
    if not names:
        raise QlitError("--tasks is empty: name one or more lm-eval tasks, e.g. --tasks mmlu,hellaswag.")
    return names


def _check_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in ("auto", "float32", "bfloat16", "float16"):
        raise QlitError(f"dtype '{dtype}' is not one qlit loads a model in: use auto, float32, bfloat16 or float16.")
    return name


def _gen_kwargs(value: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """``--gen_kwargs`` as lm-eval reads it: ``key=value,...`` (values as Python literals) or a mapping."""
    if value is None or isinstance(value, dict):
        return value or None
    from lm_eval._cli.utils import key_val_to_dict, try_parse_json

    try:
        parsed = try_parse_json(value)
        return (parsed if isinstance(parsed, dict) else key_val_to_dict(value)) or None
    except ValueError as err:
        raise QlitError(f"--gen_kwargs '{value}' is not key=value,...: {err}.") from None


def _check_limit(limit: float | None) -> int | float | None:
    # lm-eval reads a limit below 1 as a fraction of each task and 1 or more as a count of documents.
    if limit is None:
        return None
    if not math.isfinite(limit) or limit <= 0 or (limit >= 1 and limit != int(limit)):
        raise QlitError(
            f"--limit must be a number of documents per task (e.g. 200) or a fraction of each task between 0 and 1 "
            f"(e.g. 0.1), got {limit:g}."
        )
    return int(limit) if limit >= 1 else limit


def _source(
    adapter: str | Path | None, model: str | None, run_config: str | Path | None, log_dir: str | Path | None
) -> _Source:
    if (adapter is None) == (model is None):
        raise QlitError(
            "Pass either --adapter (a run's adapter directory or checkpoint) or --model (an exported or plain model)"
            + (", not both." if adapter is not None else ": there is nothing to evaluate.")
        )
    run_dir = Path(log_dir).expanduser() if log_dir is not None else None
    if model is not None:
        if looks_local(model) and not (Path(model).expanduser() / "config.json").is_file():
            if (Path(model).expanduser() / ADAPTER_CONFIG).is_file():
                raise QlitError(f"'{model}' holds an adapter ({ADAPTER_CONFIG}), not a model: pass it with --adapter.")
            raise QlitError(f"Model directory '{model}' does not exist or holds no config.json.")
        return _Source(adapter=None, model=model, run_config=None, run_dir=run_dir)
    from qlit.export import check_trained

    path = Path(adapter).expanduser()
    check_trained(path, str(adapter), plain_model=f"evaluate it with --model {adapter}")
    if path.is_file():
        config = Path(run_config).expanduser() if run_config else path.resolve().parent.parent / "config.yaml"
        if not config.is_file():
            raise QlitError(
                f"No run config '{config}' beside checkpoint '{adapter}': pass --run_config with the run's config.yaml."
            )
        return _Source(adapter=path, model=None, run_config=config, run_dir=run_dir or path.resolve().parent.parent)
    # qlit fit saves the adapter in its run directory (logs/<name>/version_N/adapter), beside the event files.
    parent = path.resolve().parent
    is_run = (parent / "config.yaml").is_file() or any(parent.glob("events.out.tfevents.*"))
    return _Source(adapter=path, model=None, run_config=None, run_dir=run_dir or (parent if is_run else None))


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise QlitError(f"--device '{name}' is not a device: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QlitError(f"--device {name}: no CUDA device is available here: use --device cpu.")
    return device


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise QlitError(f"qlit eval runs lm-evaluation-harness, which is not installed: {INSTALL}.") from None
    return lm_eval


# ----- tasks ----------------------------------------------------------------------------------------------------------
def _load_tasks(names: list[str], include_path: str | None) -> tuple[Any, dict[str, dict[str, Any]]]:
    """lm-eval's task manager and, per requested name, its loaded tasks and groups (their data read or fetched)."""
    from qlit.hub import offline_unless_reachable

    manager = _local_catalogue(include_path, names) or _catalogue(include_path, _stamp(include_path))
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise QlitError(
            f"lm-eval has no task, group or tag '{unknown[0]}'{hint}: `lm-eval ls tasks` lists them, and "
            "--include_path DIR adds your own task YAMLs."
        )
    loaded: dict[str, dict[str, Any]] = {}
    with offline_unless_reachable():
        for name in names:
            try:
                loaded[name] = _load_task(manager, name)
            except KeyError:  # a local group naming built-in tasks: they need the whole catalogue
                manager = _catalogue(include_path, _stamp(include_path))
                loaded[name] = _load_task(manager, name)
    return manager, loaded


def _local_catalogue(include_path: str | None, names: list[str]) -> Any:
    # lm-eval indexes its ~14,000 built-in task YAMLs on every start (about 50 s of CPU time): where every requested
    # task is one of the user's own, only their folder is indexed.
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return None
    local = TaskManager(include_path=include_path, include_defaults=False)
    return local if all(name in local.all_tasks for name in names) else None


@functools.lru_cache(maxsize=2)
def _catalogue(include_path: str | None, stamp: tuple[Any, ...]) -> Any:
    # Kept for the process: evaluating several adapters from Python indexes the built-in tasks once. ``stamp``
    # (the user's YAML files and their times) renews it when those change.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _stamp(include_path: str | None) -> tuple[Any, ...]:
    if include_path is None:
        return ()
    return tuple((str(p), p.stat().st_mtime_ns) for p in sorted(Path(include_path).rglob("*.yaml")))


def _load_task(manager: Any, name: str) -> dict[str, Any]:
    import datasets

    try:
        with _quiet("lm_eval"), _no_dataset_bars():
            return manager.load([name])
    except (OSError, datasets.exceptions.DatasetGenerationError) as err:
        # OSError: the hub unreachable (ConnectionError), an unknown dataset id or a missing local file.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        entry = manager.task_index.get(name)
        where = f" (a copy of {entry.yaml_path})" if entry is not None and entry.yaml_path else ""
        raise QlitError(
            f"Task '{name}' could not load its data ({reason}): download the dataset where the hub is reachable and "
            f"point a task YAML{where} at the local files with `dataset_path: json` and "
            "`dataset_kwargs: {data_files: {test: DIR/test.jsonl}}`, then pass its folder with --include_path."
        ) from None


def _roots(loaded: dict[str, Any]) -> list[Any]:
    """The top of what one requested name loaded: its group, its task, or the tasks a tag stands for."""
    children = {child for names in loaded["group_map"].values() for child in names}
    groups = [group for name, group in loaded["groups"].items() if name not in children]
    return groups or list(loaded["tasks"].values())


# ----- the model ------------------------------------------------------------------------------------------------------
@dataclass
class _Loading:
    """How to load what is evaluated: the options that override the adapter's record, or load a plain model."""

    base: str | None
    quantization: Quantization | None
    device: Any
    trust_remote_code: bool
    revision: str | None
    dtype: str | None


@contextmanager
def _evaluable(source: _Source, loading: _Loading) -> Iterator[tuple[Any, Any, dict[str, Any]]]:
    """The model to evaluate, in eval mode, its tokenizer, and what it is (for the results JSON)."""
    import tempfile

    from qlit.hub import offline_unless_reachable

    with offline_unless_reachable():
        if source.model is not None:
            yield _plain_model(source.model, loading)
        elif source.adapter is not None and source.adapter.is_file():
            from qlit.export import _adapter_from_checkpoint

            # The checkpoint holds the adapter's tensors only: written out in peft format, it loads as any adapter.
            with tempfile.TemporaryDirectory(prefix="qlit-eval-") as staged:
                _adapter_from_checkpoint(source.adapter, source.run_config, staged, device=loading.device)
                yield _adapter_model(Path(staged), str(source.adapter), loading)
        else:
            yield _adapter_model(source.adapter, str(source.adapter), loading)


def _adapter_model(adapter_dir: Path, name: str, loading: _Loading) -> tuple[Any, Any, dict[str, Any]]:
    from qlit.export import _read_base, _tokenizer, read_peft_config
    from qlit.models.adapters import load_adapter
    from qlit.models.loading import load_causal_lm

    peft_config = read_peft_config(adapter_dir, name)
    spec = _read_base(adapter_dir, name, peft_config, loading.base, loading.quantization)
    if loading.revision is not None:
        spec.revision = loading.revision
    if loading.dtype is not None:
        spec.dtype = loading.dtype
    trust_remote_code = loading.trust_remote_code
    model = load_causal_lm(
        spec.pretrained,
        quantization=spec.quantization,
        dtype=spec.dtype,
        device=loading.device,
        revision=spec.revision,
        trust_remote_code=trust_remote_code,
    )
    spec.quantization.backend.convert(model, has_adapter=True)  # BitNet's layers; nothing for bitsandbytes
    model = load_adapter(model, adapter_dir, spec.pretrained, what=f"Adapter '{name}'", is_trainable=False)
    info = {
        "adapter": name,
        "base": spec.pretrained,
        "revision": spec.revision,
        "dtype": spec.dtype,
        "quantization": dataclasses.asdict(spec.quantization),
    }
    return model.eval(), _tokenizer(adapter_dir, spec, trust_remote_code), info


def _plain_model(name: str, loading: _Loading) -> tuple[Any, Any, dict[str, Any]]:
    from qlit.models.loading import load_causal_lm, load_tokenizer
    from qlit.models.quantization import Quantization

    spec = loading.quantization or Quantization()
    trust_remote_code, revision = loading.trust_remote_code, loading.revision
    model = load_causal_lm(
        name,
        quantization=spec,
        dtype=loading.dtype or "auto",
        device=loading.device,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    spec.backend.convert(model, has_adapter=True)
    info = {"model": name, "revision": revision, "dtype": loading.dtype or "auto"}
    info["quantization"] = dataclasses.asdict(spec)
    tokenizer = load_tokenizer(name, revision=revision, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer, info


# ----- the scores -----------------------------------------------------------------------------------------------------
def _scores(results: dict[str, Any], roots: list[Any]) -> dict[str, float]:
    """``eval/<task>/<metric>`` for each requested task, group (its aggregate) or tag (each of its tasks).

    A group's subtasks (MMLU's 57) stay in the results JSON: one column per requested name keeps a comparison
    readable.
    """
    tables = {**results.get("groups", {}), **results.get("results", {})}
    scores: dict[str, float] = {}
    for root in roots:
        is_task = hasattr(root, "task_name")  # lm-eval's own test: tasks have task_name, groups name
        name = root.task_name if is_task else root.name
        measured = _metrics(tables.get(name, {}))
        names = [name] if measured or is_task else [task.task_name for task in root.get_all_tasks()]
        for shown in names:  # a group without an aggregate shows its tasks one by one
            scores.update({f"{EVAL_PREFIX}{shown}/{m}": v for m, v in _metrics(tables.get(shown, {})).items()})
    return scores


def _metrics(table: dict[str, Any]) -> dict[str, float]:
    # lm-eval keys a score by metric and filter: "acc,none", "acc_stderr,none", "exact_match,strict-match".
    out: dict[str, float] = {}
    for key, value in table.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias", "sample_len", and "N/A" where a standard error was not computed
        metric, _, flt = key.partition(",")
        if flt != "none":  # exact_match_strict-match, exact_match_strict-match_stderr
            stem = metric.removesuffix(STDERR_SUFFIX)
            metric = f"{stem}_{flt}" + (STDERR_SUFFIX if stem != metric else "")
        if math.isfinite(value):
            out[metric] = float(value)
    return out


def _step(source: _Source) -> int:
    """The step the scores belong to: the checkpoint's, or the run's last logged step (0 where there is none)."""
    if source.adapter is not None and source.adapter.is_file():
        from qlit.checkpoint_io import read_checkpoint

        return int(read_checkpoint(source.adapter, f"Checkpoint '{source.adapter}'").get("global_step", 0))
    if source.run_dir is None:
        return 0
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = [
        event.step
        for events in sorted(source.run_dir.glob("events.out.tfevents.*"))
        for event in EventFileLoader(str(events)).Load()
    ]
    return max(steps, default=0)


def _output_dir(output: str | Path | None, source: _Source) -> Path:
    if output is not None:
        return Path(output).expanduser()  # a folder, or (lm-eval's other form) the results file
    if source.run_dir is not None:
        return source.run_dir / "eval"
    if source.adapter is not None:
        return source.adapter / "eval"
    if looks_local(source.model):
        return Path(source.model).expanduser() / "eval"
    return Path("eval") / source.model.replace("/", "__")  # a hub id: lm-eval's own naming


def _write(results: dict[str, Any], out_dir: Path, log_samples: bool) -> tuple[Path, dict[str, Path]]:
    from lm_eval.utils import handle_non_serializable

    from qlit.io import atomic_file

    stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")
    samples = results.pop("samples", None) or {}
    if out_dir.suffix == ".json":  # lm-eval's --output_path results.json: results_<time>.json, the samples beside it
        out_dir, path = out_dir.parent, out_dir.with_name(f"{out_dir.stem}_{stamp}.json")
    else:
        path = out_dir / f"results_{stamp}.json"
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    written = {}
    for task, rows in samples.items() if log_samples else ():
        target = out_dir / f"samples_{task}_{stamp}.jsonl"
        with atomic_file(target) as staging:
            staging.write_text(
                "".join(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n" for row in rows)
            )
        written[task] = target
    return path, written


def _log_scalars(run_dir: Path, scores: dict[str, float], step: int) -> None:
    # A new event file in the run directory: TensorBoard and qlit compare read every event file of a run.
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        for tag, value in scores.items():
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()


class _Console(logging.Handler):
    """lm-eval's log records during a run: errors printed as they come, truncated requests counted, the rest (notes
    to the users of its own CLI: the selected tasks, the seeds, the gen_kwargs it applies) dropped."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.truncated = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            print(f"lm-eval: {message}", file=sys.stderr)
        elif message.startswith(("Combined length of context", "Left truncation applied")):
            self.truncated += 1


@contextmanager
def _lm_eval_console() -> Iterator[_Console]:
    """lm-eval's run with a console that carries its results and errors only: no progress bars, no line of git's
    outside a repository, and its warnings summed up (:class:`_Console`)."""
    import lm_eval.evaluator

    console = _Console()
    log = logging.getLogger("lm_eval")
    saved = log.level, log.propagate, lm_eval.evaluator.get_git_commit_hash
    log.addHandler(console)
    log.setLevel(logging.WARNING)
    log.propagate = False
    lm_eval.evaluator.get_git_commit_hash = _git_hash
    try:
        with _no_progress_bars():
            yield console
    finally:
        log.removeHandler(console)
        log.level, log.propagate, lm_eval.evaluator.get_git_commit_hash = saved


def _git_hash() -> str | None:
    """lm-eval's record of the commit the working folder is at, without the ``fatal: not a git repository`` that
    its ``git describe`` lets git print outside a repository."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git installed, or a hung one
        done = None
    if done is not None and done.returncode == 0:
        return done.stdout.strip()
    return get_commit_from_path(os.getcwd())


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """lm-eval's tqdm bars (building requests, tokenizing, scoring) off: it draws them with ``disable=False`` given
    outright, which no setting overrides, so its modules get a tqdm that is always disabled."""
    import tqdm

    class Hidden(tqdm.tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    # The modules that imported tqdm's class, and tqdm itself for those that import it inside a function.
    loaded = [m for n, m in list(sys.modules.items()) if n.startswith("lm_eval") and m is not None]
    holders = [tqdm, *(m for m in loaded if vars(m).get("tqdm") is tqdm.tqdm)]
    for holder in holders:
        holder.tqdm = Hidden
    try:
        yield
    finally:
        for holder in holders:
            holder.tqdm = Hidden.__base__


@contextmanager
def _no_dataset_bars() -> Iterator[None]:
    # datasets draws a bar for each split it reads and converts ("Generating test split"); the qlit command turns
    # them off before datasets is imported (HF_DATASETS_DISABLE_PROGRESS_BARS), evaluate_model called from Python here.
    import datasets

    were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not were_off:
            datasets.enable_progress_bars()


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ----- command line ---------------------------------------------------------------------------------------------------
def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Score a trained adapter (on its base, quantized as in training) or a plain model on lm-evaluation-harness "
            "benchmarks. Scores go to a results JSON, to the run's TensorBoard (eval/<task>/<metric>) and to "
            "qlit compare. Options shared with `lm-eval run` keep its names and meaning."
        ),
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--adapter", metavar="PATH", help="adapter directory (logs/x/version_0/adapter) or checkpoint")
    what.add_argument(
        "--model", metavar="MODEL", help="or a plain model: qlit export directory or hub id (lm-eval's hf: the same)"
    )
    parser.add_argument(
        "--model_args",
        nargs="+",
        metavar="KEY=VALUE",
        help="lm-eval's hf model arguments, key=value,... or JSON: " + ", ".join(MODEL_ARGS),
    )
    parser.add_argument(
        "--tasks", nargs="+", required=True, help="lm-eval tasks, groups or tags, comma-separated: mmlu,hellaswag"
    )
    parser.add_argument("--limit", type=float, help="documents per task (200) or a fraction of each task (0.1)")
    parser.add_argument("--num_fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    parser.add_argument("--batch_size", type=int, default=8, help="requests per forward pass (default: 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--gen_kwargs",
        nargs="+",
        metavar="KEY=VALUE",
        help="generation settings of generating tasks, as lm-eval takes them: max_gen_toks=64,temperature=0",
    )
    parser.add_argument(
        "--output_path",
        "--output",
        dest="output",
        metavar="PATH",
        help="folder for the results JSON and samples, or a results .json name (default: the run's eval/)",
    )
    parser.add_argument("--include_path", metavar="DIR", help="folder of your own task YAMLs (local datasets)")
    parser.add_argument("--log_samples", action="store_true", help="also write every request and its scores")
    parser.add_argument("--apply_chat_template", action="store_true", help="prompts in the chat template")
    parser.add_argument("--base", metavar="MODEL", help="the adapter's base instead of the recorded one")
    parser.add_argument(
        "--quantization",
        metavar="SPEC",
        help="load the base as this instead of as recorded (with --model: unquantized): a mode (nf4) or a config's "
        "quantization mapping ('{mode: nf4, compute_dtype: float32}')",
    )
    parser.add_argument("--run_config", metavar="FILE", help="a checkpoint's run config.yaml (default: beside it)")
    parser.add_argument("--log_dir", metavar="DIR", help="TensorBoard run to log to (default: the adapter's run)")
    parser.add_argument("--trust_remote_code", action="store_true", help="run model code from the hub repository")
    parser.add_argument(
        "--generation",
        default="auto",
        choices=("auto", "graphs", "eager"),
        help="greedy generation: the decode step as a CUDA graph where it applies (auto), insist (graphs), or "
        "transformers' generate (eager)",
    )
    return parser


def _quantization(text: str) -> Quantization:
    """``--quantization``: a mode (``nf4``) or, as in a config, a mapping of ``Quantization`` fields."""
    import yaml

    from qlit.models.quantization import Quantization

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    fields = value if isinstance(value, dict) else {"mode": value if isinstance(value, str) else text}
    names = [f.name for f in dataclasses.fields(Quantization)]
    unknown = [key for key in fields if key not in names]
    if unknown:
        raise QlitError(f"--quantization has no field '{unknown[0]}': use {', '.join(names)}.")
    return Quantization(**fields)


def _key_values(values: Sequence[str], option: str) -> dict[str, Any]:
    """``--model_args`` / ``--gen_kwargs`` as lm-eval reads them: a JSON object, or ``key=value,...`` (one or more
    arguments, values as Python literals)."""
    _import_lm_eval()
    from lm_eval._cli.utils import key_val_to_dict, try_parse_json

    try:
        first = try_parse_json(values[0])
        if isinstance(first, dict):
            return first
        merged: dict[str, Any] = {}
        for value in values:
            merged.update(key_val_to_dict(value))
        return merged
    except ValueError as err:
        raise QlitError(f"{option} '{' '.join(values)}' is not key=value,... or a JSON object: {err}.") from None


def _apply_model_args(options: dict[str, Any], model_args: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Set the options that lm-eval's ``--model_args`` keys stand for (``pretrained``: the model, or the adapter's
    base), refusing a key with no meaning here and a value that disagrees with the option given for it."""
    unknown = [key for key in model_args if key not in MODEL_ARGS]
    if unknown:
        raise QlitError(
            f"--model_args key '{unknown[0]}' has no meaning in qlit eval, which hands lm-eval a model it loaded "
            f"itself: use {', '.join(MODEL_ARGS)}."
        )
    args = dict(model_args)
    lm_eval_type = options["model"] in HF_MODEL_TYPES and not (Path(options["model"]) / "config.json").is_file()
    if lm_eval_type:  # `--model hf --model_args pretrained=...`: lm-eval's command line
        if "pretrained" not in args:
            raise QlitError(
                f"--model {options['model']} is lm-eval's model type: name the model with --model_args "
                "pretrained=ID_OR_DIR, or pass it as --model ID_OR_DIR."
            )
        options["model"] = None
    if "peft" in args:
        _set(options, defaults, "adapter", str(args.pop("peft")), "peft")
    if "pretrained" in args:
        pretrained = str(args.pop("pretrained"))
        _set(options, defaults, "base" if options["adapter"] is not None else "model", pretrained, "pretrained")
    for key, kind in (("trust_remote_code", bool), ("batch_size", int), ("max_length", int)):
        if key in args:
            value = args.pop(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                word = "true or false" if kind is bool else "a whole number"
                raise QlitError(f"--model_args {key}={value} must be {word}.")
            _set(options, defaults, key, value, key)
    for key in ("revision", "dtype", "device"):
        if key in args:
            _set(options, defaults, key, str(args.pop(key)), key)
    if args:  # what is left is bitsandbytes': how lm-eval would have transformers quantize the model
        _set(options, defaults, "quantization", _bitsandbytes(args), ", ".join(args))


def _set(options: dict[str, Any], defaults: dict[str, Any], name: str, value: Any, key: str) -> None:
    given = options.get(name)
    if given is not None and given != defaults.get(name) and given != value:
        shown = "--quantization" if name == "quantization" else f"--{name} {given}"
        raise QlitError(f"{shown} and --model_args {key} disagree: give it once.")
    options[name] = value


def _bitsandbytes(args: dict[str, Any]) -> Quantization:
    """The quantization that transformers' ``BitsAndBytesConfig`` makes of lm-eval's ``load_in_4bit=True,
    bnb_4bit_...`` arguments, with its defaults (FP4, float32 compute, no double quantization)."""
    from qlit.models.quantization import Quantization

    if args.get("load_in_8bit") is True:
        if len(args) > 1:
            raise QlitError(f"--model_args load_in_8bit=True takes no bnb_4bit_ keys, got {', '.join(args)}.")
        return Quantization(mode="int8")
    if args.get("load_in_4bit") is not True:
        raise QlitError(f"--model_args {', '.join(args)} apply with load_in_4bit=True (or load_in_8bit=True).")
    return Quantization(
        mode=str(args.get("bnb_4bit_quant_type", "fp4")),
        compute_dtype=_check_dtype(str(args.get("bnb_4bit_compute_dtype", "float32"))),
        double_quant=bool(args.get("bnb_4bit_use_double_quant", False)),
    )


def main(argv: Sequence[str] | None = None, prog: str = "qlit eval") -> EvalResult:
    """``qlit eval --adapter DIR --tasks mmlu,hellaswag [--limit 200] ...``: :func:`evaluate_model`, then the table.

    A user error is printed in one line on stderr and exits with code 1; a bad argument exits with code 2.

    Args:
        argv: the arguments after ``eval`` (``None``: ``sys.argv[1:]``).
        prog: the command's name in usage and error messages.
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    options = vars(args)
    defaults = {name: parser.get_default(name) for name in options}
    try:
        model_args, gen_kwargs = options.pop("model_args"), options.pop("gen_kwargs")
        if args.quantization is not None:
            options["quantization"] = _quantization(args.quantization)
        if model_args:
            _apply_model_args(options, _key_values(model_args, "--model_args"), defaults)
        if gen_kwargs:
            options["gen_kwargs"] = _key_values(gen_kwargs, "--gen_kwargs")
        from qlit.trainer_cli import quiet_console

        quiet_console()
        outcome = evaluate_model(**options)
    except QlitError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    from lm_eval.utils import make_table

    print(make_table(outcome.results))
    if outcome.results.get("groups"):
        print(make_table(outcome.results, "groups"))
    if outcome.truncated:
        print(
            f"{prog}: {outcome.truncated} request(s) were longer than the model's context ({outcome.max_length} "
            "tokens) and lost their beginning: their scores are of the shortened prompt (--model_args max_length=N "
            "sets the context)."
        )
    print(f"{prog}: results written to {outcome.path}")
    for path in outcome.samples.values():
        print(f"{prog}: samples written to {path}")
    if outcome.run_dir is not None:
        print(f"{prog}: {len(outcome.scores)} scores logged to {outcome.run_dir} at step {outcome.step}")
    return outcome
