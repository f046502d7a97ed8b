"""Order data as declared in autotls/fsm/data.py; revocation on the certificate's row.

* ``certificates.revoked_at`` / ``revocation_reason``: an operator's revocation is a fact
  about a certificate. Orders that recorded it in their data (``revoked_serial``) move it to
  the certificate with that serial (at the order's last update: the moment it was recorded
  is not known more precisely).
* Keys no code reads leave ``orders.data``: ``serial`` and ``not_after`` (the certificate's
  row holds them), ``revoked_serial`` (moved), ``renewal_reason`` and ``replaces_dropped``
  (the journal entry of the move says why), ``finalize_url``, ``token``,
  ``csr_sha256``, ``broker_addresses``, ``txt_servers``, ``txt_last_check`` (the CA's or the
  journal's copies are the ones read), ``unexpected_errors`` (rows from before errors had
  class ``internal``).
* Journal entries of classified errors after which the order stayed, ``retry:<class>``, are
  the declared move ``retry_later`` (the class is in the entry's detail already).

A row whose ``data`` is not a JSON object is left byte for byte as it is (the worker sets it
aside). The downgrade restores the columns and journal names, not the dropped keys.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from autotls.persistence.types import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here: this revision must do the same thing whatever later code declares.
DROPPED_KEYS = (
    "serial",
    "not_after",
    "revoked_serial",
    "renewal_reason",
    "replaces_dropped",
    "finalize_url",
    "token",
    "csr_sha256",
    "broker_addresses",
    "txt_servers",
    "txt_last_check",
    "unexpected_errors",
)


def _decode(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _encode(value: dict[str, Any]) -> str:
    # As autotls.persistence.types.JSONObject writes it.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def upgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("revoked_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("revocation_reason", sa.String(32), nullable=True))

    conn = op.get_bind()
    orders = sa.table(
        "orders",
        sa.column("id", sa.Integer()),
        sa.column("data", sa.Text()),
        sa.column("updated_at", UTCDateTime()),
    )
    certificates = sa.table(
        "certificates",
        sa.column("order_id", sa.Integer()),
        sa.column("serial", sa.String()),
        sa.column("revoked_at", UTCDateTime()),
    )
    rows = conn.execute(sa.select(orders.c.id, orders.c.data, orders.c.updated_at)).all()
    for order_id, text, updated_at in rows:
        data = _decode(text)
        if data is None:
            continue
        revoked = data.get("revoked_serial")
        if isinstance(revoked, str) and revoked:
            conn.execute(
                sa.update(certificates)
                .where(
                    certificates.c.order_id == order_id,
                    certificates.c.serial == revoked,
                    certificates.c.revoked_at.is_(None),
                )
                .values(revoked_at=updated_at)
            )
        kept = {k: v for k, v in data.items() if k not in DROPPED_KEYS}
        if kept != data:
            conn.execute(
                sa.update(orders).where(orders.c.id == order_id).values(data=_encode(kept))
            )

    journal = sa.table("journal", sa.column("trigger", sa.String()))
    conn.execute(
        sa.update(journal).where(journal.c.trigger.like("retry:%")).values(trigger="retry_later")
    )


def downgrade() -> None:
    conn = op.get_bind()
    journal = sa.table(
        "journal",
        sa.column("trigger", sa.String()),
        sa.column("detail", sa.Text()),
        sa.column("id", sa.Integer()),
    )
    rows = conn.execute(
        sa.select(journal.c.id, journal.c.detail).where(journal.c.trigger == "retry_later")
    ).all()
    for entry_id, text in rows:
        detail = _decode(text) or {}
        name = f"retry:{detail.get('error_class') or 'transient'}"
        conn.execute(sa.update(journal).where(journal.c.id == entry_id).values(trigger=name))
    with op.batch_alter_table("certificates") as batch:
        batch.drop_column("revocation_reason")
        batch.drop_column("revoked_at")
