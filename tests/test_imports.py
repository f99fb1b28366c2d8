"""The package's modules import each other without a cycle, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vaehelpers"


def imported_modules(path: Path) -> set[str]:
    """The vaehelpers modules that a file imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vaehelpers")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vaehelpers"):
            # `from vaehelpers import viz`: the module viz; `from vaehelpers import AutoencoderKL`: __init__'s name
            submodules = {alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").is_file()}
            if node.module == "vaehelpers" and submodules:
                found |= {f"vaehelpers.{name}" for name in submodules}
            if node.module != "vaehelpers" or len(submodules) < len(node.names):
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {
        ("vaehelpers" if path.stem == "__init__" else f"vaehelpers.{path.stem}"): path for path in PACKAGE.glob("*.py")
    }
    return {name: imported_modules(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[name] = "done"
        return []

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return []


def test_find_cycle_sees_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_vaehelpers_modules():
    graph = import_graph()
    assert "vaehelpers.train" in graph["vaehelpers.launch"]  # the graph is read, not empty
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))
