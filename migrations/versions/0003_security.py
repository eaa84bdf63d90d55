"""security and retention: per-client retention, stored sizes for the storage quota, purge totals

Revision ID: 0003_security
Revises: 0002
Create Date: 2026-11-30 07:00:00
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = '0003_security'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('retain_training_data_days', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('retain_images_days', sa.Integer(), nullable=True))
    with op.batch_alter_table('photos', schema=None) as batch_op:
        batch_op.add_column(sa.Column('size_bytes', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('size_bytes', sa.BigInteger(), nullable=True))
    op.create_table('purge_totals',
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('deleted', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('kind', name=op.f('pk_purge_totals'))
    )


def downgrade() -> None:
    op.drop_table('purge_totals')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_column('size_bytes')
    with op.batch_alter_table('photos', schema=None) as batch_op:
        batch_op.drop_column('size_bytes')
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.drop_column('retain_images_days')
        batch_op.drop_column('retain_training_data_days')
