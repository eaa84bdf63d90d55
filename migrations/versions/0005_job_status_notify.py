"""jobs: NOTIFY likeness_jobs on every change (the API's status-poll cache listens)

Revision ID: 0005_job_status_notify
Revises: 0004_templates
Create Date: 2026-11-30 07:00:00

PostgreSQL only: a row trigger sends the job id on channel ``likeness_jobs`` after every
UPDATE or DELETE of a job, whoever makes it (API, worker, recovery sweep, an operator's
SQL). Notifications are delivered when the transaction commits. SQLite has no
LISTEN/NOTIFY: embedded mode reads every poll from the database.
"""

from __future__ import annotations

from alembic import op

revision = "0005_job_status_notify"
down_revision = "0004_templates"
branch_labels = None
depends_on = None

#: the channel and trigger names the API checks for (app.services.job_status)
CHANNEL = "likeness_jobs"
TRIGGER = "jobs_notify_change"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""
        CREATE OR REPLACE FUNCTION likeness_notify_job_change() RETURNS trigger AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('{CHANNEL}', OLD.id);
            ELSE
                PERFORM pg_notify('{CHANNEL}', NEW.id);
            END IF;
            RETURN NULL;
        END
        $$ LANGUAGE plpgsql
    """)
    op.execute(f"""
        CREATE TRIGGER {TRIGGER} AFTER UPDATE OR DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION likeness_notify_job_change()
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON jobs")
    op.execute("DROP FUNCTION IF EXISTS likeness_notify_job_change()")
