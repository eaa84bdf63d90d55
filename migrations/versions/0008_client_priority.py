"""clients.priority: the fair-share weight of a client on the workers (worker.fair_share)

Revision ID: 0008_client_priority
Revises: 0007_job_template_photo
Create Date: 2026-12-05 05:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_client_priority"
down_revision = "0007_job_template_photo"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("priority", sa.Float(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("priority")
