"""The package's import structure: no cycle among its modules, and no module reaching a
backend except through the gateway (nbkernels.backends), read from the source (AST).

Module-level imports (in a module's body, its ``try`` blocks included) make the graph;
a cycle there is an import order that only works by accident. Imports inside functions
are listed separately: the gateway loads the backend modules that way (triton and the
compiled extension only on first use), and the other allowed ones load an optional
dependency late, never to dodge a cycle.
"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nbkernels"

# (importing module, imported module): function-level imports and why they are allowed
LATE = {
    ("nbkernels.backends", "nbkernels.backends.torch"): "the gateway",
    ("nbkernels.backends", "nbkernels.backends.triton"): "the gateway (imports triton)",
    ("nbkernels.backends", "nbkernels.backends.cuda"): "the gateway (loads nbkernels._C)",
    ("nbkernels.backends", "nbkernels.backends.reference"): "the gateway",
    ("nbkernels.warmup", "nbkernels.backends.triton.kernels"): "triton is optional",
    ("nbkernels.demo.cli", "nbkernels.demo.data"): "--help without torch / sklearn",
    ("nbkernels.demo.cli", "nbkernels.demo.run"): "--help without torch / sklearn",
    ("nbkernels.demo.cli", "nbkernels.demo.report"): "--help without matplotlib",
    ("nbkernels.demo.data", "nbkernels.demo.evaluate"): "sklearn only when splitting",
}


def _name(path):
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_name(p): p for p in PKG.rglob("*.py")}


def _targets(node, module, is_pkg):
    """The nbkernels modules an import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = module if is_pkg else module.rsplit(".", 1)[0]
        for _ in range(max(node.level - 1, 0)):
            base = base.rsplit(".", 1)[0]
        src = node.module if node.level == 0 else ".".join(filter(None, [base, node.module]))
        names = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
    return {n for n in names if n in MODULES}


def _imports(module):
    """(module-level targets, function-level targets) of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    top, late = set(), set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (late if in_function else top).update(
                    _targets(child, module, path.name == "__init__.py"))
            visit(child, nested)

    visit(tree, False)
    return top, late


def test_no_import_cycle():
    graph = {m: {t for t in _imports(m)[0] if t != m and not m.startswith(t + ".")}
             for m in MODULES}
    state, stack = {}, []

    def walk(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                walk(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m)


def test_late_imports_are_the_listed_ones():
    found = {(m, t) for m in MODULES for t in _imports(m)[1] if t != m}
    unexpected = sorted(found - set(LATE))
    assert not unexpected, f"function-level imports not in LATE: {unexpected}"
    gone = sorted(set(LATE) - found)
    assert not gone, f"LATE lists imports that no longer exist: {gone}"


def test_backends_are_reached_through_the_gateway():
    """Above the backends, no module imports a backend module but the gateway (and the
    reference formula, which functional differentiates directly)."""
    above = {m for m in MODULES if not m.startswith("nbkernels.backends")}
    allowed = {"nbkernels.backends", "nbkernels.backends.infinity",
               "nbkernels.backends.reference"}
    for m in sorted(above):
        top, late = _imports(m)
        hits = {t for t in top | late if t.startswith("nbkernels.backends.")} - allowed
        hits -= {t for (src, t) in LATE if src == m}
        assert not hits, f"{m} imports {sorted(hits)} directly, not through nbkernels.backends"
