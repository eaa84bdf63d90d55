"""jobs.template_photo_id: the uploaded template photo a template job uses, as a column

Until now only the job's stored request named it (``request["source"]["photo_id"]``) and the
retention purge parsed requests to find the photos still in use. Existing template jobs get
the column filled from their request; a photo deleted meanwhile leaves it NULL (and so does
deleting the photo later: ``ON DELETE SET NULL``).

Revision ID: 0007_job_template_photo
Revises: 0006_sealed_webhook_secrets
Create Date: 2026-12-05 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_job_template_photo"
down_revision = "0006_sealed_webhook_secrets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("template_photo_id", sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_template_photo_id"), ["template_photo_id"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_jobs_template_photo_id_template_photos"), "template_photos",
                                    ["template_photo_id"], ["id"], ondelete="SET NULL")
    _fill_from_requests()


def _fill_from_requests() -> None:
    """``request["source"]["photo_id"]`` of every template job, where that photo still exists."""
    bind = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("kind", sa.String),
                    sa.column("request", sa.JSON), sa.column("template_photo_id", sa.String))
    photos = sa.table("template_photos", sa.column("id", sa.String))
    existing = set(bind.execute(sa.select(photos.c.id)).scalars())
    for job_id, request in bind.execute(sa.select(jobs.c.id, jobs.c.request).where(jobs.c.kind == "template")):
        source = (request or {}).get("source") or {}
        photo_id = source.get("photo_id") if source.get("kind") == "upload" else None
        if photo_id in existing:
            bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(template_photo_id=photo_id))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_jobs_template_photo_id_template_photos"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_template_photo_id"))
        batch_op.drop_column("template_photo_id")
