"""Short-lived signed URLs for result images, and the install's signing secret.

``/v1/blobs/signed?client=..&subject=..&image=..&variant=..&exp=..&sig=..`` where ``sig`` =
HMAC-SHA256(secret, "likeness/v2/image\\n{client}\\n{subject}\\n{image}\\n{variant}\\n{exp}").
The URL needs no API key, so it can be handed to a browser or a chat bot; it names one
result image (original or upscaled) of one subject of one client, and the endpoint serves
it only while that image still belongs to that subject and client, and only until ``exp``.
Nothing else (uploads, crops, masks, adapters, exports) can be reached through it.

The secret is ``LIKENESS_SECRET_KEY`` or, when unset, a random value generated once per
install and kept in ``<data_dir>/secret_key`` (mode 600), like the admin key.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

from core.config import Settings
from core.private_files import private_dir

SIGNED_PATH = "/v1/blobs/signed"
SECRET_FILE = "secret_key"
_PURPOSE = "likeness/v2/image"
_PREVIEW_PURPOSE = "likeness/v2/preview"
PREVIEW_PATH = "/v1/previews/signed"

Variant = Literal["original", "upscaled"]


# ---- the secret ------------------------------------------------------------------------------------------

def secret_path(settings: Settings) -> Path:
    """Where the generated per-install secret lives (used when ``LIKENESS_SECRET_KEY`` is unset)."""
    return (settings.data_dir / SECRET_FILE).resolve()


def signing_secret(settings: Settings) -> str:
    """The secret that signs download URLs: the configured one, else the per-install one."""
    return settings.secret_key or install_secret(secret_path(settings))


@functools.lru_cache(maxsize=16)
def install_secret(path: Path) -> str:
    """The secret stored at ``path``, created (random, mode 600) if there is none yet.

    Safe when several processes start at once: the file appears atomically with its content
    (written under a temporary name, then hard-linked), and whoever loses the race reads the
    winner's value.
    """
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # created with mode 600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    value = path.read_text().strip()
    if len(value) < 16:
        raise RuntimeError(f"{path} holds no usable secret; delete it to generate a new one "
                           "(links signed with the old one stop working)")
    return value


# ---- signing -----------------------------------------------------------------------------------------------

def same_text(expected: str, given: str) -> bool:
    """Constant-time equality of two texts, compared as UTF-8 bytes: a non-ASCII character in a cookie,
    header, form field or query is simply unequal (``compare_digest`` on two ``str`` raises on those)."""
    return hmac.compare_digest(expected.encode("utf-8", "replace"), given.encode("utf-8", "replace"))


def _mac(secret: str, client_id: str, subject_id: str, image_id: str, variant: str, expires_at: int) -> str:
    message = "\n".join((_PURPOSE, client_id, subject_id, image_id, variant, str(expires_at)))
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def signed_image_url(secret: str, client_id: str, subject_id: str, image_id: str, variant: Variant, ttl_s: int,
                     now: float | None = None) -> tuple[str, int]:
    """A relative URL serving one result image of ``client_id``'s subject until ``now + ttl_s``."""
    expires_at = int((now if now is not None else time.time()) + ttl_s)
    query = urlencode({"client": client_id, "subject": subject_id, "image": image_id, "variant": variant,
                       "exp": expires_at, "sig": _mac(secret, client_id, subject_id, image_id, variant, expires_at)})
    return f"{SIGNED_PATH}?{query}", expires_at


def check_image_signature(secret: str, client_id: str, subject_id: str, image_id: str, variant: str,
                          expires_at: int, sig: str, now: float | None = None) -> str | None:
    """None when valid, else the error code (``invalid_signature`` or ``url_expired``)."""
    expected = _mac(secret, client_id, subject_id, image_id, variant, expires_at)
    if not same_text(expected, sig):
        return "invalid_signature"
    if expires_at < (now if now is not None else time.time()):
        return "url_expired"
    return None


# ---- training previews -------------------------------------------------------------------------------------

def _preview_mac(secret: str, client_id: str, subject_id: str, job_id: str, step: int, expires_at: int) -> str:
    message = "\n".join((_PREVIEW_PURPOSE, client_id, subject_id, job_id, str(int(step)), str(expires_at)))
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def signed_preview_url(secret: str, client_id: str, subject_id: str, job_id: str, step: int, ttl_s: int,
                       now: float | None = None) -> tuple[str, int]:
    """A relative URL serving one training preview (the snapshot after ``step`` of ``client_id``'s train
    job ``job_id``) until ``now + ttl_s``; signed for that purpose only (never valid as an image URL)."""
    expires_at = int((now if now is not None else time.time()) + ttl_s)
    query = urlencode({"client": client_id, "subject": subject_id, "job": job_id, "step": int(step),
                       "exp": expires_at, "sig": _preview_mac(secret, client_id, subject_id, job_id, step, expires_at)})
    return f"{PREVIEW_PATH}?{query}", expires_at


def check_preview_signature(secret: str, client_id: str, subject_id: str, job_id: str, step: int, expires_at: int,
                            sig: str, now: float | None = None) -> str | None:
    """None when valid, else the error code (``invalid_signature`` or ``url_expired``)."""
    if not same_text(_preview_mac(secret, client_id, subject_id, job_id, step, expires_at), sig):
        return "invalid_signature"
    if expires_at < (now if now is not None else time.time()):
        return "url_expired"
    return None
