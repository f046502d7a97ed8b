"""The schema, as typed SQLAlchemy models. Alembic revisions in ``migrations/`` must produce
exactly this (``tests/test_migrations.py`` compares them).

Four tables:

* ``accounts``     one ACME account per directory URL, shared by every order of the store
                   (Let's Encrypt allows 10 new accounts per IP per 3 h: never make a second).
* ``orders``       one row per peer identity that cycles New -> ... -> Installed -> RenewDue ->
                   Registered ... Its ``state`` is a name from ``autotls.fsm.machine.State``;
                   ``fence`` is bumped by every claim and checked by every commit (design rule 5).
* ``certificates`` every certificate ever installed for an order (the history of renewals),
                   and whether an operator revoked it. What a certificate *is* (serial,
                   validity, revocation) lives here, never in the order's ``data``.
* ``journal``      every transition and every classified error, in order (design rule 10).

Secret columns (``accounts.key_pem``, ``orders.cert_key_pem``, ``certificates.key_pem``) are
never copied into ``data``, ``journal.detail`` or logs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from autotls.persistence.types import JSONObject, UTCDateTime

# States in which an order no longer counts as the peer's active order. Kept here as plain
# strings because persistence must not import the machine; tests check it matches it.
INACTIVE_STATES: tuple[str, ...] = ("Failed",)
_INACTIVE_SQL = "state NOT IN ('Failed')"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSONObject}


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    directory_url: Mapped[str] = mapped_column(String(512))
    key_pem: Mapped[str] = mapped_column(Text)  # secret
    url: Mapped[str | None] = mapped_column(String(512))  # the kid; NULL until registered
    status: Mapped[str] = mapped_column(String(32), default="unregistered")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("directory_url", name="accounts_directory_url_key"),)


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[str] = mapped_column(String(128))  # base36 CIDv1 label
    identifier: Mapped[str] = mapped_column(String(255))  # *.<b36>.libp2p.direct
    state: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    fence: Mapped[int] = mapped_column(Integer, default=0)
    seq: Mapped[int] = mapped_column(Integer, default=0)  # last journal seq for this order
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None]
    next_run_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error_class: Mapped[str | None] = mapped_column(String(32))
    last_error_message: Mapped[str | None] = mapped_column(Text)
    last_problem: Mapped[dict[str, Any] | None]
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"))
    cert_key_pem: Mapped[str | None] = mapped_column(Text)  # secret: key of the CSR in flight
    current_certificate_id: Mapped[int | None] = mapped_column(
        ForeignKey("certificates.id", use_alter=True, name="fk_orders_current_certificate")
    )
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        # Design rule 6: at most one active order per peer identity, on SQLite and PostgreSQL.
        Index(
            "uq_orders_active_peer",
            "peer_id",
            unique=True,
            sqlite_where=text(_INACTIVE_SQL),
            postgresql_where=text(_INACTIVE_SQL),
        ),
        Index(
            "ix_orders_due",
            "next_run_at",
            sqlite_where=text(_INACTIVE_SQL),
            postgresql_where=text(_INACTIVE_SQL),
        ),
    )


class Certificate(Base):
    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    peer_id: Mapped[str] = mapped_column(String(128))
    chain_pem: Mapped[str] = mapped_column(Text)
    key_pem: Mapped[str] = mapped_column(Text)  # secret
    serial: Mapped[str] = mapped_column(String(80))
    cert_id: Mapped[str | None] = mapped_column(String(255))  # RFC 9773 CertID
    acme_order_url: Mapped[str | None] = mapped_column(String(512))
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    issued_at: Mapped[datetime]
    replaces_cert_id: Mapped[str | None] = mapped_column(String(255))
    revoked_at: Mapped[datetime | None]  # recorded by the operator who revoked it
    revocation_reason: Mapped[str | None] = mapped_column(String(32))  # RFC 5280 name


class JournalEntry(Base):
    __tablename__ = "journal"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # transition | error | operator
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    trigger: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime]
    worker: Mapped[str | None] = mapped_column(String(128))
    fence: Mapped[int] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (
        UniqueConstraint("order_id", "seq", name="uq_journal_order_seq"),
        # A claim bumps the fence, so one fence can commit at most one journal entry: a step
        # result applied twice would violate this index, not slip through.
        UniqueConstraint("order_id", "fence", name="uq_journal_order_fence"),
    )


# The tables, for the store's Core statements.
orders = cast(Table, Order.__table__)
accounts = cast(Table, Account.__table__)
certificates = cast(Table, Certificate.__table__)
journal = cast(Table, JournalEntry.__table__)

# "The order is active", written exactly as the partial indexes' predicate: with the states as
# literals (not bound parameters) both planners can prove a query implies it and use
# ``ix_orders_due`` and ``uq_orders_active_peer``.
ACTIVE = text("orders." + _INACTIVE_SQL)
