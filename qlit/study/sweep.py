"""``qlit sweep STUDY.yaml``: run a grid of ordinary qlit runs (techniques × ranks × ...) and write one report.

A study file names a base config and what varies: named *strategies* (a small config fragment each: full
fine-tuning, LoRA, 8-bit + LoRA, QLoRA, BitNet, a peft method, ...) and *axes* (any config key with a list of
values), crossed or zipped. Every cell of the grid is a plain ``qlit fit`` of the merged config, run in its own
process, one after another, so that a crash or an out-of-memory kill of one cell cannot take the sweep down::

    qlit sweep configs/studies/gpt2_techniques.yaml            # run every cell, then write the report
    qlit sweep configs/studies/gpt2_techniques.yaml --dry-run  # check the study and list its cells

The study is checked before any cell runs: the study file's own keys, then every cell's merged config against
the same parser ``qlit fit`` uses (an unknown key or a bad value is one sentence naming the cell and the key), and
the model's own checks (a peft method a quantization cannot train is recorded as a failed cell with the reason,
without starting it). A sweep run again skips the cells that finished (unless their config changed) and redoes the
unfinished ones from their start. The report (:mod:`qlit.study.report`) is written at the end: ``report.md``,
``report.csv`` and PNG plots in the study's output folder.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from qlit.errors import QlitError, qlit_error_in
from qlit.io import atomic_file
from qlit.parse_errors import concise_parse_error
from qlit.study.report import study_entries, study_notes, write_report
from qlit.study.techniques import describe_config, technique
from qlit.subcommands import SUBCOMMANDS

#: The keys a study file may have.
STUDY_KEYS = (
    "name",
    "description",
    "base",
    "output",
    "set",
    "strategies",
    "axes",
    "combine",
    "before",
    "after",
    "eval",
    "memory_policy",
)
#: What a study's ``memory_policy`` may set: the model options that decide what activations cost.
MEMORY_KEYS = ("gradient_checkpointing", "memory_budget")
#: Every cell's memory policy unless the study names its own: each layer recomputed, the memory a technique needs
#: rather than what qlit's speed settings choose to spend.
DEFAULT_MEMORY_POLICY = {"gradient_checkpointing": True, "memory_budget": "auto"}
#: ``memory_policy: as_configured``: each cell keeps the memory options its configs give it.
AS_CONFIGURED = "as_configured"
#: The keys a strategy may have.
STRATEGY_KEYS = ("from", "label", "set", "axes", "combine")
#: What ``before``/``after`` may list: a ``qlit`` subcommand run on the cell's config.
STAGES = ("validate", "test")
EVAL_KEYS = ("tasks", "limit")
STATE_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"


def _adapter(class_path: str, **identity: Any) -> dict[str, Any]:
    return {"class_path": class_path, "init_args": {**identity, "task_type": "CAUSAL_LM"}}


def _builtin(
    adapter: dict[str, Any] | None,
    quantization: Mapping[str, Any] | None = None,
    **defaults: Any,
) -> dict[str, Any]:
    fragment: dict[str, Any] = {"model.init_args.adapter": adapter}
    if quantization is not None:
        fragment["model.init_args.quantization"] = dict(quantization)
    return {"set": fragment, "defaults": {"model.init_args.adapter.init_args": defaults} if defaults else {}}


_LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}  # the QLoRA recipe's, on every layer


def _backend_builtin(strategy: Mapping[str, Any]) -> dict[str, Any]:
    """A backend's declared strategy (:attr:`qlit.models.quant.QuantBackend.strategies`) as a built-in."""
    quantization = {k: v for k, v in strategy.items() if k != "lora"}
    if strategy.get("lora"):
        return _builtin(_adapter("peft.LoraConfig"), quantization, **_LORA_DEFAULTS)
    return _builtin(None, quantization)


