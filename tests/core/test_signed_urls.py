"""Signed download links: a per-install secret, never the public placeholder, and links that reach
only the result image they were made for (tenant and subject bound into the signature)."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pytest
from pydantic import ValidationError

from core.config import DEV_SECRET, Settings
from core.signing import install_secret, secret_path, signed_image_url, signing_secret
from tests.app.helpers import subject_with_photo
from tests.app.test_tenancy_and_deletion import _seed_results


def _photo_key(client, subject_id: str) -> str:  # noqa: ANN001
    from core.db.models import Photo
    from tests.app.fixtures import session_scope

    photo_id = client.get(f"/v1/subjects/{subject_id}/photos").json()["data"][0]["id"]
    with session_scope() as session:
        return session.get(Photo, photo_id).original_key


def test_the_public_default_secret_no_longer_signs_another_tenants_upload(client_a, client_b, http, store):
    """The attack that worked: sign the key of another tenant's original upload with the public default."""
    victim_subject = subject_with_photo(client_b)
    key = _photo_key(client_b, victim_subject)
    assert store.exists(key)
    exp = int(time.time()) + 300
    old_sig = hmac.new(DEV_SECRET.encode(), f"{key}\n{exp}".encode(), hashlib.sha256).hexdigest()
    forged = http.get("/v1/blobs/signed?" + urlencode({"key": key, "exp": exp, "sig": old_sig}))
    assert forged.status_code == 422 and forged.content != store.get(key)

    # The same forgery in today's URL shape, by the attacker for the victim's subject: refused.
    _, image_id = _seed_results(victim_subject, client_b.id, store)
    url, _ = signed_image_url(DEV_SECRET, client_b.id, victim_subject, image_id, "original", 300)
    refused = http.get(url)
    assert refused.status_code == 403 and refused.json()["code"] == "invalid_signature"


@pytest.mark.parametrize("environment", ["development", "production"])
def test_the_public_default_secret_is_refused_outside_tests(environment, tmp_path):
    with pytest.raises(ValidationError, match="public placeholder"):
        Settings(environment=environment, secret_key=DEV_SECRET, data_dir=tmp_path)
    with pytest.raises(ValidationError, match="too short"):
        Settings(environment=environment, secret_key="short", data_dir=tmp_path)
    assert Settings(environment="test", secret_key=DEV_SECRET, data_dir=tmp_path).secret_key == DEV_SECRET


def test_production_needs_an_explicit_secret(tmp_path):
    with pytest.raises(ValidationError, match="must be set in production"):
        Settings(environment="production", secret_key=None, data_dir=tmp_path)


def test_an_install_without_a_configured_secret_generates_one_kept_private(tmp_path):
    settings = Settings(environment="development", secret_key=None, data_dir=tmp_path / "data")
    path = secret_path(settings)
    with ThreadPoolExecutor(8) as pool:  # API workers starting at once agree on one secret
        values = set(pool.map(lambda p: install_secret.__wrapped__(p), [path] * 8))
    assert len(values) == 1
    secret = values.pop()
    assert len(secret) == 64 and secret != DEV_SECRET
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert signing_secret(settings) == secret  # read back on the next start
    other = Settings(environment="development", secret_key=None, data_dir=tmp_path / "other-install")
    assert signing_secret(other) != secret  # per install, never shared
    configured = Settings(environment="development", secret_key="x" * 32, data_dir=tmp_path / "data")
    assert signing_secret(configured) == "x" * 32


def test_a_link_reaches_only_the_result_image_of_its_own_tenant_and_subject(client_a, client_b, http, store,
                                                                              settings):
    secret = signing_secret(settings)
    subject_a = subject_with_photo(client_a)
    subject_b = subject_with_photo(client_b)
    _, image_a = _seed_results(subject_a, client_a.id, store)
    _, image_b = _seed_results(subject_b, client_b.id, store)
    photo_b = client_b.get(f"/v1/subjects/{subject_b}/photos").json()["data"][0]["id"]

    own, _ = signed_image_url(secret, client_a.id, subject_a, image_a, "original", 60)
    assert http.get(own).content == b"\x89PNG original"
    # Even correctly signed, a link naming another tenant's subject or image, or a photo, serves nothing.
    for client_id, subject_id, image_id in ((client_a.id, subject_b, image_b), (client_a.id, subject_a, image_b),
                                            (client_b.id, subject_b, photo_b), (client_b.id, subject_a, image_a)):
        url, _ = signed_image_url(secret, client_id, subject_id, image_id, "original", 60)
        response = http.get(url)
        assert response.status_code == 404 and response.json()["code"] == "blob_not_found", (client_id, image_id)
    # The old shape (a raw blob key: an upload, a crop, an adapter) is not understood at all.
    for key in (_photo_key(client_b, subject_b), f"subjects/{subject_b}/adapters/1/adapter.safetensors"):
        assert http.get("/v1/blobs/signed?" + urlencode({"key": key, "exp": 2**40, "sig": "0" * 64})).status_code == 422


def test_a_revoked_clients_links_stop_working(client_a, admin, http, store):
    subject_id = subject_with_photo(client_a)
    _, image_id = _seed_results(subject_id, client_a.id, store)
    url = client_a.post(f"/v1/images/{image_id}/url", json={"variant": "original"}).json()["url"]
    assert http.get(url).status_code == 200
    assert admin.post(f"/v1/admin/clients/{client_a.id}/revoke").status_code == 200
    assert http.get(url).status_code == 404
