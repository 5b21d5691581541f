"""The package's import graph has no cycles, counting imports inside functions (issue 8)."""

from __future__ import annotations

import ast
from pathlib import Path

import ssd300

PACKAGE_ROOT = Path(ssd300.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ("ssd300", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, this: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``source`` (module ``this``) imports anywhere: top level,
    inside functions, under TYPE_CHECKING."""
    package = this if is_package else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # "from pkg import mod" imports the module pkg.mod where there is one.
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {
        _module_name(p): imported_modules(p.read_text(), _module_name(p), p.name == "__init__.py", modules)
        for p in paths
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "ssd300.backbone" in graph["ssd300.model"]  # the parser does see the package's edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_checker_sees_function_level_and_relative_imports():
    modules = {"ssd300", "ssd300.checkpoint", "ssd300.model", "ssd300.data", "ssd300.data.images"}
    source = (
        "import torch\n"
        "def f():\n    from .checkpoint import read_torch_file\n"
        "def g():\n    from ssd300.data import images\n"
        "def h():\n    from .. import model\n"
    )
    assert imported_modules(source, "ssd300.data.coco", False, modules) == {
        "ssd300.data", "ssd300.data.images", "ssd300", "ssd300.model"}
    assert imported_modules(source.replace("from ..", "from ."), "ssd300.backbone", False, modules) == {
        "ssd300.checkpoint", "ssd300.data", "ssd300.data.images", "ssd300", "ssd300.model"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
