"""Prometheus metrics.

* ``likeness_http_request_duration_seconds{method,route,status}``: observed by the API middleware,
  labelled by route *template* (``/v1/jobs/{job_id}``) so ids don't explode cardinality;
* ``likeness_jobs{kind,state}`` and ``likeness_stage_duration_seconds{kind,stage}``: computed from the
  database at scrape time (stage runs of the last 24 hours, as the workers record them in
  ``job_stages`` from the job plan), so every API replica reports the same numbers, whichever
  worker ran the job;
* ``likeness_queue_depth{queue}``: Redis ``LLEN`` of the job queues when the broker is Redis;
* the signals to scale on, per queue, from the database in embedded and distributed mode alike
  (:mod:`app.services.scaling`): ``likeness_queue_waiting_jobs``, ``likeness_queue_oldest_wait_seconds``,
  ``likeness_queue_backlog_seconds`` (waiting work in one worker's seconds, from the measured stage
  durations), ``likeness_queue_workers`` (live) and ``likeness_queue_drain_seconds`` (+Inf: nobody serves it);
* ``likeness_outbox_messages``: task messages waiting for the broker (it was down);
* ``likeness_worker_state{worker,state}`` (1 for the state each live worker process reported in
  the ``workers`` table, 0 for the others) and ``likeness_worker_loaded_model_bytes{worker}``;
* ``likeness_retention_deleted_total{kind}``: what the retention purge deleted (``purge_totals``).

Several API processes on one host (``uvicorn --workers 2``): set ``PROMETHEUS_MULTIPROC_DIR`` to a
directory of that host (empty at start; compose and the Kubernetes manifests do) and every process
writes its request counters there; ``/metrics`` then adds up all of them, whichever process answers
the scrape (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.services.scaling import queue_signals
from core.db.models import Job, JobStage, OutboxMessage, WorkerRecord, utcnow
from core.retention import totals
from likeness.contract.plan import JobKind, JobState, Queue

log = logging.getLogger(__name__)

# prometheus_client reads the variable when it is imported; in multiprocess mode every labelled value is a
# file in this directory, created on the value's first use: the directory must exist by then.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if MULTIPROC_DIR:
    Path(MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

REGISTRY = CollectorRegistry(auto_describe=True)

REQUEST_LATENCY = Histogram("likeness_http_request_duration_seconds", "HTTP request latency by route template.",
                            ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=REGISTRY)

#: Stage durations are reported over this window (bounded work per scrape).
STAGE_WINDOW = timedelta(hours=24)


def _histogram(name: str, doc: str, labels: list[str], samples: dict[tuple[str, ...], list[float]],
               buckets: tuple[float, ...]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for label_values, values in sorted(samples.items()):
        counts = [sum(v <= b for v in values) for b in buckets]
        family.add_metric(list(label_values), [(str(float(b)), c) for b, c in zip(buckets, counts)]
                          + [("+Inf", len(values))], sum(values))
    return family


class JobsCollector(Collector):
    """Jobs by state, stage durations and the outbox, read from the database at scrape time."""

    def __init__(self, session_factory):  # noqa: ANN001
        self.session_factory = session_factory

    def collect(self):  # noqa: ANN201
        by_state = GaugeMetricFamily("likeness_jobs", "Jobs by kind and state.", labels=["kind", "state"])
        outbox = GaugeMetricFamily("likeness_outbox_messages", "Task messages waiting for the broker.")
        stages: dict[tuple[str, ...], list[float]] = {}
        try:
            with self.session_factory() as session:
                counts = {(k.value, s.value): 0 for k in JobKind for s in JobState}
                for kind, state, count in session.execute(
                        select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)):
                    counts[(JobKind(kind).value, JobState(state).value)] = count
                for (kind, state), count in sorted(counts.items()):
                    by_state.add_metric([kind, state], count)
                rows = session.execute(select(JobStage.kind, JobStage.stage, JobStage.seconds).where(
                    JobStage.finished_at >= utcnow() - STAGE_WINDOW, JobStage.seconds.is_not(None)))
                for kind, stage, seconds in rows:
                    stages.setdefault((JobKind(kind).value, stage), []).append(float(seconds))
                outbox.add_metric([], session.scalar(select(func.count()).select_from(OutboxMessage)) or 0)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is briefly away
            log.warning("jobs metrics unavailable", exc_info=True)
            return
        yield by_state
        yield outbox
        yield _histogram("likeness_stage_duration_seconds", "Pipeline stage durations (finished in the last 24 h).",
                         ["kind", "stage"], stages, STAGE_BUCKETS)


WORKER_STATES = ("starting", "loading", "idle", "busy")


class WorkersCollector(Collector):
    """Each worker process's state and loaded-model bytes, from its last registry heartbeat."""

    def __init__(self, session_factory, stale_after_s: float):  # noqa: ANN001
        self.session_factory = session_factory
        self.stale_after = timedelta(seconds=stale_after_s)

    def collect(self):  # noqa: ANN201
        states = GaugeMetricFamily("likeness_worker_state", "Worker process state (1 = current).",
                                   labels=["worker", "state"])
        loaded = GaugeMetricFamily("likeness_worker_loaded_model_bytes", "Bytes of models a worker holds loaded.",
                                   labels=["worker"])
        try:
            with self.session_factory() as session:
                rows = session.scalars(select(WorkerRecord).where(
                    WorkerRecord.heartbeat_at >= utcnow() - self.stale_after, WorkerRecord.state != "stopped")).all()
                for row in rows:
                    for state in WORKER_STATES:
                        states.add_metric([row.name, state], 1.0 if row.state == state else 0.0)
                    loaded.add_metric([row.name], float(sum(int(m.get("bytes") or 0) for m in row.models or [])))
        except Exception:  # noqa: BLE001
            log.warning("worker metrics unavailable", exc_info=True)
            return
        yield states
        yield loaded


