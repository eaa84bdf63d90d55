"""This machine's copies of trained adapters (``<data dir>/adapters/<adapter id>``), shared by the jobs of
every worker process here, and their removal once the adapter is deleted.

A deleted subject or client takes its adapter rows and blobs at once (:mod:`app.services.subjects`); a
worker machine cannot be reached from the API, so each one checks its own copies against the database:
a job looks its adapter up before it uses the copy (:meth:`worker.service_edge.ServiceEdge.adapter`), and every
recovery sweep (at worker start, then every ``job_heartbeat_s``) deletes the copies whose adapter row is
gone. A machine whose worker is stopped prunes at its next start.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from sqlalchemy import select

from core.config import Settings
from core.db.models import Adapter
from core.db.uow import UnitOfWork

log = logging.getLogger(__name__)

#: a half-downloaded copy (``.adapter-*``) older than this belongs to a job that died mid-download
STAGING_STALE_S = 3600


def local_adapters_root(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "adapters"


def local_adapter_path(settings: Settings, adapter_id: str) -> Path:
    return local_adapters_root(settings) / adapter_id


def prune_local_adapters(settings: Settings, now: float | None = None) -> list[str]:
    """Delete this machine's copies of adapters that no longer exist; returns their ids."""
    root = local_adapters_root(settings)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    copies = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for staging in root.glob(".adapter-*"):
        if now - staging.stat().st_mtime > STAGING_STALE_S:
            shutil.rmtree(staging, ignore_errors=True)
    if not copies:
        return []
    with UnitOfWork(settings) as uow:
        alive = set(uow.session.scalars(select(Adapter.id).where(Adapter.id.in_(list(copies)))))
    gone = sorted(set(copies) - alive)
    for adapter_id in gone:
        shutil.rmtree(copies[adapter_id], ignore_errors=True)
    if gone:
        log.info("removed local copies of %d deleted adapter(s)", len(gone))
    return gone
