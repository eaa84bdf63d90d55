"""Deleting a subject or a client (over HTTP, embedded mode) leaves nothing of it behind: not the worker's
local copy of its adapter, not its rows' text in the SQLite file or its write-ahead log."""

from __future__ import annotations

import secrets

import pytest
from fastapi.testclient import TestClient

from tests.worker.conftest import settings_with


@pytest.fixture
def embedded_api(sqlite_db, queue):
    """The API on the embedded (SQLite) database, with an admin key; yields (http client, admin headers)."""
    from app.main import create_app
    from app.services.clients import create_client
    from core.config import get_settings
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        _, admin_key = create_client(session, "admin", "admin")
    with TestClient(create_app(get_settings()), raise_server_exceptions=False) as http:
        yield http, {"Authorization": f"Bearer {admin_key}"}


def _trained_subject(http, headers, name: str) -> tuple[str, str]:  # noqa: ANN001
    """A subject named ``name`` with an adapter; returns (subject id, adapter id)."""
    from core.db.models import Adapter
    from core.storage import adapter_prefix
    from tests.app.fixtures import session_scope

    subject_id = http.post("/v1/subjects", json={"name": name}, headers=headers).json()["id"]
    with session_scope() as session:
        adapter = Adapter(subject_id=subject_id, version=1, mode="lora", blob_prefix=adapter_prefix(subject_id, 1),
                          manifest={"instance_token": "<subj>"})
        session.add(adapter)
        session.flush()
        return subject_id, adapter.id


def _local_copy(adapter_id: str):  # noqa: ANN202
    """What a generation job leaves on its worker's disk (the service edge downloads it there)."""
    from worker.adapter_cache import local_adapter_path

    folder = local_adapter_path(settings_with(), adapter_id)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"weights of a person")
    return folder


def _database_bytes(sqlite_url: str) -> bytes:
    from pathlib import Path

    path = Path(sqlite_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def test_deleting_a_subject_removes_the_workers_copy_and_its_text_from_the_database_files(embedded_api, sqlite_db):
    from worker.recovery import sweep

    http, headers = embedded_api
    marker = f"Zelda-{secrets.token_hex(6)}"
    deleted, deleted_adapter = _trained_subject(http, headers, marker)
    _, kept_adapter = _trained_subject(http, headers, "kept")
    deleted_copy, kept_copy = _local_copy(deleted_adapter), _local_copy(kept_adapter)
    assert marker.encode() in _database_bytes(sqlite_db)

    assert http.delete(f"/v1/subjects/{deleted}", headers=headers).status_code == 204
    assert marker.encode() not in _database_bytes(sqlite_db)  # secure delete + WAL checkpoint

    report = sweep(settings_with())  # what every worker runs at start and every heartbeat
    assert report.adapter_copies_removed == [deleted_adapter]
    assert not deleted_copy.exists() and kept_copy.exists()


def test_deleting_a_client_removes_its_subjects_from_the_database_files_and_the_workers(embedded_api, sqlite_db):
    from worker.recovery import sweep

    http, headers = embedded_api
    created = http.post("/v1/admin/clients", json={"name": "tenant"}, headers=headers).json()
    tenant = {"Authorization": f"Bearer {created['api_key']}"}
    marker = f"Yusuf-{secrets.token_hex(6)}"
    _, adapter_id = _trained_subject(http, tenant, marker)
    copy = _local_copy(adapter_id)
    assert marker.encode() in _database_bytes(sqlite_db)

    assert http.delete(f"/v1/admin/clients/{created['client']['id']}", headers=headers).status_code == 204
    assert marker.encode() not in _database_bytes(sqlite_db)
    sweep(settings_with())
    assert not copy.exists()
