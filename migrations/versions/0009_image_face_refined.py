"""images.face_refined: whether the face-refinement pass redrew the delivered image's face

Until now it lived only in the job's candidate scores (``jobs.result["candidates"]``). Existing
images get ``false``: they were delivered before the column existed, and a job's candidate list
is the only record of which were refined (older jobs have none).

Revision ID: 0009_image_face_refined
Revises: 0008_client_priority
Create Date: 2026-12-05 05:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_image_face_refined"
down_revision = "0008_client_priority"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("face_refined", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("face_refined")
