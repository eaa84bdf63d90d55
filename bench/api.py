"""API benchmark: job-status polls under concurrency, and a 10 x 5 MB photo upload.

    python bench/api.py [--levels 100,500] [--duration 10] [--workers 2]

Starts the real service on 127.0.0.1 (uvicorn with ``--workers`` processes, a fresh
PostgreSQL database ``likeness_bench_<random>``, the local Redis as broker, blobs in a temp
folder), seeds one client, subject and job, then:

* polls ``GET /v1/jobs/{id}`` from N concurrent keep-alive connections for ``--duration``
  seconds per level and reports polls/s, p50/p99 latency and the CPU time per poll of the
  API processes, of the PostgreSQL backends serving the benchmark's database and of the load
  generator, each apart (targets at 100 clients: >= 1,500 polls/s, p99 <= 50 ms, <= 0.4 ms
  API CPU per poll), then 100 clients polling together at ``--paced`` polls/s (1,500: the target
  rate), each poll timed from when it was due, for the latency at that rate rather than at
  saturation;
* uploads 10 photos of ~5 MB (12 MP JPEGs with a phone's EXIF and GPS) in one request and
  reports the server-side time (``Server-Timing`` header; intake is not part of it: it runs
  in the training job) and the server's CPU time per MB (target: <= 1 s).

The load generator is raw asyncio HTTP/1.1 (no client library) so that, on a 2-core
machine, it takes as little CPU from the server as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.app.fixtures import REDIS_URL, create_database, drop_database, pg_url_for  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(db_url: str) -> tuple[str, str, str]:
    """(api key, subject id, job id) in a fresh migrated database."""
    from app.services.clients import create_client
    from core.db.migrate import upgrade_to_head
    from core.db.models import Job, JobKind, JobState, Subject
    from core.db.session import SessionLocal, dispose_engines

    upgrade_to_head(db_url)
    with SessionLocal(db_url) as session, session.begin():
        client, key = create_client(session, "bench", "app")
        subject = Subject(client_id=client.id, name="bench")
        session.add(subject)
        session.flush()
        job = Job(client_id=client.id, subject_id=subject.id, kind=JobKind.TRAIN, state=JobState.RUNNING,
                  stage="training:stage1", progress=42.0, eta_s=300.0, request={"mode": "lora"}, completed_stages=[])
        session.add(job)
        session.flush()
        ids = key, subject.id, job.id
    dispose_engines()
    return ids


def start_server(env: dict[str, str], port: int, workers: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1", "--port",
           str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning", "--loop", "uvloop",
           "--http", "httptools"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def _poller(port: int, request: bytes, stop_at: float, latencies: list[float], errors: list[str],
                  interval: float | None = None) -> None:
    """Poll until ``stop_at``: back to back, or (``interval``) one poll per interval, each timed from
    when it was due, so a slow answer also counts against the polls that had to wait for it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    due = time.perf_counter() + (random.uniform(0, interval) if interval else 0.0)
    try:
        while time.perf_counter() < stop_at:
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                start, due = due, due + interval
            else:
                start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n", 1)[0].decode())
            latencies.append(time.perf_counter() - start)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        errors.append(repr(exc))
    finally:
        writer.close()


def cpu_times(pids: list[int]) -> dict[int, float]:
    """CPU time (user + system) of each of ``pids`` and their children."""
    import psutil

    seen: dict[int, float] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                t = proc.cpu_times()
                seen[proc.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return seen


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`cpu_times` readings (processes that ended are not counted)."""
    return sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in after.items())


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_times(pids).values())


def pg_backends(dbname: str) -> list[int]:
    """The PostgreSQL backends serving the benchmark's database (not the other databases on a shared server)."""
    from tests.app.fixtures import pg_admin_connection

    with pg_admin_connection() as conn:
        return [row[0] for row in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,))]


def _progress_writer(dbname: str, job_id: str, per_s: float, stop: threading.Event) -> None:
    """What a running job's worker does: a progress write every 1/per_s seconds (each drops cached answers)."""
    if per_s <= 0:
        return
    import psycopg

    from tests.app.fixtures import PG_HOST, PG_PORT, _pg_user

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=_pg_user(), dbname=dbname, autocommit=True) as conn:
        progress = 42.0
        while not stop.wait(1.0 / per_s):
            progress = 42.0 if progress >= 99 else progress + 0.01
            conn.execute("UPDATE jobs SET progress = %s, eta_s = %s, updated_at = now() WHERE id = %s",
                         (progress, 300.0 - progress, job_id))


