"""Job status for polls: the public JSON of a job, served from a per-process cache.

A status poll (``GET /v1/jobs/{id}``) is the most frequent request a client makes, so the
API keeps each polled job's response body, already serialised, in memory:

* a hit costs a dict lookup and a tenancy check (the cached entry names the job's
  client: another client's job is 404, as on a miss) — no thread hop, no query, no ORM
  object, no model validation;
* a miss reads the job's columns through a :class:`~core.db.uow.UnitOfWork` in the thread
  pool and serialises them exactly as FastAPI's ``response_model=JobPublic`` path does
  (:func:`public_body`; a test holds the two byte-for-byte equal); polls that miss together
  (every client of a job right after it changed) share one read;
* entries are dropped when the job changes: on PostgreSQL a trigger (migration
  ``0005_job_status_notify``) notifies channel ``likeness_jobs`` with the job id after every
  UPDATE or DELETE, whoever makes it, and :class:`JobChangeListener` (one per API process)
  removes the entry. So a cached answer is never more than one change behind, and only for
  the moment between a writer's commit and the notification reaching this process. Writes
  made by this process (a cancel) also drop the entry right after their commit
  (:func:`forget`).

The cache serves only while its listener is connected and listening (``live``); while the
connection is down, and on SQLite (embedded mode, no LISTEN/NOTIFY), every poll reads the
database. A read that raced with a change is never stored (:meth:`JobStatusCache.ticket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from sqlalchemy import select

from app.api.schemas import JobPublic
from app.errors import NotFound
from core.config import Settings
from core.db.models import Job
from core.db.uow import UnitOfWork
from core.signing import signed_preview_url, signing_secret

log = logging.getLogger(__name__)

#: the channel and trigger of migration 0005_job_status_notify
CHANNEL = "likeness_jobs"
TRIGGER = "jobs_notify_change"
_PROBE = "probe:"  # payloads the listeners send themselves; job ids are hex
#: the longest wait between reconnect attempts (a database back from an outage is heard within it)
RECONNECT_MAX_S = 5.0

_COLUMNS = [getattr(Job, name) for name in JobPublic.model_fields if name != "previews"] + [Job.client_id]


class Entry(NamedTuple):
    client_id: str
    body: bytes
    expires: float


def public_body(job, previews: list[dict] | None = None) -> bytes:  # noqa: ANN001 - a Job row or alike
    """The response body of ``GET /v1/jobs/{id}``: what ``JSONResponse`` renders for ``response_model=JobPublic``
    (``previews``: the job's signed preview links)."""
    content = JobPublic.model_validate(job).model_dump(mode="json")
    if previews:
        content["previews"] = previews
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


def etag(body: bytes) -> str:
    """A strong ETag of a status body: equal bodies, equal tags (whichever process serves the poll)."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def etag_matches(if_none_match: str, tag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``tag`` (``*``, a list, weak tags compared weakly)."""
    sent = [t.strip() for t in if_none_match.split(",")]
    return "*" in sent or tag in (t.removeprefix("W/") for t in sent)


def read_job(settings: Settings, job_id: str) -> tuple[str, bytes] | None:
    """``(client id, public body)`` of the job, or None when there is no such job (runs in a thread)."""
    with UnitOfWork(settings) as uow:
        row = uow.session.execute(select(*_COLUMNS).where(Job.id == job_id)).one_or_none()
    return None if row is None else (row.client_id, public_body(row, preview_links(settings, row)))


def preview_links(settings: Settings, job) -> list[dict]:  # noqa: ANN001 - a Job row
    """``[{step, url}]`` of the previews a train job has shown so far, each URL signed for the job's owner.
    (A cached body is at most ``JobStatusCache.ttl_s`` old, far less than the URLs' lifetime.)"""
    previews = (job.result or {}).get("previews") or []
    if not previews:
        return []
    secret = signing_secret(settings)
    return [{"step": int(p["step"]), "url": signed_preview_url(secret, job.client_id, job.subject_id, job.id,
                                                               int(p["step"]), settings.signed_url_ttl_s)[0]}
            for p in previews]


class JobStatusCache:
    """Job id -> (client id, serialised public body), trusted only while ``live``.

    ``get`` runs on the event loop without a lock; changes take the lock because a cancel's
    after-commit hook drops entries from a worker thread.
    """

    def __init__(self, max_entries: int = 50_000, ttl_s: float = 30.0):
        self.max_entries = max_entries
        self.ttl_s = ttl_s  # a safety net only: a change drops an entry at once
        self.live = False
        self._entries: dict[str, Entry] = {}
        self._changes = 0  # bumped by every drop: a read that saw an older count is not stored
        self._reads: dict[str, asyncio.Task] = {}  # job id -> the database read in flight (one per job)
        self._lock = threading.Lock()
        _CACHES.add(self)

    def get(self, job_id: str) -> Entry | None:
        entry = self._entries.get(job_id)
        if entry is None or not self.live or entry.expires < time.monotonic():
            return None
        return entry

    def ticket(self) -> int:
        """Take before reading a job; pass to :meth:`put` with what was read."""
        return self._changes

    def put(self, job_id: str, client_id: str, body: bytes, ticket: int) -> None:
        with self._lock:
            if not self.live or ticket != self._changes:  # something changed since the read began
                return
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[job_id] = Entry(client_id, body, time.monotonic() + self.ttl_s)

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._changes += 1
            self._entries.pop(job_id, None)
            self._reads.pop(job_id, None)  # polls from now on wait for a read that starts after the change

    async def load(self, job_id: str, read: Callable[[], Awaitable[tuple[str, bytes] | None]]) -> Entry | None:
        """Read ``job_id`` once however many polls miss at the same time (after a change, every
        client polling the job misses at once); polls arriving meanwhile wait for that read."""
        task = self._reads.get(job_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._read(job_id, read))
            self._reads[job_id] = task
        return await asyncio.shield(task)  # a poll that gives up does not cancel the others' read

    async def _read(self, job_id: str, read: Callable[[], Awaitable[tuple[str, bytes] | None]]) -> Entry | None:
        ticket = self.ticket()
        try:
            found = await read()
        finally:
            with self._lock:
                if self._reads.get(job_id) is asyncio.current_task():
                    del self._reads[job_id]
        if found is None:
            return None
        self.put(job_id, found[0], found[1], ticket)
        return Entry(found[0], found[1], 0.0)

    def set_live(self, live: bool) -> None:
        """Going live or dark forgets everything: changes may have been missed in between."""
        with self._lock:
            self._changes += 1
            self._entries.clear()
            self.live = live

    def __len__(self) -> int:
        return len(self._entries)


_CACHES: weakref.WeakSet[JobStatusCache] = weakref.WeakSet()


def forget(job_id: str) -> None:
    """This process changed ``job_id``: drop it from every status cache here now (after the commit)."""
    for cache in list(_CACHES):
        cache.drop(job_id)


async def status_body(cache: JobStatusCache, settings: Settings, caller_id: str, job_id: str) -> bytes:
    """The public body of ``caller_id``'s job ``job_id``; :class:`NotFound` for a missing or another client's job."""
    entry = cache.get(job_id)
    if entry is None:
        from fastapi.concurrency import run_in_threadpool

        entry = await cache.load(job_id, lambda: run_in_threadpool(read_job, settings, job_id))
    if entry is None or entry.client_id != caller_id:
        raise NotFound("Job not found.", {"job_id": job_id})
    return entry.body


class JobChangeListener:
    """Keeps ``cache`` live while ``LISTEN likeness_jobs`` runs on its own PostgreSQL connection.

    Runs as a task on the API process's event loop (started and stopped by the app's
    lifespan). Every ``check_s`` seconds the listener notifies itself and waits for that
    notification: a connection that died silently, or one behind a transaction pooler
    (PgBouncer) that never delivers notifications, fails the probe. On any failure the cache
    goes dark (every poll reads the database) and the listener reconnects with backoff.
    Without the trigger (a database not migrated to 0003) the cache stays dark.
    """

    def __init__(self, cache: JobStatusCache, database_url: str, check_s: float = 5.0):
        self.cache = cache
        self.dsn = _libpq_dsn(database_url)
        self.check_s = check_s
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.connected = asyncio.Event()  # set while listening (tests wait on it)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="job-change-listener")

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._stopping = True
        # Cancel until it ends: Python 3.11's asyncio.wait_for (psycopg waits with it) can swallow a
        # cancellation that arrives just as what it waits for completes.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        self.cache.set_live(False)

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping:
            try:
                await self._listen()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: serve from the database until reconnected
                log.warning("job status cache off (%s); polls read the database until the listener reconnects", exc)
            finally:
                self.connected.clear()
                self.cache.set_live(False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    async def _listen(self) -> None:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=5, keepalives=1, keepalives_idle=10, keepalives_interval=5,
            keepalives_count=3, tcp_user_timeout=15_000, application_name="likeness-api-status-listener")
        try:
            found = await (await conn.execute("SELECT 1 FROM pg_trigger WHERE tgname = %s", (TRIGGER,))).fetchone()
            if found is None:
                log.warning("jobs table has no %s trigger (migrate to head): job status cache off", TRIGGER)
                await asyncio.sleep(60)
                return
            await conn.execute(f"LISTEN {CHANNEL}")
            # notifications really reach this connection (they do not behind a transaction pooler)
            await self._probe(conn, until_arrival=True)
            self.cache.set_live(True)  # from here on every change reaches us
            self.connected.set()
            while not self._stopping:
                await self._probe(conn)
        finally:
            self.cache.set_live(False)
            await conn.close()

    async def _probe(self, conn, until_arrival: bool = False) -> None:  # noqa: ANN001 - psycopg.AsyncConnection
        """Notify ourselves, then drop cached jobs as their notifications come in for ``check_s``
        (``until_arrival``: only until our own arrives); no probe back means delivery is broken."""
        probe = f"{_PROBE}{uuid.uuid4().hex}"
        async with asyncio.timeout(self.check_s):
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, probe))
        arrived = False
        async with contextlib.aclosing(conn.notifies(timeout=self.check_s)) as notifies:
            async for notify in notifies:
                if notify.payload == probe:
                    arrived = True
                    if until_arrival:
                        break
                elif not notify.payload.startswith(_PROBE):  # other API processes' probes name no job
                    self.cache.drop(notify.payload)
        if not arrived:
            raise ConnectionError("the listener's own probe notification did not arrive")


def _libpq_dsn(database_url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def listener_for(cache: JobStatusCache, settings: Settings) -> JobChangeListener | None:
    """A listener when the database is PostgreSQL; None otherwise (the cache stays dark)."""
    url = settings.resolved_database_url
    return JobChangeListener(cache, url) if url.startswith(("postgresql", "postgres:")) else None
