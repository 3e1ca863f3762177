"""delivery ledger: where each sent part ends, and which reply it belongs to;
conversations: where their history starts after a provider asked to clear it

A part is identified by where it starts in the reply (the end of the part
before it), so a sender resumes a partly sent reply at the first unsent byte,
and can split one part further after Easemob refused it as too large without
renumbering what was already sent. ``reply_digest`` tells a different reply to
the same message (a replay through the model stage) from a resumed one.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("end_offset", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("reply_digest", sa.String(length=32), nullable=True))
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "history_from_id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_column("history_from_id")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("reply_digest")
        batch_op.drop_column("end_offset")
