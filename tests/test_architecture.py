"""The import rules of docs/architecture.md, read from the source (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> prefixes its modules must never import
FORBIDDEN = {
    "app": ("training",),
    "training/data": ("training.",),  # anything of training/ but training/data itself
    "training/base": ("training.stages", "training.eval", "training.recipes", "training.cli"),
    "training/stages": ("training.eval", "training.recipes", "training.cli"),
    "training/eval": ("training.recipes", "training.cli"),
    "training": ("fastapi", "app.server", "app.engine"),
}
ALLOWED = {"training/data": ("training.data",), "training": ()}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def test_the_reader_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from training.eval import plots\n")
    assert {"os", "training.eval", "training.eval.plots"} <= imported_modules(src)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    bad = [
        f"{f.relative_to(ROOT)} imports {m}"
        for f in files
        for m in sorted(imported_modules(f))
        if m.startswith(FORBIDDEN[package])
        and not m.startswith(ALLOWED.get(package, ()) or "\0")
        # `quaver serve` starts the service: the CLI's one way into app.server
        and not (package == "training" and f.name == "cli.py" and m.startswith("app.server"))
    ]
    assert not bad, bad
