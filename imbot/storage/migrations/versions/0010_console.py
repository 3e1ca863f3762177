"""console_audit: what operators did in the console; indexes the console's searches use

Every action taken in the operator console (a requeue, a replay, a tier changed) is one
row: who, in which role, what, on what, and how it ended; never user text. The console
finds a user's conversations by the messages' author, a message's reservations by its
msg_id, and plots spend, usage and ratings over time: those reads get indexes instead of
scanning the history and the ledgers.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 00:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("operator", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=300), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
    )
    op.create_index("ix_console_audit_at", "console_audit", ["at"])
    op.create_index("ix_console_audit_target", "console_audit", ["action", "target"])
    op.create_index("ix_messages_author_id", "messages", ["author", "id"])
    op.create_index("ix_messages_created_at", "messages", ["created_at"])
    op.create_index("ix_usage_created_at", "usage", ["created_at"])
    op.create_index("ix_quota_reservations_created", "quota_reservations", ["created_at"])
    op.create_index("ix_quota_reservations_msg_id", "quota_reservations", ["msg_id"])


def downgrade() -> None:
    op.drop_index("ix_quota_reservations_msg_id", table_name="quota_reservations")
    op.drop_index("ix_quota_reservations_created", table_name="quota_reservations")
    op.drop_index("ix_usage_created_at", table_name="usage")
    op.drop_index("ix_messages_created_at", table_name="messages")
    op.drop_index("ix_messages_author_id", table_name="messages")
    op.drop_index("ix_console_audit_target", table_name="console_audit")
    op.drop_index("ix_console_audit_at", table_name="console_audit")
    op.drop_table("console_audit")
