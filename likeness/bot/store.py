"""What the bot remembers across restarts: the conversation (aiogram FSM storage), the jobs it is
still watching (to resume their status messages and deliver their results after a restart),
per-user usage for the limits, and when each user last wrote (retention).

Two backends with one interface: Redis (distributed mode; aiogram's ``RedisStorage`` for the
conversation) and a SQLite file (embedded mode; no server needed).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiogram.fsm.storage.base import BaseStorage, StateType, StorageKey

from likeness.bot.config import BotSettings
from likeness.contract.plan import JobKind


@dataclass
class PendingJob:
    """A job the bot started for a user and still has to report on."""

    job_id: str
    kind: JobKind  # train | generate
    user_id: int
    chat_id: int
    message_id: int  # the status message edited in place
    locale: str = "en"
    style: str | None = None
    percent: int = 0  # highest percent shown (never goes down, even across restarts)
    intake_reported: bool = False
    preview_sent: bool = False  # one training preview ("how you look after N steps") per train job
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> PendingJob:
        fields = json.loads(raw)
        return cls(**{**fields, "kind": JobKind(fields["kind"])})


class BotStore(ABC):
    fsm: BaseStorage

    @abstractmethod
    async def save_pending(self, job: PendingJob) -> None: ...

    @abstractmethod
    async def pending(self) -> list[PendingJob]: ...

    @abstractmethod
    async def drop_pending(self, job_id: str) -> None: ...

    async def pending_for(self, user_id: int) -> list[PendingJob]:
        return [p for p in await self.pending() if p.user_id == user_id]

    @abstractmethod
    async def record_use(self, user_id: int, what: JobKind, at: float | None = None) -> None: ...

    @abstractmethod
    async def uses_since(self, user_id: int, what: JobKind, since: float) -> list[float]:
        """Times of the user's ``what`` (``train`` / ``generate``) at or after ``since``, oldest first."""

    @abstractmethod
    async def touch(self, user_id: int, at: float | None = None) -> None:
        """The user wrote to the bot now."""

    @abstractmethod
    async def idle_users(self, before: float) -> list[int]:
        """Users whose last message is older than ``before``."""

    @abstractmethod
    async def forget_user(self, user_id: int) -> None:
        """Drop everything kept about the user except usage times (limits still apply)."""

    async def close(self) -> None:
        await self.fsm.close()


# ---- Redis (distributed mode) -------------------------------------------------------------------------------

class RedisBotStore(BotStore):
    def __init__(self, url: str, prefix: str):
        from aiogram.fsm.storage.base import DefaultKeyBuilder
        from aiogram.fsm.storage.redis import RedisStorage
        from redis.asyncio import Redis

        self.redis = Redis.from_url(url)
        self.prefix = prefix
        self.fsm = RedisStorage(self.redis, key_builder=DefaultKeyBuilder(prefix=prefix + "fsm"))

    def _k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    async def save_pending(self, job: PendingJob) -> None:
        await self.redis.hset(self._k("pending"), job.job_id, job.to_json())

    async def pending(self) -> list[PendingJob]:
        rows = await self.redis.hvals(self._k("pending"))
        return sorted((PendingJob.from_json(r) for r in rows), key=lambda p: p.created_at)

    async def drop_pending(self, job_id: str) -> None:
        await self.redis.hdel(self._k("pending"), job_id)

    async def record_use(self, user_id: int, what: JobKind, at: float | None = None) -> None:
        at = time.time() if at is None else at
        key = self._k("uses", user_id, what)
        await self.redis.zadd(key, {f"{at:.6f}": at})
        await self.redis.zremrangebyscore(key, "-inf", at - 8 * 86400)  # longer than any limit's window
        await self.redis.expire(key, 8 * 86400)

    async def uses_since(self, user_id: int, what: JobKind, since: float) -> list[float]:
        rows = await self.redis.zrangebyscore(self._k("uses", user_id, what), since, "+inf", withscores=True)
        return [score for _, score in rows]

    async def touch(self, user_id: int, at: float | None = None) -> None:
        await self.redis.zadd(self._k("seen"), {str(user_id): time.time() if at is None else at})

    async def idle_users(self, before: float) -> list[int]:
        return [int(u) for u in await self.redis.zrangebyscore(self._k("seen"), "-inf", f"({before}")]

    async def forget_user(self, user_id: int) -> None:
        for job in await self.pending_for(user_id):
            await self.drop_pending(job.job_id)
        await self.redis.zrem(self._k("seen"), str(user_id))
        for pattern in (f"{self.prefix}fsm:*:{user_id}", f"{self.prefix}fsm:*:{user_id}:*"):
            async for key in self.redis.scan_iter(pattern):
                await self.redis.delete(key)

    async def close(self) -> None:
        await self.fsm.close()  # closes the shared connection


