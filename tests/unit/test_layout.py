"""The shape of the code: no import cycles, no oversized module, offline tools kept out of the runtime.

Imports are read from the source with :mod:`ast`, so imports inside functions and under
``TYPE_CHECKING`` count too: a cycle hidden in a function is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
PACKAGES = ("node", "pipelines")
#: The longest module a reader should have to hold in mind at once (tests included).
MAX_LINES = 800
#: Offline tools (phantoms, nnU-Net import, validation): the node never runs them while serving.
OFFLINE = "pipelines.offline"
#: The only modules outside the offline package allowed to reach it: command-line entry points whose
#: commands are the offline tools themselves (imported inside the command's function).
OFFLINE_ENTRY_POINTS = frozenset({"pipelines.phantom", "node.cli.models", "node.cli.demo"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its body (resolved to known module names)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # the longest known module that the target names (a name imported from a module is the module)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    graph = {name: imported_modules(name, path, known) for name, path in modules.items()}
    # importing a package runs its __init__ only: edges to a package are edges to its __init__ module,
    # which is already the package's name; nothing more to add.
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of module names (first repeated at the end), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == WHITE:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for start in sorted(graph):
        if colour[start] == WHITE:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_packages_never_import_the_node_from_pipelines() -> None:
    """``pipelines`` turns volumes into DICOM objects and knows nothing of sockets, disks or the node."""
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "node")
                 for name, targets in import_graph().items() if name.split(".")[0] == "pipelines"}
    assert not {k: v for k, v in offenders.items() if v}


def test_runtime_modules_do_not_import_offline_tools() -> None:
    offenders = {name: sorted(t for t in targets if t == OFFLINE or t.startswith(OFFLINE + "."))
                 for name, targets in import_graph().items()
                 if not (name == OFFLINE or name.startswith(OFFLINE + ".")) and name not in OFFLINE_ENTRY_POINTS}
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("folder", [*PACKAGES, "tests", "onnx_models"])
def test_no_module_is_longer_than_the_limit(folder: str) -> None:
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / folder).rglob("*.py"))
            if ".ohif" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_test_file_imports_another() -> None:
    tests = REPO / "tests"
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        if ".ohif" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.split(".")[-1].startswith("test_") or n == "conftest"]
    assert not offenders, offenders
