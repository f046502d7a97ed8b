"""Certificate history, and the order's pointer to the certificate it serves.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from autotls.persistence.types import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("order_id", sa.Integer(), sa.ForeignKey("orders.id"), nullable=False),
        sa.Column("peer_id", sa.String(128), nullable=False),
        sa.Column("chain_pem", sa.Text(), nullable=False),
        sa.Column("key_pem", sa.Text(), nullable=False),
        sa.Column("serial", sa.String(80), nullable=False),
        sa.Column("cert_id", sa.String(255), nullable=True),
        sa.Column("acme_order_url", sa.String(512), nullable=True),
        sa.Column("not_before", UTCDateTime(), nullable=False),
        sa.Column("not_after", UTCDateTime(), nullable=False),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("replaces_cert_id", sa.String(255), nullable=True),
    )
    op.create_index("ix_certificates_order_id", "certificates", ["order_id"])
    with op.batch_alter_table("orders") as batch:
        batch.add_column(sa.Column("current_certificate_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_orders_current_certificate", "certificates", ["current_certificate_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("orders") as batch:
        batch.drop_constraint("fk_orders_current_certificate", type_="foreignkey")
        batch.drop_column("current_certificate_id")
    op.drop_index("ix_certificates_order_id", table_name="certificates")
    op.drop_table("certificates")
