"""Import cycles in backend/, read from the source: none at run time; the only ones left
are TYPE_CHECKING imports among the models (their relationships name each other).

Function-level imports count as run-time edges: one that closes a cycle only moves the
cycle to the first call."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "backend"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in BACKEND.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> Iterator[str]:
    """The backend modules an import statement loads: `from backend import redis` loads
    backend.redis, `from backend.models import Account` loads backend.models."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    for alias in node.names:
        full = f"{base}.{alias.name}"
        yield full if full in MODULES else base


def _imports(source: str, package: str) -> Iterator[tuple[str, bool]]:
    """(module imported, whether only under TYPE_CHECKING) for every import in a source,
    wherever it sits: top level, in a function, in a try."""

    def visit(nodes: Iterable[ast.AST], typing_only: bool) -> Iterator[tuple[str, bool]]:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                yield from visit(node.body, True)
                yield from visit(node.orelse, typing_only)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                yield from ((target, typing_only) for target in _targets(node, package))
            elif not isinstance(node, ast.expr):
                yield from visit(ast.iter_child_nodes(node), typing_only)

    yield from visit(ast.parse(source).body, False)


def _graph(*, with_typing: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target, typing_only in _imports(path.read_text(), package):
            if target in MODULES and target != name and (with_typing or not typing_only):
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycle_at_run_time() -> None:
    assert cycles(_graph(with_typing=False)) == []


def test_the_only_cycles_are_typing_imports_among_the_models() -> None:
    found = cycles(_graph(with_typing=True))
    assert found, "the models name each other under TYPE_CHECKING; the graph must see it"
    for component in found:
        assert all(name.startswith("backend.models.") for name in component), component


def test_the_reading_sees_every_kind_of_import() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from backend import redis\n"
        "from . import base\n"
        "if TYPE_CHECKING:\n"
        "    from backend.models.message import Message\n"
        "def later():\n"
        "    try:\n"
        "        import backend.dispatch\n"
        "    except ImportError:\n"
        "        from backend.models import enums\n"
    )
    found = [item for item in _imports(source, "backend.models") if item[0] != "typing"]
    assert found == [
        ("backend.redis", False),
        ("backend.models.base", False),
        ("backend.models.message", True),
        ("backend.dispatch", False),
        ("backend.models.enums", False),
    ]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
