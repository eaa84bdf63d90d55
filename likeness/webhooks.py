"""Webhook signatures: the one implementation, shared by the API (signing) and clients (verifying).

Every delivery carries two signatures with the client's webhook secret (``whsec_<base64 key>``):

* `Standard Webhooks <https://www.standardwebhooks.com>`_: headers ``webhook-id`` (the delivery id,
  the same on every retry), ``webhook-timestamp`` (unix seconds) and ``webhook-signature:
  v1,<base64>``, the base64 HMAC-SHA256 over ``f"{id}.{timestamp}." + body`` keyed with the
  base64-decoded secret: any Standard Webhooks library (``standardwebhooks``, ``svix``) verifies it.
* the original ``X-Likeness-Signature: t=<unix ts>,v1=<hex>``, hex HMAC-SHA256 over
  ``f"{t}." + body`` keyed with the secret's text; kept while receivers move to the standard one.

Both sign the timestamp, so a captured request cannot be replayed later: :func:`verify` refuses
signatures older than ``tolerance_s``. Pure standard library: a receiver needs neither the API
nor the HTTP client to check a delivery::

    from likeness.webhooks import verify

    if not verify(request.body, secret, request.headers):  # either signature
        return 400
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = ["DEFAULT_TOLERANCE_S", "ID_HEADER", "SIGNATURE_HEADER", "STANDARD_SIGNATURE_HEADER", "TIMESTAMP_HEADER",
           "new_secret", "sign", "sign_standard", "signature_headers", "verify", "verify_standard"]

SIGNATURE_HEADER = "X-Likeness-Signature"
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300


def new_secret() -> str:
    """A new webhook secret in the Standard Webhooks form: ``whsec_`` + base64 of 32 random bytes."""
    import secrets

    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _same(expected: str, given: str) -> bool:
    """Constant-time equality of two texts of any characters (compared as bytes: never a TypeError)."""
    return hmac.compare_digest(expected.encode("utf-8", "replace"), given.encode("utf-8", "replace"))


def _secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret: its base64 payload decoded. Secrets issued before the
    standard signature were URL-safe base64 without padding; they are decoded so, as the sender does."""
    payload = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        return secret.encode()


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``X-Likeness-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def sign_standard(body: bytes, secret: str, message_id: str, timestamp: int) -> str:
    """The Standard Webhooks ``webhook-signature`` value (``v1,<base64>``) of one message."""
    mac = hmac.new(_secret_key(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signature_headers(body: bytes, secret: str, message_id: str, timestamp: int) -> dict[str, str]:
    """Every signature header of a delivery: the Standard Webhooks three and ``X-Likeness-Signature``."""
    return {ID_HEADER: message_id, TIMESTAMP_HEADER: str(timestamp),
            STANDARD_SIGNATURE_HEADER: sign_standard(body, secret, message_id, timestamp),
            SIGNATURE_HEADER: sign(body, secret, timestamp)}


def _fresh(timestamp: int, tolerance_s: int, now: float | None) -> bool:
    return abs((now if now is not None else time.time()) - timestamp) <= tolerance_s


def verify_standard(body: bytes, secret: str, message_id: str, timestamp: str, signature: str, *,
                    tolerance_s: int = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """Whether one of the ``v1,`` signatures in ``signature`` (space-separated) signs this message."""
    try:
        sent_at = int(timestamp)
    except (TypeError, ValueError):
        return False
    if not _fresh(sent_at, tolerance_s, now):
        return False
    expected = sign_standard(body, secret, message_id, sent_at)
    return any(_same(expected, candidate) for candidate in signature.split(" ") if candidate.startswith("v1,"))


def verify(body: bytes, secret: str, header: str | Mapping[str, str], *, tolerance_s: int = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> bool:
    """Whether a delivery is signed with ``secret`` less than ``tolerance_s`` ago.

    ``header``: the request's headers (either signature is accepted: the standard one when present),
    or the ``X-Likeness-Signature`` value alone.
    """
    if isinstance(header, Mapping):
        headers = {str(k).lower(): str(v) for k, v in header.items()}
        if STANDARD_SIGNATURE_HEADER in headers:
            return verify_standard(body, secret, headers.get(ID_HEADER, ""), headers.get(TIMESTAMP_HEADER, ""),
                                   headers[STANDARD_SIGNATURE_HEADER], tolerance_s=tolerance_s, now=now)
        header = headers.get(SIGNATURE_HEADER.lower(), "")
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError, AttributeError):
        return False
    if not _fresh(timestamp, tolerance_s, now):
        return False
    return _same(sign(body, secret, timestamp).split("v1=", 1)[1], given)
