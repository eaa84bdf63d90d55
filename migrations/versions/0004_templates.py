"""template photos: photos uploaded to put a subject into (template mode)

The template job kind itself needs no migration: job kinds are not CHECK-constrained
(likeness.contract.plan is their one definition).

Revision ID: 0004_templates
Revises: 0003_security
Create Date: 2026-11-30 07:00:00
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004_templates'
down_revision = '0003_security'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('template_photos',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('subject_id', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=500), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=True),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'accepted', 'rejected', name='photostatus', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('reason_code', sa.String(length=64), nullable=True),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('face_box', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['subject_id'], ['subjects.id'], name=op.f('fk_template_photos_subject_id_subjects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_template_photos'))
    )
    with op.batch_alter_table('template_photos', schema=None) as batch_op:
        batch_op.create_index('ix_template_photos_subject_created', ['subject_id', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('template_photos', schema=None) as batch_op:
        batch_op.drop_index('ix_template_photos_subject_created')

    op.drop_table('template_photos')
