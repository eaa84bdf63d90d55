"""/metrics adds up the request counters of every API process of a host (PROMETHEUS_MULTIPROC_DIR), so a
scrape that lands on either process reports the same totals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthz_count(metrics_text: str) -> int:
    match = re.search(r'likeness_http_request_duration_seconds_count\{[^}]*route="/healthz"[^}]*\} (\S+)',
                      metrics_text)
    return int(float(match.group(1))) if match else 0


@pytest.fixture
def two_api_processes(tmp_path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIKENESS_", "PROMETHEUS"))}
    env.update(LIKENESS_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT),
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))  # created by the app
    subprocess.run([sys.executable, "-m", "likeness_cli", "migrate"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    processes, urls = [], []
    for _ in range(2):
        port = free_port()
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 90
    for url in urls:
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{url} did not start"
            time.sleep(0.3)
    yield urls
    for process in processes:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_both_processes_report_the_requests_both_answered(two_api_processes):
    first, second = two_api_processes
    before = healthz_count(httpx.get(f"{first}/metrics").text)  # the start-up polls above
    for _ in range(5):
        httpx.get(f"{first}/healthz").raise_for_status()
    for _ in range(7):
        httpx.get(f"{second}/healthz").raise_for_status()
    assert healthz_count(httpx.get(f"{first}/metrics").text) == before + 12
    assert healthz_count(httpx.get(f"{second}/metrics").text) == before + 12


def test_a_single_process_without_the_directory_reports_its_own(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIKENESS_", "PROMETHEUS"))}
    code = ("from app import metrics\n"
            "metrics.REQUEST_LATENCY.labels('GET', '/healthz', '200').observe(0.01)\n"
            "print(metrics.MULTIPROC_DIR, metrics.process_registry() is metrics.REGISTRY)")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "True"]


def test_files_of_dead_processes_stop_counting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIKENESS_", "PROMETHEUS"))}
    env.update(PYTHONPATH=str(ROOT), PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    observe = ("from app import metrics\n"
               "metrics.REQUEST_LATENCY.labels('GET', '/healthz', '200').observe(0.01)\n"
               "print(metrics.render(metrics.CollectorRegistry()).decode())")
    first = subprocess.run([sys.executable, "-c", observe], env=env, cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout
    assert healthz_count(first) == 1
    forget = observe.replace("print(", "metrics.forget_dead_processes()\nprint(")
    second = subprocess.run([sys.executable, "-c", forget], env=env, cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    assert healthz_count(second) == 1  # its own request only: the first process is gone
