"""Tables of OpenAI's Evals API: evals, their runs, and the runs' output items.

They share `app.store.tables.Base`, so one Alembic history covers them (revision 0004). Every row
carries tenant_id and every query filters on it; a run and its items also carry their eval's id,
so a lookup by (tenant, eval, run) never joins. Times are integer Unix seconds.

Output items are ordered by `seq` (the cursor order of their list) and are unique per
(run, datasource_item_id): a run picked up again after its worker died rewrites an item rather
than adding a second one.
"""

from __future__ import annotations

import secrets
import time

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.store.tables import Base, now


def _ordered_hex() -> str:
    """24 hex digits that sort in creation order (nanoseconds, then random): lists order by
    (created_at, id), and two evals created within one second keep their order."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


def eval_id() -> str:
    # OpenAI's prefixes (eval_, evalrun_, outputitem_): clients and logs recognise them
    return f"eval_{_ordered_hex()}"


def run_id() -> str:
    return f"evalrun_{_ordered_hex()}"


def output_item_id() -> str:
    return f"outputitem_{secrets.token_hex(12)}"


class EvalRecord(Base):
    __tablename__ = "evals"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=eval_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256), default="")
    user_metadata: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # as validated (app.evals.EvalSpec.to_dict): what the runs are checked and graded against
    data_source_config: Mapped[dict] = mapped_column(JSON)
    testing_criteria: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)

    __table_args__ = (Index("ix_evals_tenant_created", "tenant_id", "created_at"),)


class EvalRunRecord(Base):
    __tablename__ = "eval_runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=run_id)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    model: Mapped[str] = mapped_column(String(255))
    # queued | in_progress | completed | failed | canceled (OpenAI's spelling)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    data_source: Mapped[dict] = mapped_column(JSON)
    user_metadata: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    items_total: Mapped[int] = mapped_column(Integer, default=0)  # rows counted at creation
    # app.evals.RunSummary.to_dict() of the run's model, and of its base (adapter runs only)
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    base_summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    per_model_usage: Mapped[list | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # which worker holds the run, and when it last proved it is alive
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # the broker message it is owed while queued (app.evals.dispatch): last send, and how many
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    sends: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_eval_runs_eval_created", "eval_id", "created_at"),)


class EvalRunOutputItemRecord(Base):
    __tablename__ = "eval_run_output_items"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # cursor order
    id: Mapped[str] = mapped_column(String(64), unique=True, default=output_item_id)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"))
    eval_id: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    status: Mapped[str] = mapped_column(String(8))  # pass | fail | error (app.evals.ItemOutcome)
    datasource_item_id: Mapped[int] = mapped_column(Integer)  # the row's line (file) or position (content)
    datasource_item: Mapped[dict] = mapped_column(JSON)
    results: Mapped[list] = mapped_column(JSON)
    sample: Mapped[dict] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # ours: the same item graded on the adapter's base, in the same batches (adapter runs only)
    base_status: Mapped[str | None] = mapped_column(String(8), nullable=True)
    base_results: Mapped[list | None] = mapped_column(JSON, nullable=True)
    base_sample: Mapped[dict | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (
        UniqueConstraint("run_id", "datasource_item_id", name="uq_eval_output_items_run_item"),
        Index("ix_eval_output_items_run_seq", "run_id", "seq"),
    )
