"""Webhook signatures: the one implementation, shared by the API (signing) and clients (verifying).

Header ``X-Likeness-Signature: t=<unix ts>,v1=<hex>`` where ``hex`` is HMAC-SHA256 over
``f"{t}." + body`` with the client's webhook secret. The timestamp is signed, so a captured
request cannot be replayed later: :func:`verify` refuses signatures older than ``tolerance_s``.

Pure standard library: a receiver needs neither the API nor the HTTP client to check a delivery::

    from likeness.webhooks import SIGNATURE_HEADER, verify

    if not verify(request.body, secret, request.headers[SIGNATURE_HEADER]):
        return 400
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["DEFAULT_TOLERANCE_S", "SIGNATURE_HEADER", "sign", "verify"]

SIGNATURE_HEADER = "X-Likeness-Signature"
DEFAULT_TOLERANCE_S = 300


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(body: bytes, secret: str, header: str, *, tolerance_s: int = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made less than ``tolerance_s`` ago."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError, AttributeError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_s:
        return False
    expected = sign(body, secret, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)
