"""The command line: one-line errors, model checks, client keys."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.integration.conftest import clean_environ


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "likeness", "run", str(tmp_path / "missing"), "--style", "x",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "is not a folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_models_check_reports_missing_weights(tmp_path):
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path), LIKENESS_MODEL_CACHE_DIR=str(tmp_path / "models"),
                        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "likeness", "models", "check", "--preset", "tiny"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "missing" in result.stdout and "models pull --preset tiny" in result.stdout


def test_cli_create_client_prints_a_working_key(sqlite_db):
    from app.services.clients import authenticate
    from tests.app.fixtures import session_scope

    env = clean_environ(LIKENESS_DATA_DIR=os.environ["LIKENESS_DATA_DIR"])  # the sqlite_db database
    result = subprocess.run([sys.executable, "-m", "likeness", "create-client", "bot-1", "--role", "bot"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    with session_scope() as session:
        caller = authenticate(session, key)
    assert caller is not None and caller.role.value == "bot"


