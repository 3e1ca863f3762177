"""quota_leases: slices of a shared budget taken by one model worker

A budget every message counts against (the tenant's) is no longer reserved per call:
a model worker takes a slice of it in one transaction (``quota_leases``), reserves its
calls against the slice in memory, and closes the lease when its window has passed:
the calls settled under it (``quota_reservations.lease_id``) become spent, the rest of
the slice goes back, and calls still held become ordinary reservations.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quota_leases",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("keys", sa.Text(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("micros", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("spent_tokens", sa.BigInteger(), nullable=True),
        sa.Column("spent_micros", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_quota_leases_state_expires", "quota_leases", ["state", "expires_at"])
    with op.batch_alter_table("quota_reservations") as batch:
        batch.add_column(sa.Column("lease_id", sa.String(length=64), nullable=True))
        batch.create_index("ix_quota_reservations_lease", ["lease_id", "state"])


def downgrade() -> None:
    with op.batch_alter_table("quota_reservations") as batch:
        batch.drop_index("ix_quota_reservations_lease")
        batch.drop_column("lease_id")
    op.drop_index("ix_quota_leases_state_expires", table_name="quota_leases")
    op.drop_table("quota_leases")
