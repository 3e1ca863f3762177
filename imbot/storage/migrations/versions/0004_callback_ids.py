"""callback_ids: the callIds of signed callbacks, shared by every gateway replica

Easemob's signature does not cover the body, so a captured callback could be posted
again with another message in it. The gateway remembers each callId until its
timestamp plus the window (``IMBOT_CALLBACK_TIMESTAMP_WINDOW_S``) and publishes
nothing for one it has seen. ``expires_at`` is milliseconds since the epoch; expired
rows are deleted periodically by the gateways.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "callback_ids",
        sa.Column("call_id", sa.String(length=256), primary_key=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_callback_ids_expires_at", "callback_ids", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_callback_ids_expires_at", table_name="callback_ids")
    op.drop_table("callback_ids")
