"""DICOMweb: STOW-RS source tokens, STOW-RS destinations, the protocol of an inbound request

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per token; only its SHA-256 is kept (the token itself is shown once, when it is made).
    op.create_table(
        "stow_tokens",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_stow_tokens_source", "stow_tokens", ["source"])
    # A destination with a URL is reached by STOW-RS instead of C-STORE.
    with op.batch_alter_table("ae_titles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("url", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("auth", sa.String(8), nullable=False, server_default="none"))
        batch_op.add_column(sa.Column("username", sa.String(255), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("secret", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("protocol", sa.String(8), nullable=False, server_default="dicom"))


def downgrade() -> None:
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.drop_column("protocol")
    with op.batch_alter_table("ae_titles", schema=None) as batch_op:
        batch_op.drop_column("secret")
        batch_op.drop_column("username")
        batch_op.drop_column("auth")
        batch_op.drop_column("url")
    op.drop_table("stow_tokens")
