"""Admin sessions and CSRF tokens for the dashboard.

An operator logs in once with an admin API key; the key itself is never stored, echoed or put
in a URL. The browser gets a signed session cookie (HttpOnly, ``SameSite=Strict``, path
``/admin``, with an expiry) naming the admin client, a fingerprint of its current key hash
and a random session id. Every request re-reads the client through the clients service, so
revoking or rotating that admin's key ends its sessions at once.

CSRF: every form carries ``csrf_token`` (htmx requests send it as ``X-CSRF-Token``), an HMAC
of the session id; the login form, before any session exists, carries one bound to a
short-lived random cookie (double submit, signed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from app.api.deps import UoW, app_settings
from app.services.clients import Caller, get_client
from core.config import Settings
from core.db.models import Client, Role
from core.signing import same_text, signing_secret

SESSION_COOKIE = "likeness_admin"
LOGIN_COOKIE = "likeness_admin_login"
SESSION_TTL_S = 8 * 3600
LOGIN_TTL_S = 3600
COOKIE_PATH = "/admin"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class LoginRequired(Exception):
    """No valid admin session: the dashboard sends the browser to the login page."""


class CsrfRefused(Exception):
    """A state-changing request without the session's CSRF token."""


def _key(settings: Settings, purpose: str) -> bytes:
    secret = signing_secret(settings)  # the configured secret, else this install's own
    return hmac.new(secret.encode(), f"likeness-admin:{purpose}".encode(), hashlib.sha256).digest()


def _mac(settings: Settings, purpose: str, message: str) -> str:
    return hmac.new(_key(settings, purpose), message.encode(), hashlib.sha256).hexdigest()


def key_fingerprint(settings: Settings, api_key_hash: str) -> str:
    """Ties a session to the admin's current key: a rotated key no longer matches."""
    return _mac(settings, "key", api_key_hash)[:24]


# ---- the session cookie ---------------------------------------------------------------------------------


def seal(settings: Settings, payload: dict[str, Any]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")
    return f"{body}.{_mac(settings, 'session', body)}"


def unseal(settings: Settings, value: str | None, now: float | None = None) -> dict[str, Any] | None:
    """The payload of a valid, unexpired cookie value; None for anything else."""
    if not value or "." not in value:
        return None
    body, mac = value.rsplit(".", 1)
    if not same_text(_mac(settings, "session", body), mac):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        return None
    if not isinstance(payload, dict) or float(payload.get("exp", 0)) < (now if now is not None else time.time()):
        return None
    return payload


def new_session_cookie(settings: Settings, client: Client, now: float | None = None) -> str:
    now = now if now is not None else time.time()
    return seal(settings, {"cid": client.id, "kf": key_fingerprint(settings, client.api_key_hash),
                           "sid": secrets.token_urlsafe(18), "exp": int(now + SESSION_TTL_S)})


def cookie_options(request: Request, settings: Settings, max_age: int) -> dict[str, Any]:
    secure = request.url.scheme == "https" or settings.environment == "production"
    return {"max_age": max_age, "path": COOKIE_PATH, "httponly": True, "samesite": "strict", "secure": secure}


@dataclass(frozen=True)
class AdminSession:
    """The operator behind a request: the admin client and this session's CSRF token."""

    caller: Caller
    csrf: str
    expires_at: int


def csrf_token(settings: Settings, session_id: str) -> str:
    return _mac(settings, "csrf", session_id)


def admin_session(request: Request, uow: UoW) -> AdminSession:
    """The request's admin session (else :class:`LoginRequired`): a valid cookie whose client is
    still an admin with the same, unrevoked key."""
    settings = app_settings(request)
    payload = unseal(settings, request.cookies.get(SESSION_COOKIE))
    if payload is None:
        raise LoginRequired
    try:
        client = get_client(uow.session, str(payload["cid"]))
    except Exception:  # noqa: BLE001 - NotFound, or a malformed payload signed by us long ago
        raise LoginRequired from None
    if (client.role != Role.admin or client.revoked_at is not None
            or not same_text(key_fingerprint(settings, client.api_key_hash), str(payload.get("kf")))):
        raise LoginRequired
    request.state.admin_csrf = csrf = csrf_token(settings, str(payload["sid"]))
    request.state.admin_session = session = AdminSession(Caller.of(client), csrf, int(payload["exp"]))
    return session  # on request.state too: an error page shows the navigation bar like any other


AdminSessionDep = Annotated[AdminSession, Depends(admin_session)]


async def checked_form(request: Request, session: AdminSessionDep) -> dict[str, str]:
    """The POSTed form of a request with a valid admin session and its CSRF token (else :class:`CsrfRefused`)."""
    form = await request.form()
    given = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if not isinstance(given, str) or not same_text(session.csrf, given):
        raise CsrfRefused
    return {k: v for k, v in form.items() if isinstance(v, str) and k != CSRF_FIELD}


CheckedForm = Annotated[dict[str, str], Depends(checked_form)]


# ---- the login form's CSRF token (no session yet) -------------------------------------------------------------


def login_nonce(request: Request) -> str:
    """The browser's login nonce (from its cookie), or a new one to set."""
    nonce = request.cookies.get(LOGIN_COOKIE)
    return nonce if nonce and len(nonce) <= 64 else secrets.token_urlsafe(18)


def login_csrf(settings: Settings, nonce: str) -> str:
    return _mac(settings, "login", nonce)


def check_login_csrf(request: Request, settings: Settings, given: object) -> None:
    nonce = request.cookies.get(LOGIN_COOKIE)
    if not nonce or not isinstance(given, str) or not same_text(login_csrf(settings, nonce), given):
        raise CsrfRefused
