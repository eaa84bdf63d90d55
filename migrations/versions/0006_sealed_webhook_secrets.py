"""clients: webhook secrets encrypted at rest (core.sealed)

Revision ID: 0006_sealed_webhook_secrets
Revises: 0005_job_status_notify
Create Date: 2026-12-05 05:00:00

Every stored plaintext secret is replaced by its ``enc1:`` form, encrypted under a key derived
from this install's signing secret (``LIKENESS_SECRET_KEY`` or ``<data dir>/secret_key``): run
the migration with the same settings as the service. Downgrading writes the plaintext back.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_sealed_webhook_secrets"
down_revision = "0005_job_status_notify"
branch_labels = None
depends_on = None

clients = sa.table("clients", sa.column("id", sa.String), sa.column("webhook_secret", sa.String))


def _rewrite(change) -> None:  # noqa: ANN001
    bind = op.get_bind()
    rows = bind.execute(sa.select(clients.c.id, clients.c.webhook_secret)
                        .where(clients.c.webhook_secret.is_not(None))).all()
    for client_id, stored in rows:
        new = change(stored)
        if new != stored:
            bind.execute(clients.update().where(clients.c.id == client_id).values(webhook_secret=new))


def upgrade() -> None:
    from core import sealed
    from core.config import get_settings

    settings = get_settings()
    _rewrite(lambda stored: stored if sealed.is_sealed(stored) else sealed.seal(settings, stored))


def downgrade() -> None:
    from core import sealed
    from core.config import get_settings

    settings = get_settings()
    _rewrite(lambda stored: sealed.unseal(settings, stored) if sealed.is_sealed(stored) else stored)
