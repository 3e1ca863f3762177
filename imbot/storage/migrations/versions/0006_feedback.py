"""feedback: users' ratings of the bot's replies

- feedback: one row per feedback message (unique ``msg_id``, so a redelivered record
  writes nothing twice), naming the rated reply by Easemob's msg id, the rating, the
  user, the conversation and when it was given.
- deliveries.easemob_msg_id gets an index: the satisfaction report finds the answered
  message through it (each reply part's ledger row carries Easemob's id of that part).
  On PostgreSQL, building it holds writes to the ledger for as long as it takes to read
  the table once: run the migration before the rollout, as always.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("msg_id", sa.String(length=128), nullable=False),
        sa.Column("reply_msg_id", sa.String(length=128), nullable=False),
        sa.Column("rating", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("conversation_id", sa.String(length=300), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("msg_id", name="uq_feedback_msg_id"),
    )
    op.create_index("ix_feedback_reply_msg_id", "feedback", ["reply_msg_id"])
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"])
    op.create_index("ix_deliveries_easemob_msg_id", "deliveries", ["easemob_msg_id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_easemob_msg_id", table_name="deliveries")
    op.drop_index("ix_feedback_created_at", table_name="feedback")
    op.drop_index("ix_feedback_reply_msg_id", table_name="feedback")
    op.drop_table("feedback")
