"""The house: each module owns one concern (none over 500 lines) and imports point one way
(``cli → sweep → trial → flows, data``; ``cli → results``; ``sweep → results``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flowbench"
# what each part of flowbench may import of flowbench's other parts (the package root's small
# modules, errors, atomic writes, spec files, are shared by all)
SHARED = {"flowbench", "errors", "atomic", "specfile", "locks", "numerics", "stopping", "record", "cards"}
MAY_IMPORT = {
    "flows": set(),
    "data": set(),
    "trial": {"flows", "data"},
    "results": {"flows", "data"},
    "sweep": {"trial", "flows", "data", "results"},
    "cli": {"sweep", "trial", "flows", "data", "results"},
}


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "flowbench"]
        for name in names:
            if name.startswith("flowbench."):
                parts.add(name.split(".")[1])
    return parts


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500


def test_the_package_roots_modules_import_only_what_lies_below_everything():
    wrong = {
        path.name: sorted(imported_parts(path) - {"flows", "data"} - SHARED)
        for path in modules()
        if path.parent == PACKAGE
    }
    assert {module: parts for module, parts in wrong.items() if parts} == {}


@pytest.mark.parametrize("part", sorted(MAY_IMPORT))
def test_imports_point_one_way(part):
    wrong = {
        str(path.relative_to(PACKAGE)): sorted(imported_parts(path) - MAY_IMPORT[part] - SHARED - {part})
        for path in modules()
        if part_of(path) == part
    }
    assert {module: parts for module, parts in wrong.items() if parts} == {}


def test_the_checker_sees_an_arrow_back(tmp_path):
    backwards = tmp_path / "layer.py"
    backwards.write_text("from flowbench.sweep.plan import plan_sweep\nimport flowbench.cli\n")
    assert imported_parts(backwards) == {"sweep", "cli"}
