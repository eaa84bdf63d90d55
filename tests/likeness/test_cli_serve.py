"""``likeness serve`` says it listens only once it does, and says so in one line when it cannot."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.integration.conftest import ROOT, clean_environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path, port: int, **env: str) -> subprocess.Popen:
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path / "data"), LIKENESS_HOST="127.0.0.1", LIKENESS_PORT=str(port),
                        HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", COLUMNS="200", **env)
    return subprocess.Popen([sys.executable, "-m", "likeness", "serve", "--no-worker"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_listening_is_printed_once_the_api_answers(tmp_path):
    port = _free_port()
    proc = _serve(tmp_path, port)
    try:
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "serve ended before it listened:\n" + "".join(seen)
            seen.append(line)
            if "listening on" in line:
                break
        # no retry: at the moment the line is printed the API answers
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5, trust_env=False).status_code == 200
        banner = [line for line in seen if line.startswith("model preset:")]
        assert len(banner) == 1 and "tiny" in banner[0] and "auto" in banner[0], seen  # no real weights here
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)


def test_a_taken_port_is_one_line_and_a_non_zero_exit(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(tmp_path, port)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "listening on" not in out and "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], out


def test_a_preset_without_its_weights_is_refused_before_serving(tmp_path):
    proc = _serve(tmp_path, _free_port(), LIKENESS_MODEL_PRESET="sd15")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "listening on" not in out and "Traceback" not in out
    (line,) = out.strip().splitlines()
    assert "preset sd15 is missing" in line and "likeness models pull --preset sd15" in line
