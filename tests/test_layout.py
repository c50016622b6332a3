"""The package's structure: raylin's modules import each other without cycles, counting imports
inside functions too (a cycle hidden in a function is still a cycle in the design)."""

from __future__ import annotations

import ast
from pathlib import Path

import raylin

PACKAGE = Path(raylin.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _hint_only_lines(tree: ast.Module) -> set[int]:
    """Lines under ``if TYPE_CHECKING:``: imports for type hints, never run."""
    return {child.lineno for node in ast.walk(tree)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for child in ast.walk(node) if hasattr(child, "lineno")}


def import_graph() -> dict[str, set[str]]:
    """raylin module -> the raylin modules it imports, at module top or inside functions."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        hinted = _hint_only_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in hinted:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raylin"):
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_raylin_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert "raylin.train.loop" in graph["raylin.train.trainer"]  # the graph sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


# Imports inside functions, each for a stated reason; every other import sits at its module's top,
# so the dependency graph is what the module heads say.
LAZY_IMPORTS = {
    "deepspeed": "loaded in training workers only: on the driver it costs seconds and probes accelerators",
    "matplotlib": "plots only: the sweep modules also load in every Tune trial process, which never draws",
    "soundfile": "the speech extra", "soxr": "the speech extra", "jiwer": "the speech extra",
    "rdata": "the assets extra", "gguf": "the assets extra",
}
LAZY_MODULES = {
    "raylin.cli": "each command loads only what it runs: --help answers before torch loads, Ray loads after the config is checked",
}


def test_imports_sit_at_module_top_unless_a_reason_is_stated():
    misplaced = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name in LAZY_MODULES:
            continue
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        guarded = {child.lineno for node in tree.body if isinstance(node, (ast.If, ast.Try))
                   for child in ast.walk(node) if hasattr(child, "lineno")}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top or node.lineno in guarded:
                continue
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if (module or "").split(".")[0] not in LAZY_IMPORTS:
                misplaced.append(f"{name}:{node.lineno} imports {module} inside a function")
    assert not misplaced, "\n".join(misplaced)
