"""study summary report: the UIDs of the study's latest summary SR, which the next revision replaces

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 07:00:00

Each triage revision of a study issues a study summary SR (node.results.study_sr) that lists the one
it replaces in its Predecessor Documents Sequence, in the same series. The triage row keeps the series
and SOP Instance UIDs of the latest one issued ('' when none was: rows written before this revision,
or a study whose results had nowhere to go).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COLUMNS = ("report_series_uid", "report_sop_uid")


def upgrade() -> None:
    with op.batch_alter_table("study_triage", schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.add_column(sa.Column(column, sa.String(length=64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("study_triage", schema=None) as batch_op:
        for column in reversed(COLUMNS):
            batch_op.drop_column(column)
