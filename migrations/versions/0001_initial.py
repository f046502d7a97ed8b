"""Accounts, orders with leases and fences, and the journal.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from autotls.persistence.types import JSONObject, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("state NOT IN ('Failed')")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("directory_url", sa.String(512), nullable=False),
        sa.Column("key_pem", sa.Text(), nullable=False),
        sa.Column("url", sa.String(512), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("directory_url", name="accounts_directory_url_key"),
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("peer_id", sa.String(128), nullable=False),
        sa.Column("identifier", sa.String(255), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("data", JSONObject(), nullable=False),
        sa.Column("fence", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("next_run_at", UTCDateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error_class", sa.String(32), nullable=True),
        sa.Column("last_error_message", sa.Text(), nullable=True),
        sa.Column("last_problem", JSONObject(), nullable=True),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=True),
        sa.Column("cert_key_pem", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index(
        "uq_orders_active_peer",
        "orders",
        ["peer_id"],
        unique=True,
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )
    op.create_index(
        "ix_orders_due", "orders", ["next_run_at"], sqlite_where=ACTIVE, postgresql_where=ACTIVE
    )
    op.create_table(
        "journal",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("order_id", sa.Integer(), sa.ForeignKey("orders.id"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("from_state", sa.String(32), nullable=True),
        sa.Column("to_state", sa.String(32), nullable=False),
        sa.Column("trigger", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("fence", sa.Integer(), nullable=False),
        sa.Column("detail", JSONObject(), nullable=False),
        sa.UniqueConstraint("order_id", "seq", name="uq_journal_order_seq"),
        sa.UniqueConstraint("order_id", "fence", name="uq_journal_order_fence"),
    )


def downgrade() -> None:
    op.drop_table("journal")
    op.drop_index("ix_orders_due", table_name="orders")
    op.drop_index("uq_orders_active_peer", table_name="orders")
    op.drop_table("orders")
    op.drop_table("accounts")
