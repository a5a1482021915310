"""storage commitment: per-AE switch, commitment transactions, exports waiting for their report

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 04:00:00
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
        "storage_commitments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("transaction_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("destination_ae", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("sop_references", sa.JSON(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_storage_commitments_destination_ae", "storage_commitments", ["destination_ae"])
    op.create_index("ix_storage_commitments_state", "storage_commitments", ["state"])
    op.create_index("ix_storage_commitments_deadline_at", "storage_commitments", ["deadline_at"])
    # Existing AE titles keep today's behaviour (no commitment asked).
    with op.batch_alter_table("ae_titles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("storage_commitment", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_exports_commitment_id", ["commitment_id"])
        batch_op.create_foreign_key("fk_exports_commitment_id", "storage_commitments", ["commitment_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_constraint("fk_exports_commitment_id", type_="foreignkey")
        batch_op.drop_index("ix_exports_commitment_id")
        batch_op.drop_column("committed_at")
        batch_op.drop_column("commitment_id")
    with op.batch_alter_table("ae_titles", schema=None) as batch_op:
        batch_op.drop_column("storage_commitment")
    op.drop_table("storage_commitments")
