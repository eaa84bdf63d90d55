"""Webhooks: signed job events, one delivery row per attempt series.

Each delivery is signed the Standard Webhooks way (``webhook-id`` = the delivery id,
``webhook-timestamp``, ``webhook-signature: v1,<base64>``) and with the original
``X-Likeness-Signature: t=<unix ts>,v1=<hex>``; signing and verifying live in
:mod:`likeness.webhooks` (one implementation, importable without the API). The client's
secret is stored encrypted (:mod:`core.sealed`) and opened only to sign.

Flow: a job changes state -> :func:`notify_job` adds a delivery row and an outbox message
in the same transaction -> after the commit the message reaches the worker's
``likeness.deliver_webhook`` task, which calls :func:`record_and_send` with backoff.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy.orm import Session

from core import sealed
from core.config import get_settings
from core.db.models import Client, Job, WebhookDelivery, utcnow
from core.db.uow import UnitOfWork
from core.webhook_targets import DestinationRefused, pinned_request_args, resolve_checked
from likeness.webhooks import (  # noqa: F401 - re-exported
    DEFAULT_TOLERANCE_S,
    SIGNATURE_HEADER,
    sign,
    signature_headers,
    verify,
)

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
#: What the tenant's delivery log says of a refused destination: never what a name resolved to (that would
#: let a tenant map the internal network); the operator's log has the reason.
DESTINATION_REFUSED = "destination refused: the webhook URL does not lead to an allowed (public) address"


def build_event(job: Job) -> dict[str, Any]:
    state = job.state.value if hasattr(job.state, "value") else job.state
    return {
        "type": f"job.{state}",
        "job_id": job.id,
        "subject_id": job.subject_id,
        "kind": job.kind.value if hasattr(job.kind, "value") else job.kind,
        "state": state,
        "stage": job.stage,
        "progress": job.progress,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "timestamp": int(time.time()),
    }


def queue_job_event(session: Session, job: Job) -> str | None:
    """Add a delivery row for ``job``'s current state if its client has a webhook; returns its id.

    Call in the transaction that changed the job; after commit pass the id to :func:`send_deliveries`.
    """
    client = session.get(Client, job.client_id)
    if client is None or not client.webhook_url:
        return None
    event = build_event(job)
    delivery = WebhookDelivery(client_id=client.id, job_id=job.id, event=event["type"], payload=event,
                               next_attempt_at=utcnow())
    session.add(delivery)
    session.flush()
    return delivery.id


def queue_preview_event(session: Session, job: Job, preview: dict[str, Any]) -> str | None:
    """A ``job.preview`` delivery (a running train job showed a validation image: ``{step, url}``)
    if the job's client has a webhook; returns its id. Same transaction rules as :func:`queue_job_event`."""
    client = session.get(Client, job.client_id)
    if client is None or not client.webhook_url:
        return None
    event = {**build_event(job), "type": "job.preview", "preview": preview}
    delivery = WebhookDelivery(client_id=client.id, job_id=job.id, event=event["type"], payload=event,
                               next_attempt_at=utcnow())
    session.add(delivery)
    session.flush()
    return delivery.id


def notify_job(uow: UnitOfWork, job: Job) -> None:
    """Queue the webhook of ``job``'s current state: a delivery row now, the send after the commit."""
    uow.notify(queue_job_event(uow.session, job))


def backoff_s(attempt: int, first_s: float = 10.0) -> float:
    """Delay before retry ``attempt`` (1-based): ``first_s``, 3x, 9x, ... (10 s, 30 s, 90 s) capped at one hour."""
    return min(3600.0, first_s * 3 ** max(0, attempt - 1))


def record_and_send(delivery_id: str, *, session: Session | None = None) -> bool:
    """POST one delivery, log the attempt on its row; returns True when it should be retried.

    2xx -> delivered; 4xx other than 408/429 -> given up (the receiver refuses it);
    5xx, 408, 429 and network errors -> retry until ``webhook_max_attempts``.
    """
    if session is None:
        with UnitOfWork() as uow:
            return record_and_send(delivery_id, session=uow.session)

    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.delivered_at is not None:
        return False
    client = session.get(Client, delivery.client_id)
    if client is None or not client.webhook_url or not client.webhook_secret:
        delivery.error = "webhook no longer configured"
        delivery.next_attempt_at = None
        return False

    settings = get_settings()
    try:
        secret = sealed.unseal(settings, client.webhook_secret)
    except sealed.SecretUnreadable as exc:
        delivery.error = f"{exc}; set the webhook again to get a new secret"
        delivery.next_attempt_at = None
        log.error("webhook delivery %s: %s", delivery.id, exc)
        return False
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Likeness-Webhooks/1",
        "X-Likeness-Event": delivery.event,
        "X-Likeness-Delivery": delivery.id,
        **signature_headers(body, secret, delivery.id, int(time.time())),
    }
    delivery.attempt += 1
    delivery.status_code = None
    delivery.error = None
    retryable: bool
    try:
        response = _post_to_checked_address(client.webhook_url, body, headers, settings.webhook_allow_private)
        delivery.status_code = response.status_code
        if 200 <= response.status_code < 300:
            delivery.delivered_at = utcnow()
            delivery.next_attempt_at = None
            return False
        if response.is_redirect:
            delivery.error = (f"receiver answered HTTP {response.status_code} (a redirect to "
                              f"{response.headers.get('location', '?')[:300]}); redirects are not followed")
        else:
            delivery.error = f"receiver answered HTTP {response.status_code}"
        retryable = response.status_code >= 500 or response.status_code in (408, 429)
    except DestinationRefused as exc:  # never retried: the address will not become acceptable by waiting
        delivery.error = DESTINATION_REFUSED
        delivery.next_attempt_at = None
        log.warning("webhook delivery %s refused: %s", delivery.id, exc)
        return False
    except (httpx.HTTPError, OSError) as exc:  # network errors, DNS failures
        delivery.error = f"{type(exc).__name__}: {exc}"[:1000]
        retryable = True

    if retryable and delivery.attempt < settings.webhook_max_attempts:
        delay_s = backoff_s(delivery.attempt, settings.webhook_backoff_first_s)
        delivery.next_attempt_at = utcnow() + timedelta(seconds=delay_s)
        return True
    delivery.next_attempt_at = None
    return False


def _post_to_checked_address(url: str, body: bytes, headers: dict[str, str], allow_private: bool) -> httpx.Response:
    """POST over a connection to an address checked by :mod:`core.webhook_targets` (resolved once, here;
    the next address is tried only if connecting to one fails). Redirects are not followed."""
    target = httpx.URL(url)
    addresses = resolve_checked(target, allow_private=allow_private)
    with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as http:
        for i, address in enumerate(addresses):
            pinned = pinned_request_args(target, address)
            try:
                return http.post(pinned["url"], content=body, headers={**headers, **pinned["headers"]},
                                 extensions=pinned["extensions"])
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if i == len(addresses) - 1:
                    raise
    raise AssertionError("unreachable")
