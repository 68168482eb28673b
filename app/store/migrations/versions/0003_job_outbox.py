"""job_outbox: a queued job's broker message, committed with the job (app/jobs/outbox.py)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_outbox',
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('not_before', sa.Float(), nullable=False),
    sa.Column('sent_at', sa.Float(), nullable=True),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id')
    )
    with op.batch_alter_table('job_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_outbox_not_before'), ['not_before'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_outbox_tenant_id'), ['tenant_id'], unique=False)
    # jobs queued before the outbox existed: owed a message now (a duplicate is harmless)
    t = time.time()
    op.execute(sa.text(
        "INSERT INTO job_outbox (job_id, tenant_id, created_at, not_before, sent_at, sends) "
        "SELECT id, tenant_id, :created, :t, NULL, 0 FROM jobs WHERE status = 'queued'"
    ).bindparams(created=int(t), t=t))


def downgrade() -> None:
    with op.batch_alter_table('job_outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_outbox_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_job_outbox_not_before'))
    op.drop_table('job_outbox')
