"""Short-lived signed download URLs: ``/v1/blobs/signed?key=..&exp=..&sig=..``.

``sig`` = HMAC-SHA256(secret_key, "{key}\\n{exp}"); the URL needs no API key, so it can
be handed to a browser or a chat bot, and stops working at ``exp``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

SIGNED_PATH = "/v1/blobs/signed"


def _mac(secret: str, key: str, expires_at: int) -> str:
    return hmac.new(secret.encode(), f"{key}\n{expires_at}".encode(), hashlib.sha256).hexdigest()


def signed_url(key: str, secret: str, ttl_s: int, now: float | None = None) -> tuple[str, int]:
    expires_at = int((now if now is not None else time.time()) + ttl_s)
    query = urlencode({"key": key, "exp": expires_at, "sig": _mac(secret, key, expires_at)})
    return f"{SIGNED_PATH}?{query}", expires_at


def check_signature(key: str, expires_at: int, sig: str, secret: str, now: float | None = None) -> str | None:
    """None when valid, else the error code (``invalid_signature`` or ``url_expired``)."""
    if not hmac.compare_digest(_mac(secret, key, expires_at), sig):
        return "invalid_signature"
    if expires_at < (now if now is not None else time.time()):
        return "url_expired"
    return None
