"""A client's webhook registration and delivery log."""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest, NotFound
from app.services.clients import Caller, get_client
from core import sealed
from core.config import Settings
from core.db.models import WebhookDelivery, utcnow
from core.db.uow import UnitOfWork
from core.webhook_targets import DestinationRefused, check_url
from likeness.webhooks import new_secret


class DeliveryStatus(StrEnum):
    """Where a webhook delivery stands, read from its row (``core.webhooks.record_and_send`` writes it)."""

    DELIVERED = "delivered"  # the receiver answered 2xx
    PENDING = "pending"  # a next attempt is planned
    FAILED = "failed"  # given up: out of attempts, refused by the receiver or the address checks

    @classmethod
    def of(cls, delivery: WebhookDelivery) -> DeliveryStatus:
        if delivery.delivered_at is not None:
            return cls.DELIVERED
        return cls.PENDING if delivery.next_attempt_at is not None else cls.FAILED


#: The rows of each status, as SQL: the same rule as :meth:`DeliveryStatus.of`.
_STATUS_CONDITIONS = {
    DeliveryStatus.DELIVERED: (WebhookDelivery.delivered_at.is_not(None),),
    DeliveryStatus.PENDING: (WebhookDelivery.delivered_at.is_(None), WebhookDelivery.next_attempt_at.is_not(None)),
    DeliveryStatus.FAILED: (WebhookDelivery.delivered_at.is_(None), WebhookDelivery.next_attempt_at.is_(None)),
}


def set_webhook(session: Session, caller: Caller, url: str | None, settings: Settings) -> str | None:
    """Register (or with ``None`` remove) the webhook URL; returns the new secret (one each time a URL is
    set; shown once: only its encrypted form is stored, :mod:`core.sealed`).

    The destination must be public (:mod:`core.webhook_targets`; checked again at each delivery),
    unless the operator allows private targets.
    """
    if url is not None:
        try:
            check_url(url, allow_private=settings.webhook_allow_private)
        except DestinationRefused as exc:
            raise InvalidRequest(str(exc), {"url": url}, code="invalid_webhook_url") from None
    client = get_client(session, caller.id)
    secret = new_secret() if url else None
    client.webhook_url = url
    client.webhook_secret = sealed.seal(settings, secret) if secret else None
    session.flush()
    return secret


def list_deliveries(session: Session, caller: Caller | None, *, job_id: str | None = None,
                    client_id: str | None = None, status: DeliveryStatus | None = None, limit: int = 50,
                    offset: int = 0) -> tuple[list[WebhookDelivery], int]:
    """The caller's deliveries, newest first (``caller=None``: every client's, for admins)."""
    conditions = []
    if caller is not None:
        conditions.append(WebhookDelivery.client_id == caller.id)
    if client_id is not None:
        conditions.append(WebhookDelivery.client_id == client_id)
    if job_id is not None:
        conditions.append(WebhookDelivery.job_id == job_id)
    if status is not None:
        conditions.extend(_STATUS_CONDITIONS[DeliveryStatus(status)])
    count = session.scalar(select(func.count()).select_from(WebhookDelivery).where(*conditions)) or 0
    rows = session.scalars(select(WebhookDelivery).where(*conditions)
                           .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit).offset(offset))
    return list(rows), count


def redeliver(uow: UnitOfWork, delivery_id: str) -> WebhookDelivery:
    """Send a delivery again from its first attempt (admins): reset it and queue the send after the commit."""
    delivery = uow.session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None:
        raise NotFound("Webhook delivery not found.", {"delivery_id": delivery_id})
    delivery.attempt = 0
    delivery.status_code = None
    delivery.error = None
    delivery.delivered_at = None
    delivery.next_attempt_at = utcnow()
    uow.session.flush()
    uow.notify(delivery.id)
    return delivery
