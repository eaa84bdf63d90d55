"""Readiness checks: each dependency is "ok" or "unavailable" (a status word: ``/readyz`` is public, so the
driver's error text, with its host names and ports, goes to the log only); none takes more than a few seconds."""

from __future__ import annotations

import logging

from sqlalchemy import text

from core.config import Settings
from core.db.session import get_engine
from core.storage import get_blob_store

log = logging.getLogger("likeness.api")

TIMEOUT_S = 2.0


def check_database(settings: Settings) -> str:
    with get_engine(settings.resolved_database_url).connect() as conn:
        conn.execute(text("SELECT 1"))
    return "ok"


def check_broker(settings: Settings) -> str:
    from kombu import Connection

    with Connection(settings.resolved_broker_url, connect_timeout=TIMEOUT_S,
                    transport_options={"socket_timeout": TIMEOUT_S}) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=TIMEOUT_S)
    return "ok"


def check_storage(settings: Settings) -> str:
    get_blob_store(settings).ping()
    return "ok"


def check_all(settings: Settings) -> dict[str, str]:
    results: dict[str, str] = {}
    for name, check in (("database", check_database), ("broker", check_broker), ("storage", check_storage)):
        try:
            results[name] = check(settings)
        except Exception as exc:  # noqa: BLE001 - report, don't raise
            log.warning("readiness: %s unavailable: %s: %s", name, type(exc).__name__, str(exc)[:300])
            results[name] = "unavailable"
    return results
