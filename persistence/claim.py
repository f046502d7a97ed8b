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

:func:`next_due_at` reads, along the same index, when the next claim can take something.

Statements are built once per shape (backend, restricted to some peers or not) with bound
parameters, so SQLAlchemy compiles each once; a list of peers is one parameter (split by
``string_to_array`` on PostgreSQL, JSON read by ``json_each`` on SQLite), not one per peer, so
a node's worker serving many keys sends the same statement every time.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, String, bindparam, case, func, select, text, type_coerce, update
from sqlalchemy.engine import Connection

from autotls.persistence.models import ACTIVE, orders
from autotls.persistence.rows import ClaimedOrder, decode_all, load_many, snapshot_select
from autotls.persistence.types import UTCDateTime

_statements: dict[tuple[str, str, bool], Any] = {}
# How many of the soonest-due active orders next_due_at looks at before it falls back to
# reading them all (only when that many hold live leases at once).
NEXT_DUE_WINDOW = 64


def _peer_filter(dialect: str) -> Any:
    """``orders.peer_id`` among the bound parameter ``:peers`` (see :func:`_peers_param`)."""
    if dialect == "postgresql":  # PeerIDs (base36, base58) hold no comma
        # A subquery, which PostgreSQL hashes once per execution; `= ANY(string_to_array())`
        # would split the list again for every row it looks at.
        peers = func.unnest(func.string_to_array(bindparam("peers", type_=String), ","))
        return orders.c.peer_id.in_(select(peers).scalar_subquery())
    return text("orders.peer_id IN (SELECT value FROM json_each(:peers))").bindparams(
        bindparam("peers", type_=String)
    )


def _peers_param(dialect: str, peers: Collection[str]) -> Any:
    return ",".join(peers) if dialect == "postgresql" else json.dumps(list(peers))


def due_rows(dialect: str, *, filtered: bool, for_update: bool) -> Any:
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
        due = due.where(_peer_filter(dialect))
    if for_update:
        due = due.with_for_update(skip_locked=True)
    return due


def _statement(dialect: str, filtered: bool) -> Any:
    shape = ("claim", dialect, filtered)
    if shape in _statements:
        return _statements[shape]
    postgres = dialect == "postgresql"
    claim = (
        update(orders)
        .where(
            orders.c.id.in_(
                due_rows(dialect, filtered=filtered, for_update=postgres).scalar_subquery()
            )
        )
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
        params["peers"] = _peers_param(conn.dialect.name, peers)
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


def _due_statements(dialect: str, filtered: bool) -> tuple[Any, Any]:
    shape = ("due", dialect, filtered)
    if shape not in _statements:
        soonest = (
            select(orders.c.next_run_at, orders.c.lease_until)
            .where(ACTIVE)
            .order_by(orders.c.next_run_at)
            .limit(bindparam("window", type_=Integer))
        )
        claimable_at = case(
            (orders.c.lease_until > orders.c.next_run_at, orders.c.lease_until),
            else_=orders.c.next_run_at,
        )
        earliest = select(type_coerce(func.min(claimable_at), UTCDateTime())).where(ACTIVE)
        if filtered:
            soonest = soonest.where(_peer_filter(dialect))
            earliest = earliest.where(_peer_filter(dialect))
        _statements[shape] = (soonest, earliest)
    soonest, earliest = _statements[shape]
    return soonest, earliest


def next_due_at(conn: Connection, peers: Collection[str] | None) -> datetime | None:
    """The earliest moment any active order (of ``peers``) can be claimed: its
    ``next_run_at``, or the end of a live lease on it, whichever is later.

    It reads the soonest-due rows along ``ix_orders_due``: a row is claimable at the later of
    its due time and its lease's end, never before its due time, so once the best seen is no
    later than the due time of the last row read, no row further on can beat it. Only when
    more than :data:`NEXT_DUE_WINDOW` rows in a row hold live leases is every active row
    read."""
    dialect = conn.dialect.name
    soonest, earliest = _due_statements(dialect, peers is not None)
    params: dict[str, Any] = {"window": NEXT_DUE_WINDOW}
    if peers is not None:
        params["peers"] = _peers_param(dialect, peers)
    rows = conn.execute(soonest, params).all()
    if not rows:
        return None
    best: datetime = min(max(r.next_run_at, r.lease_until or r.next_run_at) for r in rows)
    if len(rows) < NEXT_DUE_WINDOW or best <= rows[-1].next_run_at:
        return best
    value: datetime | None = conn.execute(earliest, params).scalar_one_or_none()
    return value
