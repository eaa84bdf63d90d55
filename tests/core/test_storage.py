from __future__ import annotations

import pytest

from core.storage import BlobNotFound, InvalidKey, LocalBlobStore, S3BlobStore, validate_key


@pytest.fixture(params=["local", "s3"])
def blob_store(request, tmp_path):
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    from moto import mock_aws

    with mock_aws():
        store = S3BlobStore("likeness-test", region="us-east-1", access_key_id="x", secret_access_key="y")
        store.ensure_bucket()
        yield store


def test_round_trip_list_and_prefix_delete(blob_store):
    blob_store.ping()
    blob_store.put("subjects/s1/photos/p1/original.jpg", b"one", "image/jpeg")
    blob_store.put("subjects/s1/images/i1.png", b"two" * 100_000, "image/png")
    blob_store.put("subjects/s2/images/i2.png", b"three")
    assert blob_store.get("subjects/s1/photos/p1/original.jpg") == b"one"
    assert b"".join(blob_store.open_stream("subjects/s1/images/i1.png", chunk_size=4096)) == b"two" * 100_000
    assert blob_store.exists("subjects/s2/images/i2.png") and not blob_store.exists("subjects/s2/images/nope.png")
    assert blob_store.list("subjects/s1/") == ["subjects/s1/images/i1.png", "subjects/s1/photos/p1/original.jpg"]

    blob_store.put("subjects/s1/photos/p1/original.jpg", b"overwritten")
    assert blob_store.get("subjects/s1/photos/p1/original.jpg") == b"overwritten"

    assert blob_store.delete_prefix("subjects/s1/") == 2
    assert blob_store.list("subjects/s1/") == []
    assert blob_store.list() == ["subjects/s2/images/i2.png"]
    blob_store.delete("subjects/s2/images/i2.png")
    blob_store.delete("subjects/s2/images/i2.png")  # deleting twice is fine
    with pytest.raises(BlobNotFound):
        blob_store.get("subjects/s2/images/i2.png")
    with pytest.raises(BlobNotFound):
        blob_store.open_stream("subjects/s2/images/i2.png")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/key", "a/../../b", "a//b", "a/./b", "", "a b", "subjects/\x00"])
def test_keys_that_could_escape_are_refused(key, tmp_path):
    with pytest.raises(InvalidKey):
        validate_key(key)
    with pytest.raises(InvalidKey):
        LocalBlobStore(tmp_path).put(key, b"x")
    assert list(tmp_path.parent.glob("passwd")) == []


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    import os

    store = LocalBlobStore(tmp_path)
    store.put("subjects/s/a.bin", b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put("subjects/s/a.bin", b"new")
    assert store.get("subjects/s/a.bin") == b"old"
    assert [p.name for p in (tmp_path / "subjects" / "s").iterdir()] == ["a.bin"]


def test_settings_pick_the_backend(tmp_path):
    from moto import mock_aws

    from core.config import Settings
    from core.storage import get_blob_store

    local = get_blob_store(Settings(storage_dir=tmp_path / "b", database_url="sqlite://"))
    assert isinstance(local, LocalBlobStore) and local.root == (tmp_path / "b").resolve()
    with mock_aws():
        settings = Settings(storage_backend="s3", s3_bucket="likeness-settings-test", s3_access_key_id="x",
                            s3_secret_access_key="y", s3_endpoint_url=None)
        store = get_blob_store(settings)
        assert isinstance(store, S3BlobStore) and store.bucket == "likeness-settings-test"
        store.ensure_bucket()
        store.put("subjects/s/x.bin", b"1")
        assert store.list("subjects/") == ["subjects/s/x.bin"]


def test_the_local_blob_folder_and_its_files_are_private(tmp_path):
    import stat

    store = LocalBlobStore(tmp_path / "blobs")
    store.put("subjects/s1/photos/p1/original.jpg", b"jpeg bytes")
    assert stat.S_IMODE((tmp_path / "blobs").stat().st_mode) == 0o700
    written = tmp_path / "blobs" / "subjects/s1/photos/p1/original.jpg"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
