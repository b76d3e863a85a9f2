"""The package reads in one direction: the code map in qlora_cli/__init__.py is the order of
its modules, no module imports one of a later line, and no import makes a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import qlora_cli

PACKAGE = Path(qlora_cli.__file__).parent


def code_map() -> list[list[str]]:
    """The map's lines as lists of module names (a line's description may sit on the next line)."""
    _, _, table = qlora_cli.__doc__.partition("tests/test_imports.py holds the code to this map):")
    lines = []
    for row in table.strip("\n").splitlines():
        names = row.strip().split("  ")[0]
        if row.startswith("    ") and not row.startswith("     ") and names:
            lines.append([name.strip() for name in names.split(",")])
    return lines


def imported_modules(path: Path) -> set[str]:
    """The package's modules that `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qlora_cli")):
            module = (node.module or "").removeprefix("qlora_cli").lstrip(".")
            found |= {module} if module else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("qlora_cli.") for a in node.names if a.name.startswith("qlora_cli.")}
    return found - {""}


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    return {name: imported_modules(path) & modules.keys() for name, path in modules.items()}


def test_the_code_map_names_every_module_once():
    mapped = [name for line in code_map() for name in line]
    unmapped, gone = sorted(set(import_graph()) - set(mapped)), sorted(set(mapped) - set(import_graph()))
    assert not unmapped, f"add {unmapped} to the code map in qlora_cli/__init__.py, on the line of its stage"
    assert not gone and len(mapped) == len(set(mapped)), f"the code map names {gone or mapped} twice or wrongly"


def test_no_module_imports_a_module_of_a_later_line():
    stage = {name: number for number, line in enumerate(code_map()) for name in line}
    backwards = [f"{module} (line {stage[module] + 1}) imports {imported} (line {stage[imported] + 1})"
                 for module, imports in import_graph().items() for imported in imports
                 if stage[imported] > stage[module]]
    assert not backwards, backwards


def test_no_imports_make_a_cycle():
    graph, cycles = import_graph(), []

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph[module]):
            if imported in path:
                cycles.append(" -> ".join(path[path.index(imported):] + [imported]))
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [module])
    assert not cycles, sorted(set(cycles))


def test_the_import_graph_sees_imports_inside_functions():
    # The check is only as good as the graph: cli imports train inside its command, not at the top.
    assert "train" in import_graph()["cli"]
