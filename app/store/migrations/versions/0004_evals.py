"""evals, eval_runs, eval_run_output_items: OpenAI's Evals API (app/store/eval_tables.py)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 20:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('evals',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('user_metadata', sa.JSON(), nullable=True),
    sa.Column('data_source_config', sa.JSON(), nullable=False),
    sa.Column('testing_criteria', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('evals', schema=None) as batch_op:
        batch_op.create_index('ix_evals_tenant_created', ['tenant_id', 'created_at'], unique=False)

    op.create_table('eval_runs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('eval_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('model', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('data_source', sa.JSON(), nullable=False),
    sa.Column('user_metadata', sa.JSON(), nullable=True),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('items_total', sa.Integer(), nullable=False),
    sa.Column('summary', sa.JSON(), nullable=True),
    sa.Column('base_summary', sa.JSON(), nullable=True),
    sa.Column('per_model_usage', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('started_at', sa.BigInteger(), nullable=True),
    sa.Column('finished_at', sa.BigInteger(), nullable=True),
    sa.Column('worker_id', sa.String(length=128), nullable=True),
    sa.Column('heartbeat_at', sa.Float(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('sent_at', sa.Float(), nullable=True),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['eval_id'], ['evals.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('eval_runs', schema=None) as batch_op:
        batch_op.create_index('ix_eval_runs_eval_created', ['eval_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_eval_runs_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_eval_runs_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('eval_run_output_items',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('eval_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('datasource_item_id', sa.Integer(), nullable=False),
    sa.Column('datasource_item', sa.JSON(), nullable=False),
    sa.Column('results', sa.JSON(), nullable=False),
    sa.Column('sample', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('base_status', sa.String(length=8), nullable=True),
    sa.Column('base_results', sa.JSON(), nullable=True),
    sa.Column('base_sample', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['eval_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('run_id', 'datasource_item_id', name='uq_eval_output_items_run_item')
    )
    with op.batch_alter_table('eval_run_output_items', schema=None) as batch_op:
        batch_op.create_index('ix_eval_output_items_run_seq', ['run_id', 'seq'], unique=False)
        batch_op.create_index(batch_op.f('ix_eval_run_output_items_tenant_id'), ['tenant_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('eval_run_output_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_eval_run_output_items_tenant_id'))
        batch_op.drop_index('ix_eval_output_items_run_seq')

    op.drop_table('eval_run_output_items')
    with op.batch_alter_table('eval_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_eval_runs_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_eval_runs_status'))
        batch_op.drop_index('ix_eval_runs_eval_created')

    op.drop_table('eval_runs')
    with op.batch_alter_table('evals', schema=None) as batch_op:
        batch_op.drop_index('ix_evals_tenant_created')

    op.drop_table('evals')
