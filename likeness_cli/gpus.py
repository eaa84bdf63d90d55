"""``likeness worker --gpus all | 0,1,...``: one worker process per GPU of a host.

Each child is an ordinary ``likeness worker`` (Celery, concurrency 1) that sees exactly one device
(``CUDA_VISIBLE_DEVICES=<id>``, so inside it the GPU is ``cuda:0``): its own model manager, its own
memory budget (``auto``: 90 % of *that* GPU), its own job at a time. The parent only supervises:
SIGTERM or Ctrl-C reaches every child as SIGTERM (each hands its job back, see
:mod:`worker.preemption`), and when one child dies the others are stopped and the parent exits
with its code, so the pod or systemd unit restarts the whole set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


class GpuSpecError(ValueError):
    """A ``--gpus`` value that names no usable device."""


def visible_gpus() -> list[str]:
    """Device ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def parse_gpus(spec: str, visible: Callable[[], list[str]] = visible_gpus) -> list[str]:
    """``all`` -> every visible device; ``0,1`` -> those (each once, in order). Raises :class:`GpuSpecError`."""
    spec = spec.strip()
    if spec.lower() == "all":
        devices = visible()
        if not devices:
            raise GpuSpecError("--gpus all: no GPU is visible on this host (CUDA_VISIBLE_DEVICES, drivers?)")
        return devices
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise GpuSpecError("--gpus needs 'all' or device ids such as 0,1")
    duplicates = sorted({d for d in devices if devices.count(d) > 1})
    if duplicates:
        raise GpuSpecError(f"--gpus lists device(s) {duplicates} more than once: one worker per device")
    return devices


@dataclass(frozen=True)
class Child:
    """One worker process to start: its device, command and environment."""

    device: str
    command: list[str]
    env: dict[str, str]


def per_gpu_children(devices: Sequence[str], command_for: Callable[[str], list[str]],
                     environ: Mapping[str, str] | None = None) -> list[Child]:
    """One child per device: ``command_for(device)`` with ``CUDA_VISIBLE_DEVICES`` set to that device alone."""
    base = dict(os.environ if environ is None else environ)
    return [Child(device, command_for(device), {**base, "CUDA_VISIBLE_DEVICES": device}) for device in devices]


def supervise(children: Sequence[Child], stop_timeout_s: float = 600.0, poll_s: float = 0.5) -> int:
    """Start ``children``, wait; SIGTERM / SIGINT here -> SIGTERM to each (warm shutdown: their jobs are handed
    back); a child that exits on its own stops the rest. Returns the exit code (0 after a requested stop)."""
    stopping = False

    def request_stop(signum, frame) -> None:  # noqa: ANN001
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs = [subprocess.Popen(child.command, env=child.env) for child in children]
    code = 0
    try:
        while not stopping:
            ended = [p for p in procs if p.poll() is not None]
            if ended:
                code = ended[0].returncode or 1
                break
            time.sleep(poll_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + stop_timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
