"""``likeness worker --gpus``: one worker process per device, each seeing only its own GPU (stand-in device
lists on CPU: CUDA_VISIBLE_DEVICES is what a child's torch would see)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.integration.conftest import REDIS_URL, clean_environ


def test_gpu_lists_all_or_explicit_each_device_once(monkeypatch):
    from likeness_cli.gpus import GpuSpecError, parse_gpus, visible_gpus

    assert parse_gpus("all", lambda: ["0", "1", "3"]) == ["0", "1", "3"]
    assert parse_gpus(" 2, 0 ", lambda: []) == ["2", "0"]
    with pytest.raises(GpuSpecError, match="more than once"):
        parse_gpus("0,1,0")
    with pytest.raises(GpuSpecError, match="no GPU is visible"):
        parse_gpus("all", lambda: [])
    with pytest.raises(GpuSpecError, match="device ids"):
        parse_gpus(",")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # a container given two of the host's GPUs
    assert visible_gpus() == ["4", "5"]


def test_each_child_sees_only_its_device():
    from likeness_cli.gpus import per_gpu_children

    children = per_gpu_children(["0", "3"], lambda d: ["worker", f"--name=gpu{d}"], {"PATH": "/bin"})
    assert [(c.device, c.command, c.env) for c in children] == [
        ("0", ["worker", "--name=gpu0"], {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}),
        ("3", ["worker", "--name=gpu3"], {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3"}),
    ]


STAND_IN = """
import os, signal, sys, time
out = sys.argv[1]
open(out, "w").write(os.environ["CUDA_VISIBLE_DEVICES"])
signal.signal(signal.SIGTERM, lambda *a: (open(out, "a").write(" handed back"), sys.exit(0)))
if sys.argv[2] == "crash":
    time.sleep(0.5)
    sys.exit(3)
time.sleep(60)
"""


def _stand_in(tmp_path, device: str, behaviour: str = "wait"):
    from likeness_cli.gpus import Child

    return Child(device, [sys.executable, "-c", STAND_IN, str(tmp_path / f"gpu{device}"), behaviour],
                 {**os.environ, "CUDA_VISIBLE_DEVICES": device})


def _when_started(tmp_path, devices, then) -> threading.Thread:  # noqa: ANN001
    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all((tmp_path / f"gpu{d}").exists() for d in devices):
            time.sleep(0.05)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigterm_to_the_parent_reaches_every_child(tmp_path):
    from likeness_cli.gpus import supervise

    _when_started(tmp_path, "01", lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert supervise([_stand_in(tmp_path, "0"), _stand_in(tmp_path, "1")], poll_s=0.05) == 0
    assert (tmp_path / "gpu0").read_text() == "0 handed back"
    assert (tmp_path / "gpu1").read_text() == "1 handed back"


def test_a_child_that_dies_stops_the_others_and_its_code_is_the_exit_code(tmp_path):
    from likeness_cli.gpus import supervise

    assert supervise([_stand_in(tmp_path, "0"), _stand_in(tmp_path, "1", "crash")], poll_s=0.05) == 3
    assert (tmp_path / "gpu0").read_text() == "0 handed back"


def test_cli_refuses_a_bad_gpu_list_in_one_line(tmp_path):
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "likeness", "worker", "--gpus", "0,0"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "more than once" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_likeness_worker_gpus_starts_one_celery_worker_per_device(tmp_path, request):
    """The real command as a multi-GPU host runs it: two Celery workers on the shared Redis broker (a queue prefix
    of their own; CPU device), CUDA_VISIBLE_DEVICES 0 and 1, after `likeness migrate`."""
    import psutil
    import redis

    prefix = f"gpus{uuid.uuid4().hex[:8]}."
    env = clean_environ(LIKENESS_DATA_DIR=str(tmp_path), LIKENESS_DEVICE="cpu", LIKENESS_MODEL_PRESET="tiny",
                        LIKENESS_MODEL_MEMORY_BUDGET="1GB", LIKENESS_BROKER_URL=REDIS_URL,
                        LIKENESS_REDIS_URL=REDIS_URL, LIKENESS_QUEUE_PREFIX=prefix)
    migrated = subprocess.run([sys.executable, "-m", "likeness", "migrate"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    request.addfinalizer(lambda: [redis.Redis.from_url(REDIS_URL).delete(key)
                                  for key in redis.Redis.from_url(REDIS_URL).scan_iter(prefix + "*")])
    parent = subprocess.Popen([sys.executable, "-m", "likeness", "worker", "--gpus", "0,1", "-q", "gpu",
                               "--loglevel", "info"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(parent.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and sum(" ready." in line for line in lines) < 2:
            assert parent.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.5)
        assert sum(" ready." in line for line in lines) == 2, "".join(lines)[-3000:]
        workers = psutil.Process(parent.pid).children()
        assert sorted(w.environ().get("CUDA_VISIBLE_DEVICES") for w in workers) == ["0", "1"]
        assert len({" ".join(w.cmdline()) for w in workers}) == 2  # distinct node names
    finally:
        parent.send_signal(signal.SIGTERM)
        try:
            code = parent.wait(timeout=120)
        except subprocess.TimeoutExpired:  # show why the workers did not stop, and leave none behind
            processes = [*psutil.Process(parent.pid).children(recursive=True), psutil.Process(parent.pid)]
            alive = [f"{p.pid} {p.status()} {' '.join(p.cmdline())[:120]}" for p in processes]
            for process in processes:
                process.kill()
            (tmp_path / "output.log").write_text("".join(lines))
            shown = "\n".join(alive) + "\n" + "".join(lines)[-6000:]
            raise AssertionError(f"the workers did not stop within 120 s of SIGTERM:\n{shown}") from None
    assert code == 0, "".join(lines)[-3000:]