#: Built-in strategies. ``set`` is what makes the technique (how the base is stored, which adapter) and always
#: applies; ``defaults`` are the adapter's hyperparameters where the config gives none (a base config with a LoRA
#: keeps its own rank). The techniques set the quantization; the peft methods leave it to the base config or an axis.
#: A cell's label is the technique its config amounts to (``QLoRA (NF4 + DQ)``, ``IA3 on 8-bit``) unless the study's
#: strategy names one. Each quantization backend declares its own techniques (8-bit + LoRA, QLoRA, BitNet, ...):
#: :func:`builtin_strategies` adds them after ``full`` and ``lora``.
PEFT_STRATEGIES: dict[str, dict[str, Any]] = {
    "full": _builtin(None, {"mode": "none", "double_quant": None}),
    "lora": _builtin(_adapter("peft.LoraConfig"), {"mode": "none", "double_quant": None}, **_LORA_DEFAULTS),
    "dora": _builtin(_adapter("peft.LoraConfig", use_dora=True, use_rslora=False), **_LORA_DEFAULTS),
    "rslora": _builtin(_adapter("peft.LoraConfig", use_rslora=True, use_dora=False), **_LORA_DEFAULTS),
    # LoRA's other starts, on the base config's quantization (LoftQ needs a 4-bit one, as the demo's NF4).
    **{
        init: _builtin(_adapter("peft.LoraConfig", init_lora_weights=init, use_dora=False), **_LORA_DEFAULTS)
        for init in ("pissa", "olora", "eva", "loftq")
    },
    # AdaLoRA needs the run's length: a study sets model.init_args.adapter.init_args.total_step.
    "adalora": _builtin(
        _adapter("peft.AdaLoraConfig"), init_r=12, target_r=8, lora_alpha=32, target_modules="all-linear"
    ),
    "ia3": _builtin(_adapter("peft.IA3Config")),
    "loha": _builtin(_adapter("peft.LoHaConfig"), r=8, alpha=16, target_modules="all-linear"),
    "lokr": _builtin(_adapter("peft.LoKrConfig"), r=8, alpha=16, target_modules="all-linear"),
    "prompt-tuning": _builtin(_adapter("peft.PromptTuningConfig"), num_virtual_tokens=8),
    "prefix-tuning": _builtin(_adapter("peft.PrefixTuningConfig"), num_virtual_tokens=8),
    "p-tuning": _builtin(_adapter("peft.PromptEncoderConfig"), num_virtual_tokens=8),
}


