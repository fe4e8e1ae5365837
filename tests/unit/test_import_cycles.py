"""No import cycles among ftdist's modules, read with ast (nothing is imported).

An edge A -> B means running A's code, at import or inside a function, can import B. Importing
`ftdist.x.y` runs `ftdist/x/__init__.py` first, so it is an edge to ftdist.x as well; but A's own
parent packages are already in sys.modules while A runs, so that implied edge never leads back
to them (a package's __init__ importing its own submodule is not a cycle). Imports under
`if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from collections import deque
from itertools import pairwise
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ftdist"

Graph = dict[str, dict[str, str]]  # module -> {imported module: "file:line" of the first such import}


def module_files(package_dir: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(node: ast.AST):
    """Every Import/ImportFrom under node that can run: module level and function bodies alike."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    skip_body = isinstance(node, ast.If) and _is_type_checking(node.test)
    for child in node.orelse if skip_body else ast.iter_child_nodes(node):
        yield from runtime_imports(child)


def import_targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: dict) -> tuple[set, set]:
    """(modules the statement names, packages it imports on the way) for one import statement."""
    if isinstance(node, ast.Import):
        named = {alias.name for alias in node.names}
        return named, set().union(*(parents(n) for n in named))
    base = node.module or ""
    if node.level:  # relative: `from .x import y` inside importer's package
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    submodules = {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    # `from P import name` needs P's namespace unless every name is a submodule of P.
    named = submodules | ({base} if len(submodules) < len(node.names) else set())
    return named, parents(base) | {base} | set().union(*(parents(n) for n in named))


def import_graph(package_dir: Path) -> Graph:
    files = module_files(package_dir)
    graph: Graph = {name: {} for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in runtime_imports(tree):
            named, passed = import_targets(node, name, path.name == "__init__.py", files)
            for target in named | (passed - parents(name)):
                if target in files and target != name:
                    graph[name].setdefault(target, f"{path.relative_to(package_dir.parent)}:{node.lineno}")
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            at = stack.index(v)
            component = stack[at:]
            del stack[at:]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(graph: Graph, start: str, within: set[str]) -> list[str]:
    came_from: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v].keys() & within):
            if w == start:
                path = [v]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle within {sorted(within)}")


def find_cycles(graph: Graph) -> list[list[str]]:
    """The shortest cycle through each module of each strongly connected component, each once."""
    cycles = set()
    for component in strongly_connected(graph):
        for module in component:
            ring = shortest_cycle(graph, module, set(component))[:-1]
            first = ring.index(min(ring))  # one rotation per cycle, so each is named once
            ring = ring[first:] + ring[:first]
            cycles.add(tuple(ring + ring[:1]))
    return [list(c) for c in sorted(cycles)]


def describe(graph: Graph, cycle: list[str]) -> str:
    where = ", ".join(graph[a][b] for a, b in pairwise(cycle))
    return f"{' -> '.join(cycle)}  ({where})"


def test_ftdist_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert "ftdist.config" in graph["ftdist.train"]  # the walk found imports at all
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (A -> B: running A can import B):\n" + "\n".join(
        describe(graph, c) for c in cycles
    )


def test_cycle_finder_names_every_cycle_of_a_known_graph():
    graph = {
        "a": {"b": "a.py:1"},
        "b": {"a": "b.py:1", "c": "b.py:2"},
        "c": {"b": "c.py:1"},
        "d": {"a": "d.py:1"},  # leads into a cycle without being on one
        "e": {"e": "e.py:1"},
    }
    assert find_cycles(graph) == [["a", "b", "a"], ["b", "c", "b"]]
    assert describe(graph, ["a", "b", "a"]) == "a -> b -> a  (a.py:1, b.py:1)"


def test_import_graph_reads_relative_function_level_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.first import f\n",  # a package importing its own module: no cycle
        "first.py": "from .second import g\n",
        "second.py": "def late():\n    from pkg import first\n",
        "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.leaf\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "import pkg.typed\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.sub.leaf"] == {"pkg.typed": "pkg/sub/leaf.py:1"}
    assert graph["pkg.typed"] == {}
    assert find_cycles(graph) == [["pkg.first", "pkg.second", "pkg.first"]]
