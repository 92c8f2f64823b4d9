"""The package's shape: no import cycle (imports inside functions count too, so none can
hide one), the settings table imports nothing heavy, and the layers depend one way."""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "pgbd_defense"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + (node.module.split(".") if node.module else []))
                for alias in node.names:  # "from . import x" may name a module
                    candidate = f"{target}.{alias.name}"
                    edges.add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "pgbd_defense.pipeline" in graph and graph["pgbd_defense.run"]  # the graph was read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_layers_depend_one_way():
    """The settings table and the utilities import nothing above them; the method never
    imports a defense, a command, or the benchmark plugin."""
    graph = import_graph()

    def reaches(start: str) -> Set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    for low in ("pgbd_defense.settings", "pgbd_defense.errors", "pgbd_defense.util.registry"):
        assert reaches(low) <= {m for m in graph if m.startswith(("pgbd_defense.settings", "pgbd_defense.errors"))}
    for module in [m for m in graph if m.startswith("pgbd_defense.method")]:
        above = {m for m in reaches(module) if m.startswith(("pgbd_defense.defenses", "pgbd_defense.experiments",
                                                             "pgbd_defense.bench", "pgbd_defense.run",
                                                             "pgbd_defense.pipeline"))}
        assert not above, (module, above)
