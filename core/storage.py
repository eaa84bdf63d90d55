"""Blob storage: one interface, a local-directory backend and an S3-compatible backend.

Keys are built only from ids (see the ``*_key`` helpers), never from user-supplied names,
and everything a subject owns lives under ``subjects/{subject_id}/`` so deleting a
subject is one ``delete_prefix``.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from core.config import Settings, get_settings
from core.private_files import private_dir

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")
CHUNK = 1024 * 1024
TEMP_PREFIX = ".tmp-"  # a local write in progress (or one a killed process left half-written)


class BlobNotFound(KeyError):
    pass


class InvalidKey(ValueError):
    pass


class StorageError(OSError):
    """The store could not take or give a blob (disk full, read-only, permissions, S3 unreachable):
    nothing about the request is wrong, a retry later may succeed (the API answers 503)."""


@contextlib.contextmanager
def _storage_errors(action: str, key: str) -> Iterator[None]:
    """Report the backend's failure as :class:`StorageError` (the key names no file path)."""
    try:
        yield
    except (BlobNotFound, InvalidKey, StorageError):
        raise
    except Exception as exc:
        if not isinstance(exc, OSError) and not _is_boto_error(exc):
            raise
        raise StorageError(f"could not {action} blob {key}: {type(exc).__name__}: {exc}") from exc


def _is_boto_error(exc: Exception) -> bool:
    module = type(exc).__module__
    return module.startswith(("botocore", "boto3"))


def validate_key(key: str) -> str:
    """Reject anything that could escape the store: absolute paths, ``..``, odd characters."""
    if not key or len(key) > 500 or not _KEY_RE.match(key) or key.startswith("/") or "//" in key:
        raise InvalidKey(f"invalid blob key: {key!r}")
    if any(part in ("", ".", "..") for part in key.rstrip("/").split("/")):
        raise InvalidKey(f"invalid blob key: {key!r}")
    return key


# ---- key layout -------------------------------------------------------------------------------------------

def subject_prefix(subject_id: str) -> str:
    return f"subjects/{subject_id}/"


def photo_prefix(subject_id: str, photo_id: str) -> str:
    """Everything of one uploaded photo: the original, its crop and its mask."""
    return f"subjects/{subject_id}/photos/{photo_id}/"


def dataset_prefix(subject_id: str, job_id: str) -> str:
    """The training dataset a train job's intake prepared."""
    return f"subjects/{subject_id}/datasets/{job_id}/"


def checkpoint_prefix(subject_id: str, job_id: str) -> str:
    """A train job's mirrored training checkpoints (``step-XXXXXX/``): any worker resumes from them;
    deleted when the job ends (and with the subject)."""
    return f"subjects/{subject_id}/checkpoints/{job_id}/"


def preview_key(subject_id: str, job_id: str, step: int) -> str:
    """A validation image a train job showed while it ran (the snapshot after ``step``)."""
    return f"subjects/{subject_id}/previews/{job_id}/step-{int(step):06d}.png"


def photo_original_key(subject_id: str, photo_id: str, extension: str = "jpg") -> str:
    """The uploaded file as sent (minus its metadata); ``extension`` names its format."""
    return f"subjects/{subject_id}/photos/{photo_id}/original.{extension}"


def incoming_upload_key(subject_id: str, upload_id: str) -> str:
    """Where a client's direct upload lands before the API checks it (under the subject: deleted with it)."""
    return f"subjects/{subject_id}/incoming/{upload_id}"


def photo_crop_key(subject_id: str, photo_id: str) -> str:
    return f"subjects/{subject_id}/photos/{photo_id}/crop.png"


def photo_mask_key(subject_id: str, photo_id: str) -> str:
    return f"subjects/{subject_id}/photos/{photo_id}/mask.png"


def template_photo_key(subject_id: str, template_photo_id: str, extension: str = "jpg") -> str:
    """A photo uploaded to put the subject into (template mode), stored as sent minus its metadata."""
    return f"subjects/{subject_id}/templates/{template_photo_id}.{extension}"


def adapter_prefix(subject_id: str, version: int) -> str:
    return f"subjects/{subject_id}/adapters/{version}/"