class RetentionCollector(Collector):
    """What the retention purge deleted since the install (it runs in a worker: read from ``purge_totals``)."""

    def __init__(self, session_factory):  # noqa: ANN001
        self.session_factory = session_factory

    def collect(self):  # noqa: ANN201
        deleted = CounterMetricFamily("likeness_retention_deleted", "Deleted by the retention purge, by kind.",
                                      labels=["kind"])
        last = GaugeMetricFamily("likeness_retention_last_purge_timestamp_seconds", "When the purge last ran.")
        try:
            with self.session_factory() as session:
                found = totals(session)
        except Exception:  # noqa: BLE001
            log.warning("retention metrics unavailable", exc_info=True)
            return
        for kind in ("photos", "datasets", "templates", "images", "blobs", "orphans", "runs"):
            deleted.add_metric([kind], found.get(kind, (0, None))[0])
        if "runs" in found:
            last.add_metric([], found["runs"][1].timestamp())
            yield last
        yield deleted


class QueueDepthCollector(Collector):
    """``LLEN`` of each job queue on a Redis broker (kombu keeps a queue as one list)."""

    def __init__(self, settings):  # noqa: ANN001
        self.settings = settings
        self._client = None

    def queue_keys(self) -> dict[str, str]:
        s = self.settings
        # kombu's global_keyprefix (set to queue_prefix by worker.celery_app) prefixes every Redis key.
        return {queue.value: f"{s.queue_prefix}{s.queue(queue)}" for queue in Queue}

    def depths(self) -> dict[str, int] | None:
        """Messages waiting in each job queue; None when the broker is not Redis (raises if it is unreachable)."""
        if not self.settings.resolved_broker_url.startswith(("redis://", "rediss://")):
            return None
        import redis

        if self._client is None:
            self._client = redis.Redis.from_url(self.settings.resolved_broker_url, socket_timeout=1,
                                                socket_connect_timeout=1)
        return {name: int(self._client.llen(key)) for name, key in self.queue_keys().items()}

    def collect(self):  # noqa: ANN201
        try:
            depths = self.depths()
        except Exception:  # noqa: BLE001
            log.warning("queue depth unavailable", exc_info=True)
            return
        if depths is None:
            return
        family = GaugeMetricFamily("likeness_queue_depth", "Messages waiting in each job queue.", labels=["queue"])
        for name, depth in depths.items():
            family.add_metric([name], depth)
        yield family


