"""The schema, as SQLAlchemy Core tables (the store speaks Core: no ORM is loaded). Alembic
revisions in ``migrations/`` must produce exactly this (``tests/test_migrations.py`` compares them).

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

from sqlalchemy import (
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from autotls.persistence.types import JSONObject, UTCDateTime

# States in which an order no longer counts as the peer's active order. Kept here as plain
# strings because persistence must not import the machine; tests check it matches it.
INACTIVE_STATES: tuple[str, ...] = ("Failed",)
_INACTIVE_SQL = "state NOT IN ('Failed')"

metadata = MetaData()


def _when(name: str, *, nullable: bool = False) -> Column[object]:
    return Column(name, UTCDateTime(), nullable=nullable)


accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("directory_url", String(512), nullable=False),
    Column("key_pem", Text, nullable=False),  # secret
    Column("url", String(512)),  # the kid; NULL until registered
    Column("status", String(32), nullable=False, default="unregistered"),
    _when("created_at"),
    _when("updated_at"),
    UniqueConstraint("directory_url", name="accounts_directory_url_key"),
)

orders = Table(
    "orders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("peer_id", String(128), nullable=False),  # base36 CIDv1 label
    Column("identifier", String(255), nullable=False),  # *.<b36>.libp2p.direct
    Column("state", String(32), nullable=False),
    Column("data", JSONObject(), nullable=False, default=dict),
    Column("fence", Integer, nullable=False, default=0),
    Column("seq", Integer, nullable=False, default=0),  # last journal seq for this order
    Column("lease_owner", String(128)),
    _when("lease_until", nullable=True),
    _when("next_run_at"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error_class", String(32)),
    Column("last_error_message", Text),
    Column("last_problem", JSONObject()),
    Column("account_id", Integer, ForeignKey("accounts.id")),
    Column("cert_key_pem", Text),  # secret: key of the CSR in flight
    _when("created_at"),
    _when("updated_at"),
    # (last: revision 0002 added it, and the tables list columns in the revisions' order)
    Column(
        "current_certificate_id",
        Integer,
        ForeignKey("certificates.id", use_alter=True, name="fk_orders_current_certificate"),
    ),
    # Design rule 6: at most one active order per peer identity, on SQLite and PostgreSQL.
    # Both partial indexes have the same predicate on PostgreSQL: with_postgresql_options().
    Index("uq_orders_active_peer", "peer_id", unique=True, sqlite_where=text(_INACTIVE_SQL)),
    Index("ix_orders_due", "next_run_at", sqlite_where=text(_INACTIVE_SQL)),
)

certificates = Table(
    "certificates",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("order_id", Integer, ForeignKey("orders.id"), nullable=False, index=True),
    Column("peer_id", String(128), nullable=False),
    Column("chain_pem", Text, nullable=False),
    Column("key_pem", Text, nullable=False),  # secret
    Column("serial", String(80), nullable=False),
    Column("cert_id", String(255)),  # RFC 9773 CertID
    Column("acme_order_url", String(512)),
    _when("not_before"),
    _when("not_after"),
    _when("issued_at"),
    Column("replaces_cert_id", String(255)),
    _when("revoked_at", nullable=True),  # recorded by the operator who revoked it
    Column("revocation_reason", String(32)),  # RFC 5280 name
)

journal = Table(
    "journal",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("order_id", Integer, ForeignKey("orders.id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # transition | error | operator
    Column("from_state", String(32)),
    Column("to_state", String(32), nullable=False),
    Column("trigger", String(64), nullable=False),
    _when("at"),
    Column("worker", String(128)),
    Column("fence", Integer, nullable=False),
    Column("detail", JSONObject(), nullable=False, default=dict),
    UniqueConstraint("order_id", "seq", name="uq_journal_order_seq"),
    # A claim bumps the fence, so one fence can commit at most one journal entry: a step
    # result applied twice would violate this index, not slip through.
    UniqueConstraint("order_id", "fence", name="uq_journal_order_fence"),
)


def with_postgresql_options() -> None:
    """Give the partial indexes their PostgreSQL predicate (what the migrations create).

    Not at import: naming a ``postgresql_`` option makes SQLAlchemy import its PostgreSQL
    dialect, ~20 ms of every ``autotls status`` on SQLite (issue 11's 0.3 s target). Only DDL
    and Alembic's comparison read the option: ``schema`` calls this before it creates a
    PostgreSQL database at the head, and ``migrations/env.py`` before Alembic runs."""
    for index in orders.indexes:
        if index.name in _PARTIAL_INDEXES:
            index.dialect_options["postgresql"]["where"] = text(_INACTIVE_SQL)


_PARTIAL_INDEXES = ("uq_orders_active_peer", "ix_orders_due")

# "The order is active", written exactly as the partial indexes' predicate: with the states as
# literals (not bound parameters) both planners can prove a query implies it and use
# ``ix_orders_due`` and ``uq_orders_active_peer``.
ACTIVE = text("orders." + _INACTIVE_SQL)
