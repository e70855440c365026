"""The engine's form, as rules a change can break: its layers, and modules and functions small
enough to read.

- The layer order is data in ``pyproject.toml`` (``[tool.importlinter]``): ``counts`` is
  surfaces > operate > run > compile > declare > base, ``workers`` has its own order and uses
  only ``counts.api``. import-linter reads function-local imports too; ``bin/test`` runs it,
  and so does :func:`test_the_import_contracts_hold`.
- No module over 400 lines, no function over 60 (migrations are generated, and excluded).
- A function-local import of the project's own code only where Django's app loading needs one,
  each saying so in a comment right above it.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("counts", "workers")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
#: Where a function-local import is the only way: code that runs while Django loads its apps.
LOCAL_IMPORTS_ALLOWED = {
    "counts/__init__.py": "__getattr__",
    "counts/apps.py": "ready",
    "workers/apps.py": "ready",
}


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_there_are_modules_to_check():
    names = {p.relative_to(ROOT).as_posix() for p in _modules()}
    assert {"counts/run/draining.py", "counts/declare/graph.py", "workers/actors.py"} <= names


def test_no_module_is_over_400_lines():
    long = {
        p.relative_to(ROOT).as_posix(): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split by concept): {long}"


def test_no_function_is_over_60_lines():
    long = [
        f"{p.relative_to(ROOT).as_posix()}:{f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for p in _modules()
        for f in _functions(ast.parse(p.read_text()))
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _local_imports(path: Path):
    """``(function, import node)`` for every import of the project's code inside a function."""
    tree = ast.parse(path.read_text())
    for function in _functions(tree):
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.split(".")[0] in PACKAGES for n in names):
                yield function, node


def test_function_local_imports_only_where_app_loading_needs_them():
    found = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        lines = path.read_text().splitlines()
        for function, node in _local_imports(path):
            allowed = LOCAL_IMPORTS_ALLOWED.get(rel) == function.name
            above = lines[function.lineno : node.lineno - 1]
            commented = any("Function-local on purpose" in line for line in above)
            if not (allowed and commented):
                found.append(f"{rel}:{node.lineno} in {function.name}()")
    assert not found, (
        "function-local imports of counts/workers code (import at the top; only app loading"
        f" may need one, with a comment saying so): {found}"
    )


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_the_import_contracts_hold():
    """No import circle, no import from a lower layer to a higher one, workers through the
    public API only: ``lint-imports`` exits 0 and reports every contract kept."""
    done = subprocess.run(
        ["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "layers" not in done.stderr
