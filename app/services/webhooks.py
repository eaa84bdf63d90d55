"""A client's webhook registration and delivery log."""

from __future__ import annotations

import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Client, WebhookDelivery
from app.errors import InvalidRequest
from app.services.clients import Caller, get_client
from app.webhook_targets import DestinationRefused, check_url


def set_webhook(session: Session, caller: Caller, url: str | None, *, allow_private: bool = False) -> Client:
    """Register (or with ``None`` remove) the webhook URL; a new secret each time one is set.

    The destination must be public (:mod:`app.webhook_targets`; checked again at each delivery),
    unless the operator allows private targets.
    """
    if url is not None:
        try:
            check_url(url, allow_private=allow_private)
        except DestinationRefused as exc:
            raise InvalidRequest(str(exc), {"url": url}, code="invalid_webhook_url") from None
    client = get_client(session, caller.id)
    client.webhook_url = url
    client.webhook_secret = ("whsec_" + secrets.token_urlsafe(32)) if url else None
    session.flush()
    return client


def list_deliveries(session: Session, caller: Caller, *, job_id: str | None = None, limit: int = 50,
                    offset: int = 0) -> tuple[list[WebhookDelivery], int]:
    conditions = [WebhookDelivery.client_id == caller.id]
    if job_id is not None:
        conditions.append(WebhookDelivery.job_id == job_id)
    count = session.scalar(select(func.count()).select_from(WebhookDelivery).where(*conditions)) or 0
    rows = session.scalars(select(WebhookDelivery).where(*conditions)
                           .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit).offset(offset))
    return list(rows), count