class QueueSignalsCollector(Collector):
    """Per queue: waiting jobs, the oldest one's wait, the backlog and the estimated drain time."""

    def __init__(self, settings, session_factory):  # noqa: ANN001
        self.settings, self.session_factory = settings, session_factory

    def collect(self):  # noqa: ANN201
        try:
            with self.session_factory() as session:
                signals = queue_signals(session, self.settings, utcnow())
        except Exception:  # noqa: BLE001
            log.warning("queue signals unavailable", exc_info=True)
            return
        families = {
            "waiting": GaugeMetricFamily("likeness_queue_waiting_jobs", "Jobs waiting for the queue.",
                                         labels=["queue"]),
            "oldest_wait_s": GaugeMetricFamily("likeness_queue_oldest_wait_seconds",
                                               "How long the oldest waiting job has waited.", labels=["queue"]),
            "backlog_s": GaugeMetricFamily("likeness_queue_backlog_seconds",
                                           "Waiting work in one worker's seconds (measured stage durations).",
                                           labels=["queue"]),
            "workers": GaugeMetricFamily("likeness_queue_workers", "Live worker processes serving the queue.",
                                         labels=["queue"]),
            "drain_s": GaugeMetricFamily("likeness_queue_drain_seconds",
                                         "Estimated time for the live workers to run what waits now.",
                                         labels=["queue"]),
        }
        for signal in signals.values():
            for attribute, family in families.items():
                family.add_metric([signal.queue], float(getattr(signal, attribute)))
        yield from families.values()


def scrape_registry(settings, session_factory) -> CollectorRegistry:  # noqa: ANN001
    """A registry with the DB- and broker-derived collectors (build once per app)."""
    forget_dead_processes()  # once per process start
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(session_factory))
    registry.register(WorkersCollector(session_factory, settings.job_stale_after_s))
    registry.register(RetentionCollector(session_factory))
    registry.register(QueueDepthCollector(settings))
    registry.register(QueueSignalsCollector(settings, session_factory))
    return registry


def process_registry() -> CollectorRegistry:
    """This host's request metrics: every process's, added up, in multiprocess mode; else this process's."""
    if not MULTIPROC_DIR:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=MULTIPROC_DIR)
    return registry


def forget_dead_processes() -> None:
    """Drop the files of processes that are gone (a restarted container reuses the directory), so that their
    counters stop adding to the host's; Prometheus reads the drop as a counter reset."""
    if not MULTIPROC_DIR:
        return
    for path in Path(MULTIPROC_DIR).glob("*_*.db"):
        try:
            pid = int(path.stem.rsplit("_", 1)[1])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            continue


def render(scrape: CollectorRegistry) -> bytes:
    """The exposition text: request latencies plus the DB- and broker-derived metrics."""
    return generate_latest(process_registry()) + generate_latest(scrape)


def _mount_template(scope: dict) -> str | None:
    """A request a mounted app served (the dashboard's static files): the mount's path and ``/{path}``."""
    if "endpoint" not in scope or "app_root_path" not in scope:
        return None
    mount = scope.get("root_path", "")[len(scope["app_root_path"]):]
    return f"{mount}/{{path}}" if mount else None


class RequestMetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware overhead on the status-poll path)."""

    def __init__(self, app):  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send):  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):  # noqa: ANN001
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                # Time spent in the app until the response starts (what the upload benchmark reports).
                elapsed_ms = (time.perf_counter() - start) * 1000
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"server-timing", f"app;dur={elapsed_ms:.1f}".encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or _mount_template(scope) or "unmatched"
            REQUEST_LATENCY.labels(scope["method"], template, str(status["code"])).observe(time.perf_counter() - start)
