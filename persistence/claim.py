"""The claim: lease the due orders to a worker and read them, in one round trip.

``UPDATE orders SET lease..., fence = fence + 1 WHERE id IN (due rows)``: the inner select
walks ``ix_orders_due`` (the partial index on ``next_run_at`` of active orders), so a claim
costs the same with a thousand orders or a hundred thousand, most of them Installed and not
due (``bench/scale.py``).

* PostgreSQL: one statement. The ``UPDATE ... RETURNING`` is a CTE, and the outer ``SELECT``
  joins the claimed rows (their new fence and lease) with their account and current
  certificate; ``FOR UPDATE SKIP LOCKED`` lets concurrent claimers pass each other.
* SQLite (no data-modifying CTEs, and SQLAlchemy would silently drop ``SKIP LOCKED``): the
  ``UPDATE ... RETURNING`` under ``BEGIN IMMEDIATE``, then one ``SELECT`` of the claimed rows
  with the same joins, both in one hand-off to the store's thread.

Statements are built once per shape (backend, restricted to some peers or not) with bound
parameters, so SQLAlchemy compiles each once.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, bindparam, select, update
from sqlalchemy.engine import Connection

from autotls.persistence.models import ACTIVE, orders
from autotls.persistence.rows import ClaimedOrder, decode_all, load_many, snapshot_select

_statements: dict[tuple[str, bool], Any] = {}


def due_rows(*, filtered: bool, for_update: bool) -> Any:
    """The ids of the orders claimable at ``:now``, oldest due first, at most ``:limit``."""
    now = bindparam("now", type_=orders.c.next_run_at.type)
    due = (
        select(orders.c.id)
        .where(
            ACTIVE,
            orders.c.next_run_at <= now,
            # A lease is over at its end: next_due_at reports that very moment.
            (orders.c.lease_until.is_(None)) | (orders.c.lease_until <= now),
        )
        .order_by(orders.c.next_run_at, orders.c.id)
        .limit(bindparam("limit", type_=Integer))
    )
    if filtered:
        due = due.where(orders.c.peer_id.in_(bindparam("peers", expanding=True)))
    if for_update:
        due = due.with_for_update(skip_locked=True)
    return due


def _statement(dialect: str, filtered: bool) -> Any:
    shape = (dialect, filtered)
    if shape in _statements:
        return _statements[shape]
    postgres = dialect == "postgresql"
    claim = (
        update(orders)
        .where(orders.c.id.in_(due_rows(filtered=filtered, for_update=postgres).scalar_subquery()))
        .values(
            lease_owner=bindparam("owner"),
            lease_until=bindparam("until", type_=orders.c.lease_until.type),
            fence=orders.c.fence + 1,
        )
    )
    statement: Any
    if postgres:
        statement = snapshot_select(claim.returning(*orders.c).cte("claimed"))
    else:
        statement = claim.returning(orders.c.id, orders.c.fence)
    _statements[shape] = statement
    return statement


def claim_due(
    conn: Connection,
    owner: str,
    *,
    now: datetime,
    lease_seconds: float,
    limit: int,
    peers: Collection[str] | None,
) -> list[ClaimedOrder]:
    """Lease up to ``limit`` due orders to ``owner`` and read them (inside the caller's
    transaction); in id order."""
    params: dict[str, Any] = {
        "owner": owner,
        "until": now + timedelta(seconds=lease_seconds),
        "now": now,
        "limit": limit,
    }
    if peers is not None:
        params["peers"] = list(peers)
    statement = _statement(conn.dialect.name, peers is not None)
    if conn.dialect.name == "postgresql":
        try:
            return decode_all(conn.execute(statement, params).all())
        except Exception:  # a row that does not decode: find the claimed ones, read each
            leased = select(orders.c.id, orders.c.fence).where(
                orders.c.lease_owner == owner, orders.c.lease_until == params["until"]
            )
            claimed = {int(r.id): int(r.fence) for r in conn.execute(leased)}
            return load_many(conn, sorted(claimed), claimed)
    claimed = {int(r.id): int(r.fence) for r in conn.execute(statement, params)}
    return load_many(conn, sorted(claimed), claimed)
