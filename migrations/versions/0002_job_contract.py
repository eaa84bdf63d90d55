"""job contract, outbox, stage timings, workers, client keys and limits, subject refs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 05:54:19.122901
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Job kinds and states are defined once, in likeness.contract.plan: no CHECK repeats them,
    # so a new kind needs no migration. Idempotency lives in idempotency_records alone.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_jobs_jobkind'), type_='check')
        batch_op.drop_constraint(op.f('ck_jobs_jobstate'), type_='check')
        batch_op.drop_constraint(op.f('uq_jobs_client_idempotency_key'), type_='unique')
        batch_op.drop_column('idempotency_key')

    op.create_table('outbox',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('task', sa.String(length=64), nullable=False),
    sa.Column('args', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('queue', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_created', ['created_at'], unique=False)

    op.create_table('workers',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('queues', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('current_job_id', sa.String(length=32), nullable=True),
    sa.Column('models', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('gpu_memory_bytes', sa.BigInteger(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_workers'))
    )
    op.create_table('job_stages',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.Enum('train', 'generate', name='jobkind', native_enum=False, length=16), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_stages_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_stages'))
    )
    with op.batch_alter_table('job_stages', schema=None) as batch_op:
        batch_op.create_index('ix_job_stages_finished', ['finished_at'], unique=False)
        batch_op.create_index('ix_job_stages_job_started', ['job_id', 'started_at'], unique=False)

    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key_hint', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('requests_per_minute', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_concurrent_jobs', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_trainings_per_day', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_storage_bytes', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table('subjects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('external_ref', sa.String(length=200), nullable=True))
        batch_op.create_index('ix_subjects_client_external_ref', ['client_id', 'external_ref'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('subjects', schema=None) as batch_op:
        batch_op.drop_index('ix_subjects_client_external_ref')
        batch_op.drop_column('external_ref')

    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.drop_column('last_used_at')
        batch_op.drop_column('revoked_at')
        batch_op.drop_column('max_storage_bytes')
        batch_op.drop_column('max_trainings_per_day')
        batch_op.drop_column('max_concurrent_jobs')
        batch_op.drop_column('requests_per_minute')
        batch_op.drop_column('key_hint')

    with op.batch_alter_table('job_stages', schema=None) as batch_op:
        batch_op.drop_index('ix_job_stages_job_started')
        batch_op.drop_index('ix_job_stages_finished')

    op.drop_table('job_stages')
    op.drop_table('workers')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_created')

    op.drop_table('outbox')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=200), nullable=True))
        batch_op.create_unique_constraint(op.f('uq_jobs_client_idempotency_key'), ['client_id', 'idempotency_key'])
        batch_op.create_check_constraint(op.f('ck_jobs_jobkind'), "kind IN ('train', 'generate')")
        batch_op.create_check_constraint(
            op.f('ck_jobs_jobstate'), "state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')")
