"""Secrets kept encrypted at rest (each client's webhook secret): AES-256-GCM under a key derived from
the install's signing secret (:func:`core.signing.signing_secret`), so a copy of the database alone
does not let anyone sign webhooks in a client's name.

Stored form: ``enc1:`` + URL-safe base64 of (12-byte nonce, ciphertext and tag). Changing
``LIKENESS_SECRET_KEY`` (or losing ``<data dir>/secret_key``) makes the stored secrets unreadable:
each client then sets its webhook again to get a new one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.config import Settings
from core.signing import signing_secret

PREFIX = "enc1:"
_PURPOSE = b"likeness/at-rest/webhook-secret/v1"


class SecretUnreadable(Exception):
    """A stored secret that this install's key cannot open (the signing secret changed)."""


def _key(settings: Settings) -> bytes:
    return hmac.new(signing_secret(settings).encode(), _PURPOSE, hashlib.sha256).digest()


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


def seal(settings: Settings, plaintext: str) -> str:
    """The stored form of ``plaintext`` (a new random nonce each time)."""
    nonce = os.urandom(12)
    sealed = AESGCM(_key(settings)).encrypt(nonce, plaintext.encode(), _PURPOSE)
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()


def unseal(settings: Settings, stored: str) -> str:
    """The plaintext of a value made by :func:`seal` (else :class:`SecretUnreadable`)."""
    if not is_sealed(stored):
        raise SecretUnreadable("the stored secret is not encrypted (run `likeness migrate`)")
    try:
        raw = base64.urlsafe_b64decode(stored.removeprefix(PREFIX))
        return AESGCM(_key(settings)).decrypt(raw[:12], raw[12:], _PURPOSE).decode()
    except (InvalidTag, ValueError) as exc:
        raise SecretUnreadable("the stored secret cannot be decrypted with this install's secret key") from exc
