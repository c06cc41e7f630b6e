"""The architecture as a test: the import graph of `kvtrain/`, read from the source, has no cycle, and no module
imports a layer above its own (docs/architecture.md lists the layers).

The graph counts every import statement wherever it stands (module level, inside functions, under
`TYPE_CHECKING`), and importing `kvtrain.a.b` counts as importing the package `kvtrain.a` too, since Python runs
that package's `__init__` first (except from inside `kvtrain.a`, which is initialising already).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import kvtrain

PACKAGE = Path(kvtrain.__file__).parent

# Bottom to top. A module may import its own layer and those below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("kvtrain.errors", "kvtrain.typecheck", "kvtrain.io", "kvtrain.data", "kvtrain.models"),
    ("kvtrain.artifacts",),
    ("kvtrain.policies", "kvtrain.lowrank", "kvtrain.quant", "kvtrain.kernels"),
    ("kvtrain.config", "kvtrain.arguments"),
    ("kvtrain.runtime",),
    ("kvtrain.calibrate", "kvtrain.eval", "kvtrain.training"),
    ("kvtrain.cli", "kvtrain.quickstart", "kvtrain.hub"),
]
# Within the jobs layer: evaluation is what training reports with, never the other way round.
FORBIDDEN = [("kvtrain.eval", "kvtrain.training"), ("kvtrain.calibrate", "kvtrain.training")]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_of(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The kvtrain modules `path` imports (resolved to modules, parents included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from kvtrain import Name` imports the module that defines the public name.
                public = kvtrain._PUBLIC.get(alias.name) if base == "kvtrain" else None
                targets.add(sub if sub in known else public or base)
    resolved = set()
    for target in targets:
        while target and target not in known:  # `import kvtrain.x.y as z` of a module that moved: report it
            target = target.rpartition(".")[0] if target.startswith("kvtrain.") else ""
        parts = target.split(".")
        resolved.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))  # parents run first
    # A module's own packages are initialising already when it runs: importing through them adds no edge.
    ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    return {t for t in resolved - ancestors - {name} if t in known}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = modules_of(root)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        here = layer_of(module)
        for target in targets:
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                found.append(f"{module} (layer {here}) imports {target} (layer {there})")
            if any(module.startswith(a) and target.startswith(b) for a, b in FORBIDDEN):
                found.append(f"{module} imports {target}")
    return sorted(found)


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(import_graph()) == []


def test_every_module_has_a_layer():
    graph = import_graph()
    assert sorted(m for m in graph if m != "kvtrain" and layer_of(m) is None) == []


def test_the_checks_find_a_planted_cycle_and_an_upward_import(tmp_path):
    root = tmp_path / "kvtrain"
    (root / "runtime").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "runtime" / "__init__.py").write_text("")
    (root / "config.py").write_text("def f():\n    from kvtrain.runtime.cache import X\n")
    (root / "runtime" / "cache.py").write_text("from kvtrain.config import f\nX = 1\n")
    graph = import_graph(root)
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) >= {"kvtrain.config", "kvtrain.runtime.cache"}
    assert upward_imports(graph) == ["kvtrain.config (layer 3) imports kvtrain.runtime (layer 4)",
                                     "kvtrain.config (layer 3) imports kvtrain.runtime.cache (layer 4)"]


def test_importing_the_calibration_package_imports_neither_the_job_nor_the_runtime():
    code = ("import sys, kvtrain.calibrate; "
            "print(sorted(m for m in sys.modules if m.startswith(('kvtrain.calibrate.', 'kvtrain.runtime'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", kvtrain.__all__[1:])
def test_every_public_name_resolves(name):
    assert getattr(kvtrain, name) is not None


def test_no_public_name_is_also_a_subpackage():
    """`from kvtrain import X` must give the same object whatever was imported before: Python sets a subpackage as
    an attribute of its parent once it is imported, so a public name equal to a subpackage's would change meaning."""
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")} | {p.stem for p in PACKAGE.glob("*.py")}
    assert not sorted(set(kvtrain._PUBLIC) & subpackages)
