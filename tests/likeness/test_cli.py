"""The command line: one-line errors, model checks, client keys."""

from __future__ import annotations

import os
import stat
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




def test_the_data_folder_and_the_embedded_database_are_private(tmp_path):
    """Folder 700, database 600 (its -wal and -shm follow): other users of the machine read nothing."""
    data = tmp_path / "data"
    env = clean_environ(LIKENESS_DATA_DIR=str(data))
    result = subprocess.run([sys.executable, "-m", "likeness", "migrate"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "likeness", "create-client", "app-1"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [p for p in data.iterdir() if p.name.startswith("likeness.sqlite3")]
    assert any(p.name == "likeness.sqlite3" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_an_existing_data_folder_is_made_private(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    env = clean_environ(LIKENESS_DATA_DIR=str(data))
    result = subprocess.run([sys.executable, "-m", "likeness", "migrate"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "likeness.sqlite3").stat().st_mode) == 0o600
