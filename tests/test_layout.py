"""The package's structure: raylin's modules import each other without cycles, counting imports
inside functions too (a cycle hidden in a function is still a cycle in the design) and
``importlib.import_module`` calls that name a module, and so do its packages."""

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


def _imported_by_name(node: ast.AST) -> str | None:
    """The module an ``importlib.import_module("...")`` (or ``import_module("...")``) call names, when
    it names one with a literal string."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    function = node.func
    named = (isinstance(function, ast.Attribute) and function.attr == "import_module"
             and isinstance(function.value, ast.Name) and function.value.id == "importlib")
    named = named or (isinstance(function, ast.Name) and function.id == "import_module")
    argument = node.args[0]
    return argument.value if named and isinstance(argument, ast.Constant) and isinstance(argument.value, str) else None


def import_graph() -> dict[str, set[str]]:
    """raylin module -> the raylin modules it imports, at module top or inside functions, by an
    import statement or by ``importlib.import_module`` with a literal name."""
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
            elif _imported_by_name(node):
                targets = [_imported_by_name(node)]
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


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded into packages: raylin.X for every module under raylin/X/, and each
    top-level module (raylin.config, raylin.pipeline) as a node of its own. The root package
    (raylin/__init__.py: the public re-exports) stays a node too: nothing inside raylin imports
    it, and a module that did would close a cycle through those re-exports."""
    package = lambda module: ".".join(module.split(".")[:2])
    folded: dict[str, set[str]] = {package(name): set() for name in graph}
    for name, targets in graph.items():
        folded[package(name)] |= {package(target) for target in targets} - {package(name)}
    return folded


def test_raylin_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert "raylin.train.loop" in graph["raylin.train.trainer"]  # the graph sees real imports
    assert "raylin.train.align" in graph["raylin.bench.scale"]  # and importlib.import_module("raylin...")
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_raylin_packages_import_each_other_without_cycles():
    """One direction between any two packages (data never imports models if models imports data):
    each package can be read, tested and changed with only what it imports in mind."""
    graph = package_graph(import_graph())
    assert "raylin.pipeline" in graph["raylin.bench"] and "raylin.models" in graph["raylin.data"]  # real edges, folded
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between packages: {' -> '.join(cycle)}"


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