async def poll_level(port: int, path: str, key: str, clients: int, duration: float, server_pid: int,
                     dbname: str, writes_per_s: float = 2.0, rate: float | None = None) -> dict:
    """One level: ``clients`` connections polling back to back, or together at ``rate`` polls/s."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
               "Accept: application/json\r\n\r\n").encode()
    # Warm-up: open connections, fill caches.
    warm: list[float] = []
    await asyncio.gather(*(_poller(port, request, time.perf_counter() + 1.0, warm, [])
                           for _ in range(min(clients, 50))))
    latencies: list[float] = []
    errors: list[str] = []
    backends = pg_backends(dbname)  # backends opened during the run are missed: at most a connect each
    cpu_server0, cpu_pg0, cpu_self0 = cpu_times([server_pid]), cpu_times(backends), time.process_time()
    start = time.perf_counter()
    stop = threading.Event()
    writer = threading.Thread(target=_progress_writer, args=(dbname, path.rsplit("/", 1)[1], writes_per_s, stop))
    writer.start()
    try:
        interval = clients / rate if rate else None
        await asyncio.gather(*(_poller(port, request, start + duration, latencies, errors, interval)
                               for _ in range(clients)))
    finally:
        stop.set()
        writer.join()
    elapsed = time.perf_counter() - start
    cpu_server = cpu_used(cpu_server0, cpu_times([server_pid]))
    cpu_pg = cpu_used(cpu_pg0, cpu_times(backends))
    cpu_self = time.process_time() - cpu_self0
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
    if errors:
        print(f"{clients} clients: {len(errors)} errors, e.g. {sorted(set(errors))[:3]}", file=sys.stderr)
    return {"clients": clients, "paced_rate": rate, "polls": len(latencies), "polls_per_s": len(latencies) / elapsed,
            "p50_ms": q(0.50), "p99_ms": q(0.99), "max_ms": latencies[-1] * 1000, "errors": len(errors),
            # CPU cost per poll: on a shared machine this, not wall time, says what an idle box can do.
            "server_cpu_ms_per_poll": cpu_server / len(latencies) * 1000,
            "postgres_cpu_ms_per_poll": cpu_pg / len(latencies) * 1000,
            "loadgen_cpu_ms_per_poll": cpu_self / len(latencies) * 1000,
            "progress_writes_per_s": writes_per_s, "machine_load": os.getloadavg()[0]}


def phone_exif(seed: int) -> bytes:
    """EXIF as a phone writes it: make, model, time and a GPS position (what the upload must strip)."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "PhoneMaker", "Phone 15", "2026:11:30 10:00:00"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (48.0, 51.0, 24.0 + seed), "E", (2.0, 21.0, 8.0)
    return exif.tobytes()


def photo_5mb(seed: int) -> bytes:
    """A 12 MP phone-sized JPEG of about 5 MB (smooth content plus sensor-like noise)."""
    rng = np.random.default_rng(seed)
    h, w = 3000, 4000
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 60 * np.sin(x / (300 + 40 * c) + seed) * np.cos(y / 400) for c in range(3)], axis=-1)
    noisy = np.clip(base + rng.normal(0, 9, base.shape), 0, 255).astype(np.uint8)
    best = b""
    for quality in (80, 85, 88, 90, 92, 94):
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=quality, exif=phone_exif(seed))
        best = buf.getvalue()
        if len(best) >= 4.8e6:
            break
    return best


