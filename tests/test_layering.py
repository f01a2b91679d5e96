"""The library stays a library: ``pdserve/`` imports neither the services, the benchmarks nor the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABOVE = ("services", "bench", "pdserve_cli", "tests")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):  # function-level imports too
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_library_never_imports_the_layers_above_it():
    offenders = {}
    for path in sorted((ROOT / "pdserve").rglob("*.py")):
        if "v1" in path.relative_to(ROOT).parts:
            continue  # generated
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in ABOVE)
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_services_do_not_import_the_cli_or_benchmarks():
    offenders = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in ("bench", "pdserve_cli", "tests"))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}
