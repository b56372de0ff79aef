"""``qlit eval``: score a trained run on lm-evaluation-harness benchmarks (MMLU, HellaSwag, ARC, your own task YAMLs).

The model is evaluated as it was trained: the base loaded by qlit's own path with the quantization recorded beside
the adapter (``qlit_base.json``: an NF4 base stays NF4), the adapter on top, and the model object handed to lm-eval
(``HFLM(pretrained=model)``). lm-eval's loading by name would rebuild the base unquantized, scoring another model.
The benchmarks are lm-eval's; nothing here re-implements one.

    qlit eval --adapter logs/demo/version_0/adapter --tasks mmlu,hellaswag --limit 200

Scores land in lm-eval's results JSON (in the run's ``eval/`` folder), as TensorBoard scalars
``eval/<task>/<metric>`` in the run directory (so ``qlit compare`` shows them as columns), and in a table on stdout.
Importing this module loads neither PyTorch nor lm-eval, so ``qlit eval --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlit.errors import QlitError
from qlit.hub import looks_local

if TYPE_CHECKING:
    from qlit.models.quantization import Quantization

#: TensorBoard tags of benchmark scores: ``eval/<task>/<metric>`` (``eval/mmlu/acc``, ``eval/mmlu/acc_stderr``).
EVAL_PREFIX = "eval/"
#: Suffix of a score's standard error, beside the score in TensorBoard and the results JSON.
STDERR_SUFFIX = "_stderr"

INSTALL = "pip install 'qlit[eval]' (or pip install lm-eval)"
ADAPTER_CONFIG = "adapter_config.json"


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
    """

    results: dict[str, Any]
    path: Path
    scores: dict[str, float]
    run_dir: Path | None
    step: int
    samples: dict[str, Path] = field(default_factory=dict)


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
) -> EvalResult:
    """Evaluate a trained adapter (on its base, quantized as in training) or a plain model with lm-eval.

    Every option is checked, and every task found and its data loaded, before any weight is loaded.

    Args:
        tasks: lm-eval task, group or tag names (``mmlu``, ``hellaswag``, ``arc_easy``), or paths of task YAML
            files; a string is split at commas.
        adapter: a trained adapter in peft format (``logs/<name>/version_N/adapter``), or a checkpoint of a qlit run
            (``logs/<name>/version_N/checkpoints/last.ckpt``).
        model: instead of ``adapter``, a plain model: a ``qlit export`` directory, another local model, or a hub id.
        limit: documents per task: a count (``200``) or a fraction of each task (``0.1``); ``None``: all.
        num_fewshot: few-shot examples per prompt (``None``: each task's default, else 0).
        batch_size: requests per forward pass.
        device: where to load the model: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``,
            ``cuda:1``.
        output: folder for the results JSON (``results_<time>.json``) and the per-request samples (``None``: the
            run's ``eval/`` folder, or ``eval/`` beside a model with no run).
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
    if output is not None and Path(output).expanduser().is_file():
        raise QlitError(f"--output '{output}' is a file: pass a folder for the results.")
    source = _source(adapter, model, run_config, log_dir)
    include = str(Path(include_path).expanduser()) if include_path is not None else None
    target = _device(device)

    lm_eval = _import_lm_eval()
    manager, loaded = _load_tasks(names, include)

    import torch

    with _evaluable(source, base, quantization, target, trust_remote_code) as (model_object, tokenizer, info):
        from lm_eval.models.huggingface import HFLM

        with _quiet("lm_eval.models.huggingface"):  # its warnings about a model object concern launchers qlit skips
            lm = HFLM(pretrained=model_object, tokenizer=tokenizer, batch_size=batch_size)
        roots = [obj for name in names for obj in _roots(loaded[name])]
        with torch.no_grad():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=roots,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=batch_size,
                log_samples=log_samples,
                apply_chat_template=apply_chat_template,
            )
    results["qlit"] = info
    scores = _scores(results, roots)
    step = _step(source)
    path, samples = _write(results, _output_dir(output, source), log_samples)
    if source.run_dir is not None:
        _log_scalars(source.run_dir, scores, step)
    return EvalResult(results=results, path=path, scores=scores, run_dir=source.run_dir, step=step, samples=samples)


# ----- checking the options -------------------------------------------------------------------------------------------
def _task_names(tasks: str | Sequence[str]) -> list[str]:
    raw = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(name.strip() for name in raw if name.strip()))
    if not names:
        raise QlitError("--tasks is empty: name one or more lm-eval tasks, e.g. --tasks mmlu,hellaswag.")
    return names


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
            raise QlitError(f"Model directory '{model}' does not exist or holds no config.json.")
        return _Source(adapter=None, model=model, run_config=None, run_dir=run_dir)
    path = Path(adapter).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise QlitError(f"Checkpoint '{adapter}' does not exist.")
        config = Path(run_config).expanduser() if run_config else path.resolve().parent.parent / "config.yaml"
        if not config.is_file():
            raise QlitError(
                f"No run config '{config}' beside checkpoint '{adapter}': pass --run_config with the run's config.yaml."
            )
        return _Source(adapter=path, model=None, run_config=config, run_dir=run_dir or path.resolve().parent.parent)
    if not (path / ADAPTER_CONFIG).is_file():
        raise QlitError(f"Adapter directory '{adapter}' does not exist or holds no {ADAPTER_CONFIG} (peft format).")
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
        with _quiet("lm_eval"):
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
@contextmanager
def _evaluable(
    source: _Source, base: str | None, quantization: Quantization | None, device: Any, trust_remote_code: bool
) -> Iterator[tuple[Any, Any, dict[str, Any]]]:
    """The model to evaluate, in eval mode, its tokenizer, and what it is (for the results JSON)."""
    import tempfile

    from qlit.hub import offline_unless_reachable

    with offline_unless_reachable():
        if source.model is not None:
            yield _plain_model(source.model, quantization, device, trust_remote_code)
        elif source.adapter is not None and source.adapter.suffix == ".ckpt":
            from qlit.export import _adapter_from_checkpoint

            # The checkpoint holds the adapter's tensors only: written out in peft format, it loads as any adapter.
            with tempfile.TemporaryDirectory(prefix="qlit-eval-") as staged:
                _adapter_from_checkpoint(source.adapter, source.run_config, staged, device=device)
                yield _adapter_model(Path(staged), str(source.adapter), base, quantization, device, trust_remote_code)
        else:
            yield _adapter_model(source.adapter, str(source.adapter), base, quantization, device, trust_remote_code)


def _adapter_model(
    adapter_dir: Path,
    name: str,
    base: str | None,
    quantization: Quantization | None,
    device: Any,
    trust_remote_code: bool,
) -> tuple[Any, Any, dict[str, Any]]:
    from peft import PeftModel

    from qlit.export import _read_base, _tokenizer, read_peft_config
    from qlit.models.loading import load_causal_lm

    peft_config = read_peft_config(adapter_dir, name)
    spec = _read_base(adapter_dir, name, peft_config, base, quantization)
    model = load_causal_lm(
        spec.pretrained,
        quantization=spec.quantization,
        dtype=spec.dtype,
        device=device,
        revision=spec.revision,
        trust_remote_code=trust_remote_code,
    )
    spec.quantization.backend.convert(model, has_adapter=True)  # BitNet's layers; nothing for bitsandbytes
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:  # a state-dict mismatch: the adapter trained on another base
        reason = str(err).strip().splitlines()[0]
        raise QlitError(f"Adapter '{name}' does not fit base '{spec.pretrained}': {reason}") from None
    info = {
        "adapter": name,
        "base": spec.pretrained,
        "revision": spec.revision,
        "dtype": spec.dtype,
        "quantization": dataclasses.asdict(spec.quantization),
    }
    return model.eval(), _tokenizer(adapter_dir, spec, trust_remote_code), info


def _plain_model(
    name: str, quantization: Quantization | None, device: Any, trust_remote_code: bool
) -> tuple[Any, Any, dict[str, Any]]:
    from qlit.models.loading import load_causal_lm, load_tokenizer
    from qlit.models.quantization import Quantization

    spec = quantization or Quantization()
    model = load_causal_lm(name, quantization=spec, dtype="auto", device=device, trust_remote_code=trust_remote_code)
    spec.backend.convert(model, has_adapter=True)
    info = {"model": name, "quantization": dataclasses.asdict(spec)}
    return model.eval(), load_tokenizer(name, trust_remote_code=trust_remote_code), info


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
    if source.adapter is not None and source.adapter.suffix == ".ckpt":
        import torch

        return int(torch.load(source.adapter, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
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
        return Path(output).expanduser()
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
            "qlit compare."
        ),
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--adapter", metavar="PATH", help="adapter directory (logs/x/version_0/adapter) or checkpoint")
    what.add_argument("--model", metavar="MODEL", help="or a plain model: qlit export directory or hub id")
    parser.add_argument("--tasks", required=True, help="lm-eval tasks, groups or tags, comma-separated: mmlu,hellaswag")
    parser.add_argument("--limit", type=float, help="documents per task (200) or a fraction of each task (0.1)")
    parser.add_argument("--num_fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    parser.add_argument("--batch_size", type=int, default=8, help="requests per forward pass (default: 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--output", metavar="DIR", help="folder for the results JSON (default: the run's eval/)")
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


def main(argv: Sequence[str] | None = None, prog: str = "qlit eval") -> EvalResult:
    """``qlit eval --adapter DIR --tasks mmlu,hellaswag [--limit 200] ...``: :func:`evaluate_model`, then the table.

    A user error is printed in one line on stderr and exits with code 1; a bad argument exits with code 2.

    Args:
        argv: the arguments after ``eval`` (``None``: ``sys.argv[1:]``).
        prog: the command's name in usage and error messages.
    """
    args = _parser(prog).parse_args(argv)
    options = vars(args)
    try:
        if args.quantization is not None:
            options["quantization"] = _quantization(args.quantization)
        outcome = evaluate_model(**options)
    except QlitError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    from lm_eval.utils import make_table

    print(make_table(outcome.results))
    if outcome.results.get("groups"):
        print(make_table(outcome.results, "groups"))
    print(f"{prog}: results written to {outcome.path}")
    for path in outcome.samples.values():
        print(f"{prog}: samples written to {path}")
    if outcome.run_dir is not None:
        print(f"{prog}: {len(outcome.scores)} scores logged to {outcome.run_dir} at step {outcome.step}")
    return outcome