def upload_bench(port: int, key: str, subject_id: str, server_pid: int, repeats: int = 3) -> dict:
    photos = [photo_5mb(i) for i in range(10)]
    files = [("files", (f"IMG_{i:04d}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
    server_s, wall_s, cpu_s = [], [], []
    with httpx.Client(timeout=120) as client:
        for _ in range(repeats):
            cpu0 = cpu_seconds([server_pid])
            start = time.perf_counter()
            response = client.post(f"http://127.0.0.1:{port}/v1/subjects/{subject_id}/photos", files=files,
                                   headers={"Authorization": f"Bearer {key}"})
            wall_s.append(time.perf_counter() - start)
            cpu_s.append(cpu_seconds([server_pid]) - cpu0)
            response.raise_for_status()
            assert response.json()["stored"] == 10, response.text
            timing = response.headers["server-timing"]  # app;dur=<ms>
            server_s.append(float(timing.split("dur=")[1]) / 1000)
    megabytes = sum(map(len, photos)) / 1e6
    return {"photos": len(photos), "mb_each": round(statistics.mean(map(len, photos)) / 1e6, 2),
            "server_s_median": statistics.median(server_s), "wall_s_median": statistics.median(wall_s),
            "server_cpu_s_median": statistics.median(cpu_s),
            "server_cpu_ms_per_mb": statistics.median(cpu_s) / megabytes * 1000, "machine_load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="100,500")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-upload", action="store_true")
    parser.add_argument("--paced", type=float, default=1500.0,
                        help="also run 100 clients polling together at this many polls/s (0: skip): latency at "
                             "the target rate rather than at saturation")
    parser.add_argument("--progress-writes", type=float, default=2.0,
                        help="progress writes per second to the polled job during the run (a worker's pace)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "api.json")
    args = parser.parse_args()

    run_id = secrets.token_hex(4)
    dbname = f"likeness_bench_{run_id}"
    db_url = create_database(dbname)
    tmp = Path(tempfile.mkdtemp(prefix="likeness-bench-"))
    env = {**os.environ, "LIKENESS_ENVIRONMENT": "test", "LIKENESS_DATABASE_URL": pg_url_for(dbname),
           "LIKENESS_BROKER_URL": REDIS_URL,
           "LIKENESS_QUEUE_PREFIX": f"bench-{run_id}-", "LIKENESS_DATA_DIR": str(tmp),
           "LIKENESS_STORAGE_DIR": str(tmp / "blobs"), "LIKENESS_SECRET_KEY": secrets.token_hex(16),
           "LIKENESS_DEFAULT_REQUESTS_PER_MINUTE": "none"}  # the load is one client polling as fast as it can
    server = None
    try:
        key, subject_id, job_id = seed(db_url)
        port = free_port()
        server = start_server(env, port, args.workers)
        polls = [asyncio.run(poll_level(port, f"/v1/jobs/{job_id}", key, int(n), args.duration, server.pid, dbname,
                                        args.progress_writes))
                 for n in args.levels.split(",")]
        if args.paced:
            polls.append(asyncio.run(poll_level(port, f"/v1/jobs/{job_id}", key, 100, args.duration, server.pid,
                                                dbname, args.progress_writes, rate=args.paced)))
        upload = None if args.skip_upload else upload_bench(port, key, subject_id, server.pid)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        drop_database(dbname)

    print(f"\nGET /v1/jobs/{{id}}  ({args.workers} uvicorn workers, {os.cpu_count()} CPUs, "
          f"{args.duration:.0f} s per level, {args.progress_writes:g} progress writes/s to the job)")
    print(f"{'clients':>11} {'polls':>8} {'polls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7} "
          f"{'CPU ms/poll api+pg+gen':>24} {'load':>6}")
    for r in polls:
        cpu = (f"{r['server_cpu_ms_per_poll']:.2f}+{r['postgres_cpu_ms_per_poll']:.2f}"
               f"+{r['loadgen_cpu_ms_per_poll']:.2f}")
        clients = f"{r['clients']}@{r['paced_rate']:.0f}/s" if r["paced_rate"] else str(r["clients"])
        print(f"{clients:>11} {r['polls']:>8} {r['polls_per_s']:>9.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['max_ms']:>8.1f} {r['errors']:>7} {cpu:>24} {r['machine_load']:>6.1f}")
    print("(api = the uvicorn processes; pg = the PostgreSQL backends of the benchmark's database; gen = the load "
          "generator;\n load = 1-min load average during the run; other processes share the CPUs when it exceeds "
          "the core count)")
    if upload:
        print(f"\nUpload {upload['photos']} x {upload['mb_each']} MB (phone EXIF with GPS) in one request: "
              f"server {upload['server_s_median']:.2f} s, wall {upload['wall_s_median']:.2f} s, "
              f"server CPU {upload['server_cpu_s_median']:.2f} s = {upload['server_cpu_ms_per_mb']:.1f} ms per MB "
              f"(median of 3; intake excluded; load {upload['machine_load']:.1f})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"polls": polls, "upload": upload}, indent=2))


if __name__ == "__main__":
    main()
