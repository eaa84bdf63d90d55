"""A rotated, revoked, re-limited or deleted client takes effect at once in every API process.

Each API process keeps authenticated callers in a short-lived cache (:data:`auth_cache`, filled by
``app.services.clients.authenticate``) so a status poll costs no query. With several processes
(uvicorn ``--workers``, several hosts) a change made through one process must reach the others'
caches before the admin's request returns:

* every API process runs an :class:`AuthSubscriber`: a thread subscribed to a Redis channel; a
  message names a client, the thread drops that client's cache entries and acknowledges
  (``INCR`` of the message's ack key);
* :func:`invalidate_everywhere` (after the change is committed) drops the entries locally,
  publishes, and waits until every subscriber Redis delivered the message to has acknowledged
  (at most ``ACK_TIMEOUT_S``; a process that does not answer in time is logged);
* a process trusts its cache only while it is subscribed: before the first subscription, and
  from a lost connection until it has resubscribed (and emptied its cache), every request is
  checked against the database.

So the per-request cost stays zero (no Redis call on the poll path) and the refusal is
immediate. In embedded mode (no Redis) there is one API process, whose cache is dropped in place.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Protocol

from core.config import Settings

log = logging.getLogger(__name__)

AUTH_CACHE_TTL_S = 30.0
ACK_TIMEOUT_S = 2.0
RECONNECT_S = 1.0


class CachedCaller(Protocol):
    """What the cache needs of an authenticated caller (``app.services.clients.Caller``)."""

    @property
    def id(self) -> str: ...


class AuthCache:
    """Key hash -> caller for a few seconds, so status polls skip the clients query.

    ``generation`` grows with every invalidation: a lookup that started before one must not cache
    what it read (it may predate the change), see :meth:`put`.
    """

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, CachedCaller]] = {}
        self._lock = threading.Lock()
        self.generation = 0

    def get(self, key_hash: str) -> CachedCaller | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key_hash: str, caller: CachedCaller, generation: int | None = None) -> None:
        """Cache ``caller`` unless an invalidation happened since ``generation`` was read."""
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[key_hash] = (time.monotonic() + self.ttl_s, caller)

    def forget_client(self, client_id: str) -> None:
        with self._lock:
            self.generation += 1
            for key_hash in [h for h, (_, c) in self._entries.items() if c.id == client_id]:
                del self._entries[key_hash]

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._entries.clear()


#: This process's cache of authenticated callers.
auth_cache = AuthCache(AUTH_CACHE_TTL_S)


def _channel(settings: Settings) -> str:
    return f"{settings.queue_prefix}likeness:auth-invalidate"


def _ack_key(settings: Settings, message_id: str) -> str:
    return f"{settings.queue_prefix}likeness:auth-ack:{message_id}"


def _redis(url: str, **kwargs):  # noqa: ANN003, ANN202
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=1.0, **kwargs)


_PUBLISHERS: dict[str, object] = {}
_PUBLISHERS_LOCK = threading.Lock()


def _publisher(url: str):  # noqa: ANN202
    with _PUBLISHERS_LOCK:
        if url not in _PUBLISHERS:
            _PUBLISHERS[url] = _redis(url, socket_timeout=2.0)
        return _PUBLISHERS[url]


def invalidate_everywhere(settings: Settings, client_id: str, *, timeout_s: float = ACK_TIMEOUT_S) -> bool:
    """Drop ``client_id``'s cached callers in this process and in every subscribed API process.

    Call after the change is committed. Returns True when every process acknowledged in time
    (always True without Redis: embedded mode has one API process).
    """
    auth_cache.forget_client(client_id)
    url = settings.resolved_redis_url
    if url is None:
        return True
    message_id = uuid.uuid4().hex
    try:
        redis = _publisher(url)
        receivers = int(redis.publish(_channel(settings), json.dumps({"client_id": client_id, "id": message_id})))
        deadline = time.monotonic() + timeout_s
        acked = 0
        while receivers and time.monotonic() < deadline:
            acked = int(redis.get(_ack_key(settings, message_id)) or 0)
            if acked >= receivers:
                return True
            time.sleep(0.002)
        if receivers:
            log.warning("key change of client %s: %d of %d API processes acknowledged in %.1f s; the others "
                        "drop it within the cache TTL", client_id, acked, receivers, timeout_s)
            return False
        return True
    except Exception:  # noqa: BLE001 - the change is committed; subscribers resync after reconnecting
        log.warning("could not broadcast the key change of client %s", client_id, exc_info=True)
        return False


class AuthSubscriber:
    """The thread that keeps this process's auth cache in step with changes made elsewhere."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = settings.resolved_redis_url
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def trusted(self) -> bool:
        """Whether cached callers may be used now (always without Redis; else only while subscribed)."""
        return self.url is None or self._subscribed.is_set()

    def start(self, wait_s: float = 2.0) -> AuthSubscriber:
        if self.url is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="likeness-auth-sync", daemon=True)
            self._thread.start()
            self._subscribed.wait(wait_s)  # usually subscribed before the first request
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)
        self._subscribed.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                redis = _redis(self.url, socket_timeout=5.0, health_check_interval=5)
                pubsub = redis.pubsub()
                pubsub.subscribe(_channel(self.settings))
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        auth_cache.clear()  # whatever was cached while unsubscribed may be stale
                        self._subscribed.set()
                    elif message["type"] == "message":
                        self._handle(redis, message["data"])
            except Exception:  # noqa: BLE001 - Redis away: stop trusting the cache, retry
                if self._subscribed.is_set():
                    log.warning("auth invalidation channel lost; checking every key against the database "
                                "until it is back", exc_info=True)
                self._subscribed.clear()
                auth_cache.clear()
                self._stop.wait(RECONNECT_S)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass

    def _handle(self, redis, data: bytes) -> None:  # noqa: ANN001
        try:
            message = json.loads(data)
            auth_cache.forget_client(str(message["client_id"]))
        except (ValueError, KeyError, TypeError):
            auth_cache.clear()  # unreadable: drop everything rather than keep something stale
            return
        pipe = redis.pipeline(transaction=False)
        key = _ack_key(self.settings, str(message.get("id", "")))
        pipe.incr(key)
        pipe.expire(key, 60)
        pipe.execute()
