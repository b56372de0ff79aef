"""The house imports one way: no import cycle under ``qlit/``, and nothing outside the quantization backends
branches on a quantization mode's name.

The import graph is read from the source with ``ast``, every import statement counted wherever it stands: at the top
of a module, inside a function (a lazy import is still an edge) and under ``if TYPE_CHECKING:``. Its rules:

* ``import qlit.a.b`` is an edge to the module ``qlit.a.b`` (a package's ``__init__``, where ``qlit.a.b`` is one);
* ``from qlit.a import b`` is an edge to ``qlit.a.b`` where ``b`` is a module or package, else to ``qlit.a``;
* relative imports are resolved against the importing module's package;
* the parent packages that Python initialises on the way (``qlit.a`` for ``import qlit.a.b``) are *not* edges:
  otherwise every package's ``__init__`` that imports a submodule, and any submodule importing a sibling by its
  full path, would form a cycle that is none (``qlit.models.quant`` imports ``.base``, ``.bitnet`` imports
  ``qlit.models.quant.base``);
* a module loaded by name at run time (``importlib.import_module``) is no edge: the graph is what the source says.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qlit"
#: Where a quantization mode's name may be compared: its backend.
BACKENDS = PACKAGE / "models" / "quant"


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module under ``package``, by dotted name (a package by its own name, for its ``__init__.py``)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` (its source at ``path``) imports, by the rules above."""
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x, from ..a import b
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    edges.add(f"{source}.{alias.name}")
                elif source in known:
                    edges.add(source)
    edges.discard(name)
    return edges


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(package)
    return {name: imported(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` where it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_qlit_has_no_import_cycle():
    graph = import_graph()
    assert "qlit.cli" in graph and "qlit.models.quant.base" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_import_rules_see_lazy_typing_relative_and_submodule_imports(tmp_path):
    # A package whose every module imports another in one of the ways the rules name: one cycle through them all.
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub import leaf\n")  # `leaf` is a module: an edge to pkg.sub.leaf
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import g\n")  # lazy and relative
    (pkg / "top.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import names\n"  # `names`: not a module
    )
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.sub.leaf"}, "pkg.sub": set(), "pkg.sub.leaf": {"pkg.top"}, "pkg.top": {"pkg"}}
    assert find_cycle(graph) == ["pkg", "pkg.sub.leaf", "pkg.top", "pkg"]
    # The parent package initialised on the way is no edge: a sibling imported by its full path makes no cycle.
    (pkg / "__init__.py").write_text("import pkg.sub.leaf\n")
    (pkg / "sub" / "leaf.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.leaf import x\n")
    (pkg / "top.py").write_text("import pkg.sub.leaf\n")
    assert find_cycle(import_graph(pkg)) is None


# ----- mode names -----------------------------------------------------------------------------------------------------
def backend_mode_names() -> set[str]:
    """Every mode a backend in ``qlit/models/quant/`` serves."""
    from qlit.models.quant import backend_modes

    names = set(backend_modes())
    assert {"none", "int8", "nf4", "fp4", "bitnet"} <= names
    return names


def _is_mode(node: ast.expr) -> bool:
    """``mode``, ``quant_mode``, ``x.mode``, ``x.quantization.mode``, ``x.get("mode")``, ``x["mode"]``."""
    if isinstance(node, ast.Name):
        return node.id == "mode" or node.id.endswith("_mode")
    if isinstance(node, ast.Attribute):
        return node.attr == "mode" or node.attr.endswith("_mode")
    if isinstance(node, ast.Subscript):
        key = node.slice
        return isinstance(key, ast.Constant) and key.value == "mode"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "mode"
    return False


def _strings(node: ast.expr) -> set[str]:
    """The string constants ``node`` is or holds (``"nf4"``, ``("nf4", "fp4")``, ``{"int8"}``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def mode_comparisons(source: str, names: set[str]) -> Iterator[tuple[int, str]]:
    """``(line, code)`` of each comparison of a mode with a literal mode name among ``names`` in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        if any(_is_mode(o) for o in operands) and any(_strings(o) & names for o in operands):
            yield node.lineno, ast.get_source_segment(source, node) or ""


def test_nothing_outside_the_backends_compares_a_mode_with_a_mode_name():
    names = backend_mode_names()
    found = [
        f"{path.relative_to(ROOT)}:{line}: {code}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if BACKENDS not in path.parents
        for line, code in mode_comparisons(path.read_text(), names)
    ]
    assert not found, "ask the quantization backend instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        'ok = self.quantization.mode in ("none", "nf4", "fp4")',
        'if mode == "bitnet":\n    pass',
        'x = spec.get("mode") != "int8"',
        'x = "nf4" == quant_mode',
        'x = cfg["mode"] not in {"fp4"}',
    ],
)
def test_the_mode_check_finds_each_way_of_comparing(code):
    assert [line for line, _ in mode_comparisons(code, backend_mode_names())] == [1]


def test_the_mode_check_leaves_other_comparisons_alone():
    code = 'a = mode == "latent"\nb = kernels == "none"\nc = backend.quantized is True\nd = name == "nf4"\n'
    assert list(mode_comparisons(code, backend_mode_names())) == []
