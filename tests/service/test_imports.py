"""The shape of service/: no import cycle between its modules, and no module too long.

Every `import` / `from ... import` is read with `ast`, those inside functions too (a lazy
import dodges a cycle at run time but is still a cycle in the design). `from pkg import x`
is an edge to the submodule `pkg.x` when there is one, else to `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "service"
MAX_LINES = 400
FACADE_AND_WORKER = (
    "service/serving/embedded.py",
    "service/serving/distributed/stream_worker.py",
)
FACADE_AND_WORKER_LINES = 250
"""The embedded facade and the worker loop stay small: the work is in the shared pipeline."""


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module under service/ (a package is its __init__)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names an Import/ImportFrom node refers to (submodules where they are)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    return [origin] + [f"{origin}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the service modules it imports (anywhere in its body)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = _imported(node, name, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):  # `from pkg import sub`: the submodule only
                subs = [n for n in names[1:] if n in modules]
                names = subs + ([names[0]] if len(subs) < len(names) - 1 else [])
            edges.update(n for n in names if n in modules and n != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "service.engine.kvcache" in graph["service.engine.kvzip_engine"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_service_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_compression_does_not_know_the_engine_class():
    graph = import_graph()
    users = sorted(m for m in graph if m.startswith("service.compression") and
                   "service.engine.kvzip_engine" in graph[m])  # fmt: skip
    assert not users, f"import service.engine.kvzip_engine: {users}"


def _long_modules() -> dict[str, int]:
    out = {}
    for path in _modules().values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            out[str(path.relative_to(ROOT))] = n
    return out


def test_no_module_is_over_the_line_limit():
    long = _long_modules()
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_embedded_facade_and_the_worker_are_small():
    sizes = {p: len((ROOT / p).read_text(encoding="utf-8").splitlines()) for p in FACADE_AND_WORKER}
    assert all(n < FACADE_AND_WORKER_LINES for n in sizes.values()), sizes
