"""quota ledger, user tiers, the provider of each history message

- quota_counters: one row per budget scope and period (``user:U:d:2026-12-01``, …): what
  was spent and what is reserved by calls in flight, in tokens and in micro-units of
  the policy's currency. A reservation is one conditional UPDATE per scope, so the
  check and the reservation are one atomic step in the database every worker shares.
- quota_reservations: one row per reservation, held until settled with the call's real
  usage, or released; a held row past ``expires_at`` (its worker died) is expired and
  its amount returned to the budget.
- user_tiers: tiers set by ``imbot users set-tier``.
- messages.provider: who wrote an answer, so a demo model's canned turns are never sent
  to a real model as history.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "quota_counters",
        sa.Column("key", sa.String(length=200), primary_key=True),
        sa.Column("spent_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "quota_reservations",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("msg_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("tier", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("keys", sa.Text(), nullable=False),  # the scopes' keys, newline-separated
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("micros", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),  # held|settled|expired
        sa.Column("spent_tokens", sa.BigInteger(), nullable=True),
        sa.Column("spent_micros", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_quota_reservations_state_expires", "quota_reservations", ["state", "expires_at"]
    )
    op.create_index(
        "ix_quota_reservations_user_created", "quota_reservations", ["user_id", "created_at"]
    )
    op.create_table(
        "user_tiers",
        sa.Column("user_id", sa.String(length=128), primary_key=True),
        sa.Column("tier", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("provider", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("provider")
    op.drop_table("user_tiers")
    op.drop_index("ix_quota_reservations_user_created", table_name="quota_reservations")
    op.drop_index("ix_quota_reservations_state_expires", table_name="quota_reservations")
    op.drop_table("quota_reservations")
    op.drop_table("quota_counters")
