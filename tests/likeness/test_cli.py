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


def test_help_shows_flags_without_a_type():
    from typer.testing import CliRunner

    from likeness_cli.main import app

    for command in ([], ["run"], ["serve"], ["migrate"]):
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "--help" in result.output
        assert "<bool>" not in result.output, result.output


def test_counts_are_spelt_in_the_singular_and_the_plural():
    from likeness_cli.main import _count

    assert (_count(1, "image"), _count(0, "image"), _count(4, "image")) == ("1 image", "0 images", "4 images")


def test_jobs_wait_fails_at_once_when_the_api_is_unreachable(tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "likeness", "jobs", "wait", "j1", "--api",
                             f"http://127.0.0.1:{port}", "--key", "lk_x"], capture_output=True, text=True,
                            env=clean_environ(COLUMNS="200"), timeout=120)
    assert time.monotonic() - started < 20  # not the client's minute of waiting out an outage
    assert result.returncode == 1 and "queued" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "running" in lines[0], result.stderr


def test_run_with_missing_weights_fails_before_any_work(tmp_path):
    import time

    photos = tmp_path / "photos"
    photos.mkdir()
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path / "data"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "likeness", "run", str(photos), "--preset", "sd15", "--style",
                             "cinematic", "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert time.monotonic() - started < 30  # no hub retries
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "preset sd15 is missing" in line and "likeness models pull --preset sd15" in line
    assert not (tmp_path / "out").exists()


def test_models_pull_says_the_hub_is_offline_instead_of_retrying_it(tmp_path):
    import time

    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "likeness", "models", "pull", "--preset", "sd15"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert time.monotonic() - started < 30 and result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "HF_HUB_OFFLINE is set" in line and "Traceback" not in result.stderr
