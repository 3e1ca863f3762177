"""identifier columns sized with margin above what the gateway admits; delivery claims

Every string column that holds an identifier grows to hold the longest value the
gateway admits (core.limits) and everything derived from it, with margin:
message ids 128 (a reply's row is ``{msg_id}:reply``, the fallback apology's
ledger ``{msg_id}#fallback``), user / bot / group ids 128, conversation ids 300
(``chat:{bot}:{user}``), Easemob's message ids 128, model names 128, provider
names 64. On PostgreSQL a too-long value failed the ledger write after Easemob had
accepted the reply, and the DLQ replay sent it again.

``deliveries.claimed_by`` / ``claimed_until``: a sender claims a part (status
``sending``) before it sends it, so two senders never send the same part, and a
part whose claim was never resolved (a crash between Easemob's answer and the
ledger commit) is known to be uncertain instead of silently sent again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# table -> column -> (old length, new length, nullable)
_SIZES: dict[str, dict[str, tuple[int, int, bool]]] = {
    "conversations": {"id": (200, 300, False), "bot": (64, 128, False)},
    "messages": {
        "msg_id": (80, 128, False),
        "conversation_id": (200, 300, False),
        "author": (64, 128, False),
        "reply_to": (80, 128, True),
    },
    "deliveries": {
        "msg_id": (80, 128, False),
        "target": (64, 128, False),
        "easemob_msg_id": (64, 128, True),
    },
    "usage": {
        "msg_id": (80, 128, False),
        "conversation_id": (200, 300, False),
        "model": (80, 128, False),
        "provider": (32, 64, False),
    },
    "moderation_audit": {"msg_id": (80, 128, False)},
}


def _resize(grow: bool) -> None:
    for table, columns in _SIZES.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column, (old, new, nullable) in columns.items():
                batch_op.alter_column(
                    column,
                    existing_type=sa.String(length=new if not grow else old),
                    type_=sa.String(length=new if grow else old),
                    existing_nullable=nullable,
                )


def upgrade() -> None:
    _resize(grow=True)
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("claimed_by")
    _resize(grow=False)
