"""The architecture the layout promises, read from the imports of every module (module-level and
inside functions alike): ``kernels`` never imports ``engine``; the training core (``engine/*.py``)
never imports a tool (``engine/tools``) or the CLI; no two modules import each other, directly or
through others; errors come from the one leaf module."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("engine", "kernels")


def modules():
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def imports(path, known):
    """Project modules a file imports: ``import a.b``, ``from a.b import c`` (c when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


GRAPH = {m: imports(p, modules()) for m, p in modules().items()}
CORE = [m for m in GRAPH if m.startswith("engine.") and not m.startswith("engine.tools") and m != "engine.cli"]


def test_the_graph_is_read():
    assert {"engine.train", "engine.strategy", "engine.zero", "kernels.attention"} <= set(GRAPH)
    assert "engine.strategy" in GRAPH["engine.train"] and "kernels.attention" in GRAPH["engine.model"]


def test_kernels_never_import_engine():
    bad = {m: sorted(i for i in deps if i.startswith("engine")) for m, deps in GRAPH.items() if m.startswith("kernels")}
    assert not any(bad.values()), bad


@pytest.mark.parametrize("module", CORE)
def test_the_core_never_imports_a_tool(module):
    bad = sorted(i for i in GRAPH[module] if i.startswith("engine.tools") or i == "engine.cli")
    assert not bad, f"{module} imports {bad}"


def test_no_import_cycle():
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d not in GRAPH or d == m:
                continue
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        state[m] = "done"
        path.pop()
    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_errors_is_a_leaf_and_the_only_place_errors_are_defined():
    assert not any(d.startswith("engine") for d in GRAPH["engine.errors"])
    defined = {}
    for m, path in modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception", "Failure"))
                    for b in node.bases) and m.startswith("engine"):
                defined.setdefault(m, []).append(node.name)
    assert set(defined) == {"engine.errors"}, defined
