"""The rooms stay apart and the code stays lint-clean: CI runs both checks through this file.

* ``lint-imports`` enforces the contracts in ``pyproject.toml`` (``app`` never imports ``worker`` or an
  ML framework, ``pipelines`` imports no web/database/queue code, the job contract and the client stay small,
  no import cycle between modules or packages, function-local imports included);
* ``ruff check .`` with the project's rules.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = _run(str(BIN / "lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout)
    assert kept and int(kept.group(1)) >= 8, result.stdout


def test_app_has_no_import_of_worker_even_inside_functions():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in (ROOT / "app").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*(from|import)\s+worker\b", line)
    ]
    assert offenders == []


def test_ruff_finds_nothing():
    result = _run(sys.executable, "-m", "ruff", "check", ".", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr
