"""The package reads in one direction: the code map in qlora_cli/__init__.py orders its stages (a
folder, or a module at the package's root), no module imports one of a later stage, and no import
makes a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import qlora_cli

PACKAGE = Path(qlora_cli.__file__).parent


def code_map() -> list[list[str]]:
    """The map's lines as lists of stages: `recipe/` (a folder) or `errors` (a root module)."""
    _, _, table = qlora_cli.__doc__.partition("tests/test_imports.py holds the code to this map):")
    lines = []
    for row in table.strip("\n").splitlines():
        names = row.strip().split("  ")[0]
        if row.startswith("    ") and not row.startswith("     ") and names:
            lines.append([name.strip() for name in names.split(",")])
    return lines


def modules() -> dict[str, Path]:
    """Every module by its dotted name inside the package (`recipe.load`, `errors`), packages' faces aside."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] != "__init__":
            found[".".join(parts)] = path
    return found


def stage_of(module: str) -> str:
    """`recipe.load` -> `recipe/`; `errors` -> `errors`."""
    folder, dot, _ = module.partition(".")
    return f"{folder}/" if dot else module


def imported_modules(path: Path) -> set[str]:
    """The package's modules (dotted) that `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_cli"):
            module = node.module.removeprefix("qlora_cli").lstrip(".")
            found |= {f"{module}.{alias.name}" if module else alias.name for alias in node.names} | {module}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: import qlora_cli's modules by their full name, not relatively")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("qlora_cli.") for a in node.names if a.name.startswith("qlora_cli.")}
    return found - {""}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported_modules(path) & known.keys() for name, path in known.items()}


def test_the_code_map_names_every_stage_once():
    mapped = [name for line in code_map() for name in line]
    stages = {stage_of(module) for module in modules()}
    unmapped, gone = sorted(stages - set(mapped)), sorted(set(mapped) - stages)
    assert not unmapped, f"add {unmapped} to the code map in qlora_cli/__init__.py, on the line of its stage"
    assert not gone and len(mapped) == len(set(mapped)), f"the code map names {gone or mapped} twice or wrongly"


def test_every_stage_folder_says_what_it_takes_and_gives():
    for folder in {stage_of(module) for module in modules()} - set(modules()):
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 20, f"qlora_cli/{folder}__init__.py needs its one-paragraph docstring"


def test_no_module_imports_a_module_of_a_later_stage():
    line = {name: number for number, names in enumerate(code_map()) for name in names}
    backwards = [f"{module} ({stage_of(module)}, line {line[stage_of(module)] + 1}) imports {imported} "
                 f"({stage_of(imported)}, line {line[stage_of(imported)] + 1})"
                 for module, imports in import_graph().items() for imported in imports
                 if line[stage_of(imported)] > line[stage_of(module)]]
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


def test_the_import_graph_sees_imports_inside_functions_and_from_folders():
    # The check is only as good as the graph: cli imports the training run inside its command, and
    # `from qlora_cli.terminal import render` names a module, not a function.
    assert {"training.run", "terminal.render"} <= import_graph()["cli"]
