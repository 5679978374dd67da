"""The package's import graph, computed from the source with ``ast`` (issue 16 item 3).

Rules of the graph:

* every ``import`` and ``from ... import`` in a module counts, at module level and inside
  functions or methods alike (a lazy import is still a dependency);
* imports under ``if TYPE_CHECKING:`` do not count: they never run, so they cannot form a
  runtime cycle (they are how a module names a type of a module above it);
* relative imports are resolved against the importing module's package, and
  ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``;
* importing ``a.b.c`` is an edge to ``a.b.c`` only, not to the parent packages whose
  ``__init__`` Python also runs (an ``__init__`` that re-exports its submodules would
  otherwise make every submodule import a cycle).

Asserted: the graph has no cycle, and nothing under ``vmdk/`` imports from ``qcow2/``.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "diskimg"


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted((SRC / PKG).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        out.update(t for t in targets if t in modules and t != name)
    return out


@functools.cache  # the source does not change during a run: parse it once
def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        iters = [iter(sorted(graph[root]))]
        state[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_graph_is_computed() -> None:
    """The walker sees function-level imports and resolves relative and
    ``from pkg import mod`` forms (the graph test below would pass vacuously otherwise)."""
    g = import_graph()
    assert "diskimg.qcow2.image" in g and "diskimg.device" in g["diskimg.qcow2.image"]
    # a lazy, function-level import: qcow2/image.py's check() imports the checker
    assert "diskimg.qcow2.check" in g["diskimg.qcow2.image"]
    # `from diskimg.vmdk import sparse as S` is an edge to the module vmdk.sparse
    assert "diskimg.vmdk.sparse" in g["diskimg.vmdk.image"]


def test_find_cycle_reports_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_vmdk_imports_nothing_from_qcow2() -> None:
    bad = {(m, t) for m, deps in import_graph().items() if m.startswith("diskimg.vmdk")
           for t in deps if t == "diskimg.qcow2" or t.startswith("diskimg.qcow2.")}
    assert not bad, sorted(bad)


def test_nothing_below_the_cli_imports_it() -> None:
    """The CLI is the top layer: no module outside ``cli/`` imports from it, lazily or not
    (``ImageInfo.__str__`` renders through ``info_text``, below it).  ``__main__`` is the
    entry point that runs it."""
    bad = {(m, t) for m, deps in import_graph().items()
           if not (m == "diskimg.cli" or m.startswith("diskimg.cli.")) and m != "diskimg.__main__"
           for t in deps if t == "diskimg.cli" or t.startswith("diskimg.cli.")}
    assert not bad, sorted(bad)