# ---- SQLite (embedded mode) ---------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fsm (chat_id INTEGER, user_id INTEGER, bot_id INTEGER, thread TEXT, destiny TEXT,
                                state TEXT, data TEXT NOT NULL DEFAULT '{}',
                                PRIMARY KEY (bot_id, chat_id, user_id, thread, destiny));
CREATE TABLE IF NOT EXISTS pending (job_id TEXT PRIMARY KEY, user_id INTEGER NOT NULL, created_at REAL NOT NULL,
                                    body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uses (user_id INTEGER NOT NULL, what TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS uses_by_user ON uses (user_id, what, at);
CREATE TABLE IF NOT EXISTS seen (user_id INTEGER PRIMARY KEY, at REAL NOT NULL);
"""


class _Sqlite:
    """One connection, one lock: every statement is a few microseconds on a local file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)
        self.lock = threading.Lock()

    def run(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, params).fetchall()


class SqliteStorage(BaseStorage):
    """aiogram FSM storage in a SQLite file (state and data survive a restart)."""

    def __init__(self, db: _Sqlite):
        self.db = db

    @staticmethod
    def _key(key: StorageKey) -> tuple:
        return (key.bot_id, key.chat_id, key.user_id, str(key.thread_id or ""), key.destiny)

    async def set_state(self, key: StorageKey, state: StateType = None) -> None:
        value = getattr(state, "state", state)
        self.db.run("INSERT INTO fsm (bot_id, chat_id, user_id, thread, destiny, state) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO UPDATE SET state = excluded.state", (*self._key(key), value))

    async def get_state(self, key: StorageKey) -> str | None:
        rows = self.db.run("SELECT state FROM fsm WHERE bot_id=? AND chat_id=? AND user_id=? AND thread=? AND "
                           "destiny=?", self._key(key))
        return rows[0][0] if rows else None

    async def set_data(self, key: StorageKey, data: Mapping[str, Any]) -> None:
        self.db.run("INSERT INTO fsm (bot_id, chat_id, user_id, thread, destiny, data) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO UPDATE SET data = excluded.data", (*self._key(key), json.dumps(dict(data))))

    async def get_data(self, key: StorageKey) -> dict[str, Any]:
        rows = self.db.run("SELECT data FROM fsm WHERE bot_id=? AND chat_id=? AND user_id=? AND thread=? AND "
                           "destiny=?", self._key(key))
        return json.loads(rows[0][0]) if rows else {}

    async def close(self) -> None:
        pass


class SqliteBotStore(BotStore):
    def __init__(self, path: Path):
        self.db = _Sqlite(path)
        self.fsm = SqliteStorage(self.db)

    async def save_pending(self, job: PendingJob) -> None:
        self.db.run("INSERT INTO pending (job_id, user_id, created_at, body) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO UPDATE SET body = excluded.body",
                    (job.job_id, job.user_id, job.created_at, job.to_json()))

    async def pending(self) -> list[PendingJob]:
        return [PendingJob.from_json(r[0]) for r in self.db.run("SELECT body FROM pending ORDER BY created_at")]

    async def drop_pending(self, job_id: str) -> None:
        self.db.run("DELETE FROM pending WHERE job_id = ?", (job_id,))

    async def record_use(self, user_id: int, what: JobKind, at: float | None = None) -> None:
        at = time.time() if at is None else at
        self.db.run("INSERT INTO uses (user_id, what, at) VALUES (?, ?, ?)", (user_id, what, at))
        self.db.run("DELETE FROM uses WHERE at < ?", (at - 8 * 86400,))

    async def uses_since(self, user_id: int, what: JobKind, since: float) -> list[float]:
        rows = self.db.run("SELECT at FROM uses WHERE user_id = ? AND what = ? AND at >= ? ORDER BY at",
                           (user_id, what, since))
        return [r[0] for r in rows]

    async def touch(self, user_id: int, at: float | None = None) -> None:
        self.db.run("INSERT INTO seen (user_id, at) VALUES (?, ?) ON CONFLICT DO UPDATE SET at = excluded.at",
                    (user_id, time.time() if at is None else at))

    async def idle_users(self, before: float) -> list[int]:
        return [r[0] for r in self.db.run("SELECT user_id FROM seen WHERE at < ?", (before,))]

    async def forget_user(self, user_id: int) -> None:
        self.db.run("DELETE FROM pending WHERE user_id = ?", (user_id,))
        self.db.run("DELETE FROM seen WHERE user_id = ?", (user_id,))
        self.db.run("DELETE FROM fsm WHERE user_id = ?", (user_id,))

    async def close(self) -> None:
        with self.db.lock:
            self.db.conn.close()


def open_store(settings: BotSettings) -> BotStore:
    """Redis when ``LIKENESS_REDIS_URL`` is set (distributed mode), else ``<data dir>/bot.sqlite3``."""
    if settings.redis_url:
        return RedisBotStore(settings.redis_url, settings.bot_redis_prefix)
    return SqliteBotStore(settings.sqlite_path)
