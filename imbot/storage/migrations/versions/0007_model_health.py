"""model_health: which models' circuits are open, shared by every worker

The model stage's circuit breakers live in each model worker; the route stage, often in
another process, reads this table (cached a few seconds) to leave models whose circuit is
open out of the chains it chooses. A row says until when a worker expects the model's
circuit to stay open (its cooldown); a closed circuit sets ``open_until`` to now.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_health",
        sa.Column("model", sa.String(length=128), primary_key=True),
        sa.Column("open_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("model_health")
