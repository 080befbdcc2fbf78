"""The layers of design.md import one way: no module of pqjax, convert or pallas_kernels
imports (directly or through others) a module that imports it back, and the kernels load
only jax and pqjax.formats.

An import counts wherever it is written, at the top of a file or inside a function (a deferred
import is still a dependency); only `if TYPE_CHECKING:` blocks, which never run, are left out.
`from package import name` depends on the submodule `package.name` when there is one, else on
the package itself.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pqjax", "pallas_kernels", "convert")


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements outside `if TYPE_CHECKING:` blocks."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _targets(name: str, path: Path, node: ast.Import | ast.ImportFrom, mods) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    base = node.module or ""
    if node.level:
        parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in mods else base)
    return {t for t in out if t in mods}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = set()
        for node in _runtime_imports(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            deps |= _targets(name, path, node, mods)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert "pqjax.backends.dispatch" in graph and "pqjax.models.layers" in graph
    found = cycles(graph)
    detail = [
        [f"{a} -> {b}" for a in comp for b in sorted(graph[a] & set(comp))] for comp in found
    ]
    assert not found, f"import cycles: {detail}"


def test_kernels_import_only_jax_and_formats():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("pallas_kernels"):
            outside = {d for d in deps if not d.startswith(("pallas_kernels", "pqjax.formats"))}
            assert not outside, f"{name} imports {sorted(outside)}"
    code = (
        "import sys, pallas_kernels; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pqjax', 'convert', 'pallas_kernels'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    extra = [m for m in loaded if not m.startswith(("pallas_kernels", "pqjax.formats"))]
    assert extra == ["pqjax"], f"importing pallas_kernels loaded {extra}"


def test_models_import_no_backend_or_quantization():
    """Model files run on their own: no kernels, backends, calibration or quantization."""
    upper = ("pallas_kernels", "pqjax.backends", "pqjax.layers", "pqjax.quantize",
             "pqjax.calibrate", "pqjax.permute", "pqjax.methods")
    for name, deps in import_graph().items():
        if name.startswith("pqjax.models"):
            bad = sorted(d for d in deps if d.startswith(upper))
            assert not bad, f"{name} imports {bad}"


def test_only_the_layers_above_the_engine_import_it():
    """The engine runs methods, quantization and models; the API, the CLI and the engine's
    own modules import it, and nothing below (pipelines run a streamed model by its
    behaviour: `eager`, `on_demand`)."""
    above = ("pqjax.engine", "pqjax.api", "pqjax.cli")
    for name, deps in import_graph().items():
        if not name.startswith(above):
            bad = sorted(d for d in deps if d.startswith("pqjax.engine"))
            assert not bad, f"{name} imports {bad}"