def adapter_export_key(subject_id: str, version: int, fmt: str) -> str:
    """An adapter converted for other tools (``kohya``: a zip of the LoRA, one embedding per token and how to
    prompt with them, for A1111/ComfyUI)."""
    return f"subjects/{subject_id}/exports/adapter-{version}.{fmt}.zip"


def legacy_adapter_export_key(subject_id: str, version: int, fmt: str) -> str:
    """Where adapters trained before the zip export keep theirs: the LoRA file alone."""
    return f"subjects/{subject_id}/exports/adapter-{version}.{fmt}.safetensors"


def image_key(subject_id: str, image_id: str) -> str:
    return f"subjects/{subject_id}/images/{image_id}.png"


def upscaled_image_key(subject_id: str, image_id: str) -> str:
    return f"subjects/{subject_id}/images/{image_id}.upscaled.png"


# ---- interface ---------------------------------------------------------------------------------------------

class BlobStore(abc.ABC):
    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The blob's bytes; raises :class:`BlobNotFound`."""

    @abc.abstractmethod
    def open_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The blob in chunks (for streamed downloads); raises :class:`BlobNotFound` before the first chunk."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one blob; deleting a missing blob is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under ``prefix``; returns how many were deleted."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``, sorted."""

    def presigned_put(self, key: str, content_length: int, expires_s: int) -> str | None:
        """A URL a client can PUT exactly ``content_length`` bytes to, for ``expires_s`` seconds (None: this
        store has no such URLs; the client uploads through the API)."""
        return None

    def size_of(self, key: str) -> int:
        """The blob's size in bytes, without reading it (raises :class:`BlobNotFound`)."""
        return len(self.get(key))

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise if the store is unreachable (readiness probe)."""

    @abc.abstractmethod
    def list_with_times(self, prefix: str = "") -> list[tuple[str, datetime]]:
        """Every blob under ``prefix`` with the time it was last written (UTC), including partial writes
        (local ``.tmp-`` files) that :meth:`list` hides: what the orphan sweep looks at."""

    def size_of_prefix(self, prefix: str) -> int:
        """Bytes stored under ``prefix`` (backends override this with a listing that carries sizes)."""
        return sum(len(self.get(key)) for key in self.list(prefix))


def _validate_prefix(prefix: str) -> str:
    if prefix:
        validate_key(prefix.rstrip("/") or "x")
        if not prefix.endswith("/"):
            raise InvalidKey(f"a prefix must end with '/': {prefix!r}")
    return prefix


class LocalBlobStore(BlobStore):
    """Blobs as files under ``root``; writes are atomic (temp file in the same folder + rename)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        with _storage_errors("create the folder of", "blobs"):
            private_dir(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if self.root not in path.parents:
            raise InvalidKey(f"invalid blob key: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        with _storage_errors("write", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with _storage_errors("read", key):
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                raise BlobNotFound(key) from None

    def open_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            f: BinaryIO = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator
        except (FileNotFoundError, IsADirectoryError):
            raise BlobNotFound(key) from None

        def chunks() -> Iterator[bytes]:
            with f:
                while block := f.read(chunk_size):
                    yield block

        return chunks()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        folder = self.root / _validate_prefix(prefix) if prefix else None
        if folder is not None and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)  # leftover empty folders and stray temp files
        return len(keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*") if p.is_file() and not p.name.startswith(TEMP_PREFIX)
        )

    def list_with_times(self, prefix: str = "") -> list[tuple[str, datetime]]:
        _validate_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        found = []
        for path in base.rglob("*"):
            with contextlib.suppress(FileNotFoundError):  # deleted or renamed while we walked
                if path.is_file():
                    written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                    found.append((path.relative_to(self.root).as_posix(), written))
        return sorted(found)

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise OSError(f"blob folder {self.root} is not writable")

    def size_of_prefix(self, prefix: str) -> int:
        _validate_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return 0
        return sum(p.stat().st_size for p in base.rglob("*") if p.is_file() and not p.name.startswith(TEMP_PREFIX))


class S3BlobStore(BlobStore):
    """S3 or any S3-compatible store (MinIO: set ``endpoint_url``)."""

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, region: str = "us-east-1",
                 access_key_id: str | None = None, secret_access_key: str | None = None, client=None,  # noqa: ANN001
                 public_endpoint_url: str | None = None):
        """``public_endpoint_url``: the address clients reach the store at, for presigned URLs (default:
        ``endpoint_url``; differs when the service reaches MinIO at e.g. ``http://minio:9000``)."""
        import boto3
        from botocore.config import Config

        def make(endpoint: str | None):  # noqa: ANN202
            return boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=access_key_id,
                                aws_secret_access_key=secret_access_key,
                                config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3},
                                              signature_version="s3v4"))

        self.bucket = bucket
        self.client = client or make(endpoint_url)
        self.presign_client = make(public_endpoint_url) if public_endpoint_url else self.client

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        return code in ("NoSuchKey", "404", "NotFound")

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        validate_key(key)
        with _storage_errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        validate_key(key)
        with _storage_errors("read", key):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except self.client.exceptions.ClientError as exc:
                if self._missing(exc):
                    raise BlobNotFound(key) from None
                raise

    def open_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=validate_key(key))["Body"]
        except self.client.exceptions.ClientError as exc:
            if self._missing(exc):
                raise BlobNotFound(key) from None
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return chunks()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=validate_key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=validate_key(key))
            return True
        except self.client.exceptions.ClientError as exc:
            if self._missing(exc):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def list_with_times(self, prefix: str = "") -> list[tuple[str, datetime]]:
        _validate_prefix(prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted((obj["Key"], obj["LastModified"].astimezone(UTC))
                      for page in pages for obj in page.get("Contents", []))

    def size_of_prefix(self, prefix: str) -> int:
        _validate_prefix(prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sum(obj.get("Size", 0) for page in pages for obj in page.get("Contents", []))

    def presigned_put(self, key: str, content_length: int, expires_s: int) -> str | None:
        params = {"Bucket": self.bucket, "Key": validate_key(key), "ContentLength": content_length}
        with _storage_errors("sign", key):
            return self.presign_client.generate_presigned_url("put_object", Params=params, ExpiresIn=expires_s)

    def size_of(self, key: str) -> int:
        with _storage_errors("inspect", key):
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=validate_key(key))["ContentLength"])
            except self.client.exceptions.ClientError as exc:
                if self._missing(exc):
                    raise BlobNotFound(key) from None
                raise

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self.client.exceptions.ClientError:
            self.client.create_bucket(Bucket=self.bucket)


