"""The package's shape: import direction (import-linter contracts in pyproject.toml) and
function length (docs/ARCHITECTURE.md, "Conventions")."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

MAX_FUNCTION_LINES = 80
# A longer function says why in a comment inside it that starts with this.
LONG_MARKER = "# Long on purpose:"


def _long_functions(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1
        body = lines[node.lineno - 1 : node.end_lineno]
        if length > MAX_FUNCTION_LINES and not any(LONG_MARKER in line for line in body):
            found.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_80_lines_without_a_reason() -> None:
    offenders = [f for p in sorted((REPO / "snaplook").glob("*.py")) for f in _long_functions(p)]

    assert offenders == []


def test_long_function_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n", encoding="utf-8")
    (tmp_path / "why.py").write_text(f"def f():\n    {LONG_MARKER} a table\n{body}\n")

    assert _long_functions(tmp_path / "long.py") == ["long.py:1 f (81 lines)"]
    assert _long_functions(tmp_path / "why.py") == []


def test_import_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")

    result = subprocess.run(
        [lint_imports, str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
