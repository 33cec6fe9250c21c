"""The package's modules import each other without cycles (module-level imports, as Python runs them)."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

import lightning_autodp

ROOT = Path(lightning_autodp.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module, known: set[str] | None) -> set[str]:
    """Modules imported when the module runs (not inside functions or TYPE_CHECKING); of ``known`` only."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            if isinstance(sub, ast.Import):
                names = [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names = [sub.module] + [f"{sub.module}.{a.name}" for a in sub.names]
            else:
                continue
            out.update(n for n in names if known is None or n in known)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        deps = _top_level_imports(ast.parse(path.read_text()), known)
        # importing a.b.c runs a and a.b first; a package's own __init__ does not count as a cycle
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "lightning_autodp.integration.strategy" in graph["lightning_autodp.integration.callbacks"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    # mutation: a graph with a cycle must be reported
    graph = import_graph()
    graph["lightning_autodp.mechanism.clipping"] = {"lightning_autodp.integration.strategy"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def _imports_lightning(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    names = _top_level_imports(tree, known=None)
    return any(n == "lightning" or n.startswith("lightning.") for n in names)


def test_the_mechanism_runs_no_lightning_import():
    """Nothing the mechanism imports, directly or through other modules of the package, imports Lightning."""
    graph = import_graph()
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    reached, todo = set(), [m for m in graph if m.startswith("lightning_autodp.mechanism.")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
            parent = module.rpartition(".")[0]
            if (
                parent != "lightning_autodp"
            ):  # importing a.b.c runs a.b's __init__ (the root's does import it)
                todo.append(parent)
    assert "lightning_autodp.mechanism.calibration" in reached
    offenders = sorted(m for m in reached if _imports_lightning(files[m]))
    assert offenders == []


def test_the_mechanism_imports_neither_safeguards_nor_integration():
    """The layers point one way: safeguards and the Lightning integration use the mechanism, not back."""
    graph = import_graph()
    mechanism = [m for m in graph if m.startswith("lightning_autodp.mechanism.")]
    assert "lightning_autodp.mechanism.sharded" in mechanism
    upward = sorted(
        (m, dep)
        for m in mechanism
        for dep in graph[m]
        if dep.startswith(("lightning_autodp.safeguards", "lightning_autodp.integration"))
    )
    assert upward == []


#: the one module outside the integration that imports it: the audit's command line runs a Trainer
_CLI = "lightning_autodp.safeguards.audit.__main__"


def test_only_the_integration_imports_the_integration():
    """Engines and safeguards are usable without the Lightning glue (private accesses sit in _compat)."""
    graph = import_graph()
    assert "lightning_autodp.engines.hooks" in graph and "lightning_autodp._compat" in graph
    upward = sorted(
        (m, dep)
        for m in graph
        if m.startswith(
            ("lightning_autodp.engines", "lightning_autodp.safeguards", "lightning_autodp.mechanism")
        )
        and m != _CLI
        for dep in graph[m]
        if dep.startswith("lightning_autodp.integration")
    )
    assert upward == []


def test_sources_compile_without_warnings():
    """No SyntaxWarning (e.g. an invalid escape in a docstring) on the first import of any module."""
    examples = ROOT.parent / "examples"
    for path in [*ROOT.rglob("*.py"), *examples.glob("*.py")]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(), str(path), "exec")


def test_an_invalid_escape_is_caught():
    # mutation: a docstring with math and no r prefix, as one in accounting.py had
    with warnings.catch_warnings(), pytest.raises(SyntaxError):
        warnings.simplefilter("error")
        compile('def f():\n    """:math:`\\log T`"""\n', "<mutant>", "exec")