@functools.cache
def builtin_strategies() -> dict[str, dict[str, Any]]:
    """Every built-in strategy: ``full``, ``lora``, the quantization backends' techniques, then the peft methods
    (the backends are imported here, when a study is read, so that ``qlit compare`` stays light)."""
    from qlit.models.quant import backend_strategies

    first, rest = dict(list(PEFT_STRATEGIES.items())[:2]), dict(list(PEFT_STRATEGIES.items())[2:])
    declared = {name: _backend_builtin(strategy) for name, strategy in backend_strategies().items()}
    return {**first, **declared, **rest}


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----- the study file -------------------------------------------------------------------------------------------------
@dataclass
class Strategy:
    """One named branch of a study: config fragments (a built-in's, then the study's), the built-in's defaults,
    its label, and axes of its own."""

    name: str
    label: str | None
    fragment: list[Mapping[str, Any]]
    axes: dict[str, list[tuple[str, Any]]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    combine: str = "cross"


@dataclass
class Cell:
    """One run of the grid.

    Args:
        name: readable and unique (``qlora-r8``): the name of its run directory.
        strategy: the strategy it belongs to (``None`` in a study without strategies).
        label: what the report calls it: the strategy's label (by default the technique its config amounts to) and
            the axis values that the technique does not say (``QLoRA (NF4 + DQ), r=8``).
        series: the label without the axis values: a line of the report's metric-against-rank plot.
        values: the axis values, as ``(key, shown value)``.
        config: the merged config ``qlit fit`` gets.
        fingerprint: a hash of everything the cell runs; a finished cell whose fingerprint changed is run again.
    """

    name: str
    strategy: str | None
    label: str
    series: str
    values: list[tuple[str, str]]
    config: dict[str, Any]
    fingerprint: str = ""


@dataclass
class Study:
    """A study file, read and checked: see :func:`load_study`."""

    path: Path
    name: str
    description: str
    base: list[Path]
    output: Path
    cells: list[Cell]
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    #: The model options every cell runs under (``None``: each cell's own, ``memory_policy: as_configured``).
    memory_policy: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_MEMORY_POLICY))

    def memory_policy_note(self) -> str:
        """The sentence the report prints above its tables."""
        if self.memory_policy is None:
            return (
                "Memory policy: each cell as its configs set it (`memory_policy: as_configured`): peak memory "
                "compares the cells' settings as much as their techniques."
            )
        shown = [(k, self.memory_policy[k]) for k in MEMORY_KEYS if k in self.memory_policy]
        said = ", ".join(f"`{k}: {_yaml_scalar(v)}`" for k, v in shown if (k, v) != ("memory_budget", "auto"))
        return (
            f"Memory policy: every cell ran with {said} (the study's `memory_policy`), so peak memory compares "
            "the techniques, not the cells' speed settings."
        )


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _memory_policy(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return dict(DEFAULT_MEMORY_POLICY)
    if value == AS_CONFIGURED:
        return None
    if not isinstance(value, dict) or not value:
        raise QlitError(
            f"{where}: 'memory_policy' must be {AS_CONFIGURED} or a mapping of {' and/or '.join(MEMORY_KEYS)}, "
            f"got {value!r}."
        )
    _known_keys(value, MEMORY_KEYS, f"{where}: 'memory_policy'")
    policy = dict(value)
    if policy.get("memory_budget", "auto") != "auto":
        policy.setdefault("gradient_checkpointing", "auto")  # the budget's plan decides layer by layer
    policy.setdefault("memory_budget", "auto")
    policy.setdefault("gradient_checkpointing", DEFAULT_MEMORY_POLICY["gradient_checkpointing"])
    return policy


def load_study(path: str | Path, output: str | Path | None = None) -> Study:
    """Read a study file and expand it into its cells; every mistake is one sentence naming the file and the key.

    Args:
        path: the study file (YAML).
        output: the output folder, instead of the study's ``output`` (default ``logs/studies/<name>``).

    Raises:
        QlitError: the file is missing or not a mapping, a key is unknown, an axis is empty, a strategy names no
            built-in, two cells would share a name, a base config does not exist or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise QlitError(f"Study file '{path}' does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise QlitError(f"Study file '{path}' is not valid YAML{where}: {getattr(err, 'problem', err)}.") from None
    if not isinstance(raw, dict):
        raise QlitError(f"Study file '{path}' must be a mapping with at least 'base' and 'strategies' or 'axes'.")
    where = f"study '{path}'"
    _known_keys(raw, STUDY_KEYS, where)
    name = str(raw.get("name") or path.stem)
    if not _NAME.match(name):
        raise QlitError(f"{where}: name '{name}' must be letters, digits, '.', '_' or '-'.")
    if "base" not in raw:
        raise QlitError(f"{where}: 'base' is missing: name the config every cell starts from (relative to the study).")
    bases = raw["base"] if isinstance(raw["base"], list) else [raw["base"]]
    if not bases or not all(isinstance(b, str) and b for b in bases):
        raise QlitError(f"{where}: 'base' must be a config file or a list of them, got {raw['base']!r}.")
    base_paths = [(path.parent / b) for b in bases]
    config: dict[str, Any] = {}
    for base in base_paths:
        config = merge(config, _read_config(base, where))
    common = _fragment(raw.get("set"), f"{where}: 'set'")
    strategies = _strategies(raw.get("strategies"), where)
    axes = _axes(raw.get("axes"), f"{where}: 'axes'")
    combine = raw.get("combine", "cross")
    if not strategies and not axes:
        raise QlitError(f"{where}: it has neither 'strategies' nor 'axes', so there is nothing to compare.")
    cells = _expand(config, common, strategies, axes, combine, where)
    policy = _memory_policy(raw.get("memory_policy"), where)
    for cell in cells:  # last, over every strategy and axis: one policy for every cell
        for key, value in (policy or {}).items():
            cell.config = merge(cell.config, nest(f"model.init_args.{key}", value))
    before, after = (_stages(raw.get(key), f"{where}: '{key}'") for key in ("before", "after"))
    evaluation = _eval(raw.get("eval"), where)
    out = Path(output) if output is not None else Path(raw.get("output") or Path("logs") / "studies" / name)
    study = Study(
        path, name, str(raw.get("description") or ""), base_paths, out, cells, before, after, evaluation, policy
    )
    for cell in cells:
        cell.fingerprint = _fingerprint(cell, study)
    return study


def _known_keys(raw: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = [str(k) for k in raw if k not in known]
    if unknown:
        raise QlitError(f"{where}: unknown key '{unknown[0]}': the keys are {', '.join(known)}.")


def _read_config(path: Path, where: str) -> dict[str, Any]:
    if not path.is_file():
        raise QlitError(f"{where}: base config '{path}' does not exist (a base is relative to the study file).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise QlitError(f"{where}: base config '{path}' is not valid YAML: {getattr(err, 'problem', err)}.") from None
    if not isinstance(data, dict):
        raise QlitError(f"{where}: base config '{path}' is not a mapping of config keys.")
    return data


def _fragment(value: Any, where: str) -> dict[str, Any]:
    """A config fragment: a mapping of config keys, dotted (``model.init_args.adapter.init_args.r``) or nested."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise QlitError(f"{where} must be a mapping of config keys to values, got {type(value).__name__}.")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise QlitError(f"{where}: '{key}' is not a config key such as model.init_args.adapter.init_args.r.")
        out = merge(out, nest(key, item))
    return out


def nest(key: str, value: Any) -> dict[str, Any]:
    """``nest("a.b", 1)`` → ``{"a": {"b": 1}}``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def merge(base: Any, fragment: Any) -> Any:
    """``fragment`` laid over ``base``: mappings merge key by key; anything else replaces.

    A mapping naming another ``class_path`` than the one it lands on replaces it whole, as on the command line:
    ``adapter: {class_path: peft.IA3Config}`` over a LoRA adapter keeps none of LoRA's arguments.
    """
    if isinstance(fragment, Mapping) and isinstance(base, Mapping):
        if _other_class(base.get("class_path"), fragment.get("class_path")):
            return copy.deepcopy(dict(fragment))
        out = dict(base)
        for key, value in fragment.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(fragment)


def fill(config: Any, defaults: Mapping[str, Any]) -> Any:
    """``config`` with the keys of ``defaults`` it lacks; a key it has (even ``None``) is kept."""
    if not isinstance(config, Mapping):
        return config
    out = dict(config)
    for key, value in defaults.items():
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, Mapping):
            out[key] = fill(out[key], value)
    return out


def _other_class(old: Any, new: Any) -> bool:
    if not isinstance(old, str) or not isinstance(new, str):
        return False
    return old.rsplit(".", 1)[-1] != new.rsplit(".", 1)[-1]


def _strategies(value: Any, where: str) -> list[Strategy]:
    if value is None:
        return []
    if isinstance(value, list):  # built-ins by name
        value = dict.fromkeys(value)
    if not isinstance(value, Mapping) or not value:
        raise QlitError(
            f"{where}: 'strategies' must be a mapping of names to strategies (or a list of built-in names)."
        )
    out = []
    builtins = builtin_strategies()
    for name, spec in value.items():
        here = f"{where}: strategy '{name}'"
        if not isinstance(name, str) or not _NAME.match(name):
            raise QlitError(f"{here}: a strategy's name must be letters, digits, '.', '_' or '-'.")
        spec = {} if spec is None else spec
        if not isinstance(spec, Mapping):
            raise QlitError(f"{here} must be a mapping with keys {', '.join(STRATEGY_KEYS)}.")
        _known_keys(spec, STRATEGY_KEYS, here)
        builtin = spec.get("from", name if name in builtins else None)
        if builtin is not None and builtin not in builtins:
            raise QlitError(f"{here}: 'from: {builtin}' is no built-in strategy: use one of {', '.join(builtins)}.")
        if builtin is None and "set" not in spec:
            raise QlitError(
                f"{here} is no built-in strategy and has no 'set': give its config fragment, or name a built-in "
                f"({', '.join(builtins)})."
            )
        fragments = [_fragment(spec.get("set"), f"{here}: 'set'")]
        defaults: dict[str, Any] = {}
        if builtin is not None:
            fragments.insert(0, _fragment(builtins[builtin]["set"], here))
            defaults = _fragment(builtins[builtin]["defaults"], here)
        label = spec.get("label")
        if label is not None and not isinstance(label, str):
            raise QlitError(f"{here}: 'label' must be text, got {label!r}.")
        strategy_axes = _axes(spec.get("axes"), f"{here}: 'axes'")
        out.append(Strategy(name, label, fragments, strategy_axes, defaults, spec.get("combine", "cross")))
    return out


def _axes(value: Any, where: str) -> dict[str, list[tuple[str, Any]]]:
    """Axes as ``key → [(shown name, value)]``: a list of values, or a mapping of names to values."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise QlitError(f"{where} must be a mapping of config keys to lists of values.")
    out: dict[str, list[tuple[str, Any]]] = {}
    for key, values in value.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise QlitError(f"{where}: '{key}' is not a config key such as model.init_args.adapter.init_args.r.")
        if isinstance(values, Mapping):
            named = [(str(n), v) for n, v in values.items()]
        elif isinstance(values, list):
            named = [(_shown(key, v), v) for v in values]
        else:
            raise QlitError(f"{where}: '{key}' must list its values ([4, 8, 16]) or name them ({{small: ...}}).")
        if not named:
            raise QlitError(f"{where}: '{key}' has no values.")
        shown = [n for n, _ in named]
        if len(set(shown)) != len(shown):
            raise QlitError(f"{where}: '{key}' has a value twice ({', '.join(shown)}).")
        out[key] = named
    return out


def _shown(key: str, value: Any) -> str:
    """How an axis value appears in a cell's name: ``r8``, ``lr0.0002``, ``nf4``."""
    short = key.rsplit(".", 1)[-1]
    if isinstance(value, bool) or value is None:
        return f"{short}-{str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}"
    if isinstance(value, str):
        return re.sub(r"[^A-Za-z0-9._-]+", "_", value.rsplit("/", 1)[-1]).strip("_") or short
    return short + "-" + hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _stages(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    stages = value if isinstance(value, list) else [value]
    for stage in stages:
        if stage not in STAGES:
            raise QlitError(f"{where}: '{stage}' is no stage: use {' or '.join(STAGES)}.")
    return list(dict.fromkeys(stages))


def _eval(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    here = f"{where}: 'eval'"
    if not isinstance(value, Mapping):
        raise QlitError(f"{here} must be a mapping such as {{tasks: [hellaswag], limit: 100}}.")
    _known_keys(value, EVAL_KEYS, here)
    tasks = value.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise QlitError(f"{here}: 'tasks' must list lm-evaluation-harness task names, got {tasks!r}.")
    limit = value.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise QlitError(f"{here}: 'limit' must be a whole number of examples of 1 or more, got {limit!r}.")
    if not _eval_available():
        raise QlitError(
            f"{here}: this qlit has no `qlit eval` subcommand to run the tasks with: remove the key or update qlit."
        )
    return {"tasks": list(tasks), "limit": limit}


def _eval_available() -> bool:
    return "eval" in SUBCOMMANDS


def _expand(
    config: dict[str, Any],
    common: dict[str, Any],
    strategies: list[Strategy],
    axes: dict[str, list[tuple[str, Any]]],
    combine: str,
    where: str,
) -> list[Cell]:
    cells: list[Cell] = []
    branches = strategies or [Strategy("", None, [], {})]
    common_combos = _combine(axes, combine, where)
    for strategy in branches:
        clash = sorted(set(strategy.axes) & set(axes))
        if clash:
            raise QlitError(f"{where}: axis '{clash[0]}' is both the study's and strategy '{strategy.name}''s.")
        here = f"{where}: strategy '{strategy.name}'"
        # Its own axes first, crossed with the study's: qlora-r8-squad, the study's axes varying slowest.
        combos = [own + shared for shared in common_combos for own in _combine(strategy.axes, strategy.combine, here)]
        for combo in combos:
            merged = merge(config, common)
            for i, fragment in enumerate(strategy.fragment):
                merged = merge(merged, fragment)
                if i == 0 and strategy.defaults:  # under the built-in's set, before the study's own
                    merged = fill(merged, strategy.defaults)
            for key, _, value in combo:
                merged = merge(merged, nest(key, value))
            values = [(key, shown) for key, shown, _ in combo]
            name = "-".join(p for p in (strategy.name, *(n for _, n in values)) if p) or "base"
            series = strategy.label or _technique_of(merged) or strategy.name or name
            # The report groups by task, so a data axis needs no word; the technique says its own settings.
            said = [
                _value_text(k, n)
                for k, n in values
                if k != "data" and (strategy.label or not k.endswith(_IN_TECHNIQUE))
            ]
            label = ", ".join([series, *said])
            cells.append(Cell(name, strategy.name or None, label, series, values, merged))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in seen:
            raise QlitError(
                f"{where}: two cells would be named '{cell.name}': name the axis values ({{name: value, ...}})."
            )
        seen[cell.name] = cell
    return cells


#: Config keys whose values the derived technique label already says.
_IN_TECHNIQUE = (
    "quantization",
    "quantization.mode",
    "quantization.double_quant",
    "init_args.adapter",
    "adapter.init_args.init_lora_weights",  # PiSSA, LoftQ, ...
    "dtype",
)


def _technique_of(config: Mapping[str, Any]) -> str | None:
    d = describe_config(config)
    return technique(
        d.get("quantization"),
        d.get("adapter"),
        d.get("double_quant"),
        d.get("compute_dtype"),
        d.get("bits"),
        d.get("scheme"),
    )


def _combine(axes: dict[str, list[tuple[str, Any]]], combine: str, where: str) -> list[list[tuple[str, str, Any]]]:
    """Each combination of ``axes`` as ``[(key, shown value, value)]``: the cross product, or the zipped values."""
    keys = list(axes)
    if combine not in ("cross", "zip"):
        raise QlitError(f"{where}: combine is '{combine}': use cross or zip.")
    if combine == "zip":
        lengths = {key: len(axes[key]) for key in keys}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{k} ({n})" for k, n in lengths.items())
            raise QlitError(f"{where}: combine: zip needs axes of one length, but they have {listed}.")
        combos = list(zip(*(axes[k] for k in keys), strict=True)) if keys else [()]
    else:
        combos = list(product(*(axes[k] for k in keys)))
    return [[(key, shown, value) for key, (shown, value) in zip(keys, combo, strict=True)] for combo in combos]


def _value_text(key: str, shown: str) -> str:
    short = key.rsplit(".", 1)[-1]
    return f"{short}={shown[len(short) :]}" if shown.startswith(short) and shown[len(short) :][:1].isdigit() else shown


def _fingerprint(cell: Cell, study: Study) -> str:
    what = {"config": cell.config, "before": study.before, "after": study.after, "eval": study.eval}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----- checking every cell's config -----------------------------------------------------------------------------------
def cell_config(study: Study, cell: Cell) -> dict[str, Any]:
    """The config ``qlit fit`` gets for ``cell``: the merged config, logging to the study's folder.

    The logger is TensorBoard (what the report reads) whatever the base config names: ``<output>/runs/<cell>/fit``.
    """
    config = copy.deepcopy(cell.config)
    trainer = config.setdefault("trainer", {})
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str((study.output / "runs").resolve()), "name": cell.name, "version": "fit"},
    }
    callbacks = trainer.get("callbacks") or []
    bars = [c for c in callbacks if isinstance(c, Mapping) and "ProgressBar" in str(c.get("class_path", ""))]
    if not bars:  # the cell's output goes to a log file: the sweep prints its own progress line
        trainer.setdefault("enable_progress_bar", False)
    return config


def check_cells(study: Study, cells: Sequence[Cell] | None = None) -> dict[str, str]:
    """Parse each cell's config with ``qlit fit``'s parser and build its model's settings (no weights load).

    Args:
        study: the study.
        cells: the cells to check (default: all of them).

    Returns:
        ``cell name → reason`` for the cells whose model refuses its settings (a peft method that the quantization
        cannot train, a peft config that refuses its values): they are recorded as failed without being started.

    Raises:
        QlitError: a cell's config does not parse (an unknown key, a value of the wrong type): one sentence naming
            the cell and the key.
    """
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningArgumentParser

    from qlit.module import QLitModule
    from qlit.trainer_cli import QlitCLI

    class ParseOnly(QlitCLI):
        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    model_parser = LightningArgumentParser(exit_on_error=False)
    model_parser.add_lightning_class_args(QLitModule, "model", subclass_mode=True)
    instantiate = getattr(model_parser, "instantiate", None) or model_parser.instantiate_classes
    refused: dict[str, str] = {}
    cli: ParseOnly | None = None  # one parser for every cell: building LightningCLI's parser is the slow part
    for cell in study.cells if cells is None else cells:
        where = f"study '{study.path}': cell '{cell.name}'"
        try:
            with warnings.catch_warnings():  # "args and sys.argv both given": the sweep's own argv, not a mistake
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                if cli is None:
                    cli = ParseOnly(args=cell_config(study, cell), run=False)
                else:  # the steps of LightningCLI.__init__ up to instantiation, on the same parser
                    cli.parse_arguments(cli.parser, cell_config(study, cell))
                    cli._parse_ckpt_path()
                    cli.before_instantiate_classes()
                parsed = cli.config
        except ArgumentError as err:
            raise QlitError(f"{where}: {concise_parse_error(str(err))}.") from None
        except (QlitError, ValueError) as err:
            cause = qlit_error_in(err)
            if cause is None:
                raise
            raise QlitError(f"{where}: {cause}") from None
        try:
            instantiate(type(parsed)(model=parsed.model))
        except (QlitError, ValueError) as err:  # QLitModule's checks, or the peft config's own (AdaLoRA's total_step)
            cause = qlit_error_in(err)
            refused[cell.name] = str(cause) if cause is not None else concise_parse_error(str(err))
    return refused


# ----- the state of a sweep -------------------------------------------------------------------------------------------
@dataclass
class CellState:
    """What a sweep recorded about one cell (``sweep.json``).

    ``status`` is ``done``, ``failed`` (``reason`` says why), ``interrupted`` or ``running`` (the sweep stopped
    during it); only ``done`` and ``failed`` cells of an unchanged fingerprint are finished.
    """

    status: str
    fingerprint: str
    label: str | None = None
    series: str | None = None
    strategy: str | None = None
    values: list[list[str]] = field(default_factory=list)
    reason: str | None = None
    seconds: float | None = None
    started: str | None = None
    finished: str | None = None
    stages: list[str] = field(default_factory=list)


def read_state(out: Path) -> dict[str, CellState]:
    path = out / STATE_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {name: CellState(**fields) for name, fields in raw["cells"].items()}
    except (ValueError, KeyError, TypeError) as err:
        raise QlitError(f"'{path}' is damaged ({err}): delete it to run every cell again.") from None


def write_state(out: Path, study: Study, states: Mapping[str, CellState]) -> None:
    data = {
        "study": study.name,
        "file": str(study.path),
        "description": study.description,
        "order": [cell.name for cell in study.cells],
        "cells": {name: vars(state) for name, state in states.items()},
    }
    with atomic_file(out / STATE_FILE) as staging:
        staging.write_text(json.dumps(data, indent=2))


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One sweep at a time per output folder; a lock left by a process that no longer runs is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise QlitError(
                    f"Another sweep (process {pid}) is running in '{out}': wait for it or stop it."
                ) from None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----- running --------------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """The sweep received SIGTERM or Ctrl+C."""


class Runner:
    """Runs cells one after another in child processes; SIGTERM or Ctrl+C stops the running cell cleanly.

    The first signal is passed on to the running cell (which finishes its batch, writes ``last.ckpt`` and exits)
    and no further cell starts; a second one kills the cell at once.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signals = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Runner:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM if self.signals == 1 else signal.SIGKILL)

    def run(self, argv: list[str], log: Path) -> int:
        """Run ``python -m qlit ARGV`` with its output in ``log``; its exit code (negative: killed by a signal)."""
        if self.signals:
            raise Interrupted
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("w") as out:
            # Its own session: a Ctrl+C in the terminal reaches the sweep only, which passes it on once.
            self.child = subprocess.Popen(
                [sys.executable, "-m", "qlit", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            try:
                return self.child.wait()  # our signal handler runs meanwhile; wait() resumes after it (PEP 475)
            finally:
                self.child = None


def _die_with_parent() -> None:  # runs in the child, before exec
    """Linux: the cell gets SIGTERM (and checkpoints) if the sweep itself is killed, rather than running on alone."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def failure_reason(code: int, log: Path) -> str:
    """One line saying why a cell's process failed: qlit's one-sentence error, or the last line of a crash."""
    lines = [line.strip() for line in _tail(log).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("qlit: error:"):
            return line.removeprefix("qlit: error:").strip()
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    last = lines[-1] if lines else f"exited with code {code} and no output"
    return last if len(last) <= 300 else last[:297] + "..."


def _tail(path: Path, size: int = 16384) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def run_dir(study: Study, cell: Cell) -> Path:
    """The cell's folder: ``runs/<cell>/`` with ``fit/`` (the run), its stages' runs and their logs."""
    return study.output / "runs" / cell.name


def _run_cell(study: Study, cell: Cell, runner: Runner, config_path: Path) -> tuple[str, str | None, list[str]]:
    """Run the cell's stages; ``(status, reason, stages that ran)``."""
    folder = run_dir(study, cell)
    if folder.exists():  # what an unfinished attempt left: the cell starts again from nothing
        shutil.rmtree(folder)
    ckpt = folder / "fit" / "checkpoints" / "last.ckpt"
    steps: list[tuple[str, list[str]]] = [
        (f"before-{stage}", [stage, "--config", str(config_path)]) for stage in study.before
    ]
    steps.append(("fit", ["fit", "--config", str(config_path)]))
    steps += [(stage, [stage, "--config", str(config_path), "--ckpt_path", str(ckpt)]) for stage in study.after]
    if study.eval is not None:
        steps.append(("eval", _eval_argv(study.eval, folder / "fit")))
    done: list[str] = []
    for stage, argv in steps:
        if stage not in ("fit", "eval"):
            argv += ["--trainer.logger.init_args.version", stage]
        code = runner.run(argv, folder / f"{stage}.log")
        if runner.signals:
            raise Interrupted
        if code != 0:
            reason = failure_reason(code, folder / f"{stage}.log")
            return "failed", reason if stage == "fit" else f"{stage}: {reason}", done
        done.append(stage)
    return "done", None, done


def _eval_argv(evaluation: Mapping[str, Any], fit_dir: Path) -> list[str]:
    """``qlit eval`` of the trained cell: its adapter, or (full fine-tuning) its last checkpoint; the scores are
    logged into the cell's run as ``eval/<task>/<metric>``, which the report shows."""
    adapter = fit_dir / "adapter"
    source = adapter if (adapter / "adapter_config.json").is_file() else fit_dir / "checkpoints" / "last.ckpt"
    argv = ["eval", "--adapter", str(source), "--tasks", ",".join(evaluation["tasks"])]
    if evaluation.get("limit") is not None:
        argv += ["--limit", str(evaluation["limit"])]
    return argv


def sweep(
    study: Study,
    *,
    dry_run: bool = False,
    retry_failed: bool = False,
    echo: Any = None,
) -> int:
    """Check ``study``, run its unfinished cells and write the report; the exit code (143 when interrupted).

    Args:
        study: from :func:`load_study`.
        dry_run: check and list the cells, run nothing.
        retry_failed: run the cells that failed before again (by default a failed cell is finished).
        echo: where progress lines go.
    """
    echo = echo or partial(print, flush=True)  # progress lines as they happen, also through a pipe
    out = study.output
    states = read_state(out) if out.exists() else {}

    def finished(cell: Cell) -> bool:
        state = states.get(cell.name)
        if state is None or state.fingerprint != cell.fingerprint:
            return False
        return state.status == "done" or (state.status == "failed" and not retry_failed)

    todo = [cell for cell in study.cells if not finished(cell)]
    to_run = {cell.name for cell in todo}
    refused = check_cells(study, todo)  # before any cell runs: a mistake in the last cell stops the first one
    if dry_run:
        echo(_listing(study, states, finished, refused))
        return 0
    total = len(study.cells)
    echo(
        f"qlit sweep: {study.name}, {total} cells ({total - len(todo)} finished earlier), output {out}"
        if len(todo) != total
        else f"qlit sweep: {study.name}, {total} cells, output {out}"
    )
    start = time.monotonic()
    ran: list[float] = []
    with _lock(out), Runner() as runner:
        (out / "cells").mkdir(parents=True, exist_ok=True)
        try:
            for index, cell in enumerate(study.cells, 1):
                head = f"[{index}/{total}] {cell.name}"
                if cell.name not in to_run:
                    echo(f"{head}: {states[cell.name].status} earlier, skipped")
                    continue
                config_path = out / "cells" / f"{cell.name}.yaml"
                _write_cell_config(config_path, cell_config(study, cell))
                state = CellState(
                    "running",
                    cell.fingerprint,
                    cell.label,
                    cell.series,
                    cell.strategy,
                    [list(v) for v in cell.values],
                    started=_now(),
                )
                if cell.name in refused:
                    state.status, state.reason, state.finished = "failed", refused[cell.name], _now()
                    states[cell.name] = state
                    write_state(out, study, states)
                    echo(f"{head}: failed (refused when the config was read): {state.reason}")
                    continue
                states[cell.name] = state
                write_state(out, study, states)
                echo(f"{head}: running (log: {run_dir(study, cell) / 'fit.log'})")
                t0 = time.monotonic()
                try:
                    state.status, state.reason, state.stages = _run_cell(study, cell, runner, config_path)
                except Interrupted:
                    state.status, state.seconds = "interrupted", time.monotonic() - t0
                    write_state(out, study, states)
                    raise
                state.seconds, state.finished = time.monotonic() - t0, _now()
                write_state(out, study, states)
                ran.append(state.seconds)
                left = sum(1 for c in study.cells[index:] if c.name in to_run and c.name not in refused)
                eta = f" · about {_duration(left * sum(ran) / len(ran))} left" if left else ""
                what = "done" if state.status == "done" else f"failed: {state.reason}"
                echo(
                    f"{head}: {what} in {_duration(state.seconds)} · elapsed {_duration(time.monotonic() - start)}{eta}"
                )
        except Interrupted:
            echo("qlit sweep: interrupted; run the same command again to redo the unfinished cells.")
            return 143
    state, entries = study_entries(study.output)
    notes = [study.memory_policy_note(), *study_notes(state)]
    written = write_report(entries, study.output, f"Study: {study.name}", study.description, notes)
    failed = sum(1 for c in study.cells if states[c.name].status != "done")
    echo(
        f"qlit sweep: {total - failed} of {total} cells done"
        + (f", {failed} failed" if failed else "")
        + f" in {_duration(time.monotonic() - start)}; report: {written[0]}"
    )
    return 0


def _write_cell_config(path: Path, config: dict[str, Any]) -> None:
    text = f"# qlit fit --config {path}\n" + yaml.safe_dump(config, sort_keys=False)
    with atomic_file(path) as staging:
        staging.write_text(text)


def _listing(study: Study, states: Mapping[str, CellState], finished: Any, refused: Mapping[str, str]) -> str:
    lines = [f"{study.name}: {len(study.cells)} cells, output {study.output}"]
    width = max(len(c.name) for c in study.cells)
    for index, cell in enumerate(study.cells, 1):
        if cell.name in refused:
            status = f"will fail: {refused[cell.name]}"
        elif finished(cell):
            status = f"{states[cell.name].status} earlier"
        else:
            status = "to run"
        lines.append(f"{index:>3}. {cell.name:<{width}}  {cell.label}  [{status}]")
    return "\n".join(lines)


def list_strategies() -> str:
    """The built-in strategies as YAML: their labels and config fragments."""
    return yaml.safe_dump(builtin_strategies(), sort_keys=False)


# ----- command line ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, prog: str = "qlit sweep") -> None:
    """``qlit sweep STUDY.yaml [--dry-run] [--output DIR] [--retry-failed]``.

    A user error is printed in one line on stderr and exits with code 1; an interrupted sweep exits with 143.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a study: every cell of a grid of strategies and axes as its own qlit run, then one report.",
    )
    parser.add_argument("study", nargs="?", metavar="STUDY.yaml", help="the study file (see configs/studies/)")
    parser.add_argument("--dry-run", action="store_true", help="check the study and list its cells; run nothing")
    parser.add_argument("--output", metavar="DIR", help="output folder (default: the study's, logs/studies/<name>)")
    parser.add_argument("--retry-failed", action="store_true", help="run the cells that failed before again")
    parser.add_argument("--list-strategies", action="store_true", help="print the built-in strategies and exit")
    args = parser.parse_args(argv)
    if args.list_strategies:
        print(list_strategies(), end="")
        return
    if args.study is None:
        parser.error("the study file is required")
    try:
        study = load_study(args.study, output=args.output)
        code = sweep(study, dry_run=args.dry_run, retry_failed=args.retry_failed)
    except QlitError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # while the study was being checked: no cell had started
        print(f"{prog}: interrupted before any cell ran", file=sys.stderr)
        raise SystemExit(130) from None
    if code:
        raise SystemExit(code)