# ---- whole prefixes ----------------------------------------------------------------------------------------

def purge_subject_blobs(store: BlobStore, subject_id: str) -> int:
    """Delete every blob the subject owns (one prefix); returns how many."""
    return store.delete_prefix(subject_prefix(subject_id))


def upload_folder(store: BlobStore, folder: Path, prefix: str) -> list[str]:
    """Mirror ``folder`` to ``prefix``: stale keys from an earlier run are removed first."""
    store.delete_prefix(prefix)
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(folder).as_posix()
        store.put(key, path.read_bytes())
        keys.append(key)
    return keys


def download_folder(store: BlobStore, prefix: str, folder: Path) -> Path:
    """Write every blob under ``prefix`` into ``folder`` (same relative paths); refuses an empty prefix."""
    keys = store.list(prefix)
    if not keys:
        raise FileNotFoundError(f"nothing stored under {prefix}")
    for key in keys:
        target = folder / key.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get(key))
    return folder


_STORES: dict[tuple, BlobStore] = {}


def get_blob_store(settings: Settings | None = None) -> BlobStore:
    """The blob store the settings describe (one instance per configuration per process)."""
    settings = settings or get_settings()
    if settings.storage_backend == "s3":
        cache_key: tuple = ("s3", settings.s3_bucket, settings.s3_endpoint_url, settings.s3_region,
                            settings.s3_access_key_id)
        if cache_key not in _STORES:
            _STORES[cache_key] = S3BlobStore(
                settings.s3_bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                access_key_id=settings.s3_access_key_id, secret_access_key=settings.s3_secret_access_key,
                public_endpoint_url=settings.s3_public_endpoint_url,
            )
        return _STORES[cache_key]
    cache_key = ("local", str(settings.resolved_storage_dir))
    if cache_key not in _STORES:
        _STORES[cache_key] = LocalBlobStore(settings.resolved_storage_dir)
    return _STORES[cache_key]
