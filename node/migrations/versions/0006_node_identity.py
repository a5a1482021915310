"""node identity: which node received, analysed and sends each row (two nodes, one database)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 04:00:00

Two `cxrnode serve` nodes may share one audit database (behind a TCP load balancer), each with its own
local spool. An instance's image and result files live on the node that received it, so that node
alone may publish, finish, export and purge it: `node` names it (config `node.name`, default the host
name). '' marks rows written before this revision; a node adopts those whose files it holds
(`AuditStore.adopt_local_rows`). Events say which node wrote them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TABLES = ("studies", "instances", "exports", "events")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("node", sa.String(length=64), nullable=False, server_default=""))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index("ix_instances_node_state", ["node", "state"], unique=False)
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.create_index("ix_exports_node_state", ["node", "state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_index("ix_exports_node_state")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index("ix_instances_node_state")
    for table in reversed(TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("node")
