"""The size rules of DESIGN.md, checked: no module of edge/ over 400 lines and
no function over 80 (past that, a module or function holds more than one job)."""

from __future__ import annotations

import ast
from pathlib import Path

EDGE = Path(__file__).resolve().parent.parent / "edge"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def test_no_module_over_400_lines() -> None:
    sizes = {str(p.relative_to(EDGE)): len(p.read_text().splitlines()) for p in EDGE.rglob("*.py")}
    long = {name: n for name, n in sizes.items() if n > MAX_FILE_LINES}
    assert not long, f"split these modules (lines): {long}"


def test_no_function_over_80_lines() -> None:
    long = {}
    for path in EDGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(EDGE)}:{node.lineno} {node.name}"] = length
    assert not long, f"split these functions (lines): {long}"


def test_the_readme_layout_names_every_module() -> None:
    readme = (EDGE.parent / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    missing = sorted(str(p.relative_to(EDGE)) for p in EDGE.rglob("*.py")
                     if p.stem != "__init__" and p.stem not in layout)
    assert not missing, f"README's Layout section does not name: {missing}"
