"""files.validation_claimed_at: the monitor's claim on a file left `uploaded` by a dead replica

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 18:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('files', sa.Column('validation_claimed_at', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('files') as batch:
        batch.drop_column('validation_claimed_at')
