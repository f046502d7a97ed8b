"""From rows to records: how the store reads what it wrote, and what it cannot read.

An order is read with its account and current certificate in one ``SELECT`` (two ``LEFT
JOIN``\\s, :func:`snapshot_columns`); the claim reads it in the same statement or round trip
that leases it (:mod:`~autotls.persistence.claim`). A row whose JSON or timestamps do not
decode becomes a :class:`CorruptOrder` (reported, and set aside by the worker) instead of an
exception that would stop the claim of every other row: :func:`load_claimed` reads such a row
on its own to tell what it can about it.

Everything here runs on a synchronous connection, inside the store's transaction (see
:meth:`autotls.persistence.store.Store` for how it reaches the database).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Row, Select, bindparam, select
from sqlalchemy.engine import Connection

from autotls.persistence.errors import CorruptRowError, OrderNotFoundError
from autotls.persistence.models import accounts, certificates, orders
from autotls.persistence.records import (
    AccountRecord,
    CertificateRecord,
    JournalRecord,
    OrderSnapshot,
)
from autotls.persistence.types import CorruptJSON

ACCOUNT = "a__"
CERTIFICATE = "c__"


@dataclass(frozen=True)
class CorruptOrder:
    """A claimed row that could not be decoded. The worker fails it (keeping its bytes)."""

    id: int
    fence: int
    peer_id: str | None
    state: str | None
    error: str


ClaimedOrder = OrderSnapshot | CorruptOrder


def snapshot_select(source: FromClause) -> Select[Any]:
    """An order's columns from ``source`` (the orders table, or a claim's ``RETURNING``),
    with its account's and current certificate's, labelled ``a__*`` and ``c__*``."""
    columns: list[ColumnElement[Any]] = [source.c[c.name] for c in orders.c]
    columns += [c.label(ACCOUNT + c.name) for c in accounts.c]
    columns += [c.label(CERTIFICATE + c.name) for c in certificates.c]
    joined = source.outerjoin(accounts, accounts.c.id == source.c.account_id).outerjoin(
        certificates, certificates.c.id == source.c.current_certificate_id
    )
    return select(*columns).select_from(joined)


# One statement, built once: the orders given by id, with what they point to.
_BY_IDS = snapshot_select(orders).where(orders.c.id.in_(bindparam("ids", expanding=True)))
_BY_ID = snapshot_select(orders).where(orders.c.id == bindparam("id"))
_BASIC = select(orders.c.fence, orders.c.peer_id, orders.c.state).where(
    orders.c.id == bindparam("id")
)


def load_order(conn: Connection, order_id: int) -> OrderSnapshot:
    """The order ``order_id`` (raises :class:`CorruptRowError` for a row it cannot read)."""
    claimed = load_claimed(conn, order_id, None)
    if isinstance(claimed, CorruptOrder):
        raise CorruptRowError(f"order {order_id}: {claimed.error}")
    return claimed


def load_claimed(conn: Connection, order_id: int, fence: int | None) -> ClaimedOrder:
    """The order ``order_id``, or what can be told about it when the row cannot be decoded."""
    try:
        row = conn.execute(_BY_ID, {"id": order_id}).first()
    except Exception as exc:  # undecodable column values (e.g. a mangled timestamp)
        return _corrupt(conn, order_id, fence, f"unreadable row: {exc}")
    if row is None:
        raise OrderNotFoundError(order_id)
    return snapshot(row)


def load_many(conn: Connection, ids: Sequence[int], fences: dict[int, int]) -> list[ClaimedOrder]:
    """The orders ``ids`` in one statement, in id order; when one of them cannot be read,
    each on its own (so that only that one is reported corrupt)."""
    if not ids:
        return []
    try:
        rows = conn.execute(_BY_IDS, {"ids": list(ids)}).all()
    except Exception:  # a row that does not decode: find it
        return [load_claimed(conn, i, fences.get(i)) for i in sorted(ids)]
    return decode_all(rows)


def decode_all(rows: Iterable[Row[Any]]) -> list[ClaimedOrder]:
    return sorted((snapshot(r) for r in rows), key=lambda s: s.id)


def snapshot(row: Row[Any]) -> ClaimedOrder:
    """A row of :func:`snapshot_select` as the engine reads it."""
    problems = []
    if isinstance(row.data, CorruptJSON):
        problems.append(f"data column {row.data.error}")
    if isinstance(row.last_problem, CorruptJSON):
        problems.append(f"last_problem column {row.last_problem.error}")
    if problems:
        error = "; ".join(problems)
        return CorruptOrder(int(row.id), int(row.fence), row.peer_id, row.state, error)
    account = None if row.a__id is None else account_record(row, ACCOUNT)
    cert = None if row.c__id is None else certificate_record(row, CERTIFICATE)
    return OrderSnapshot(
        id=int(row.id),
        peer_id=row.peer_id,
        identifier=row.identifier,
        state=row.state,
        data=dict(row.data),
        fence=int(row.fence),
        attempts=int(row.attempts),
        next_run_at=row.next_run_at,
        account=account,
        cert_key_pem=row.cert_key_pem.encode("ascii") if row.cert_key_pem else None,
        certificate=cert,
        last_error_class=row.last_error_class,
        last_error_message=row.last_error_message,
        lease_owner=row.lease_owner,
        lease_until=row.lease_until,
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_problem=None if row.last_problem is None else dict(row.last_problem),
    )


def _corrupt(conn: Connection, order_id: int, fence: int | None, error: str) -> CorruptOrder:
    basic = conn.execute(_BASIC, {"id": order_id}).first()
    if basic is None:
        raise OrderNotFoundError(order_id)
    return CorruptOrder(
        order_id,
        int(basic.fence if fence is None else fence),
        basic.peer_id,
        basic.state,
        error,
    )


def account_record(row: Row[Any], prefix: str = "") -> AccountRecord:
    m = row._mapping
    return AccountRecord(
        id=int(m[prefix + "id"]),
        directory_url=m[prefix + "directory_url"],
        key_pem=m[prefix + "key_pem"].encode("ascii"),
        url=m[prefix + "url"],
        status=m[prefix + "status"],
    )


def certificate_record(row: Row[Any], prefix: str = "") -> CertificateRecord:
    m = row._mapping
    return CertificateRecord(
        id=int(m[prefix + "id"]),
        order_id=int(m[prefix + "order_id"]),
        peer_id=m[prefix + "peer_id"],
        chain_pem=m[prefix + "chain_pem"],
        key_pem=m[prefix + "key_pem"].encode("ascii"),
        serial=m[prefix + "serial"],
        cert_id=m[prefix + "cert_id"],
        not_before=m[prefix + "not_before"],
        not_after=m[prefix + "not_after"],
        issued_at=m[prefix + "issued_at"],
        acme_order_url=m[prefix + "acme_order_url"],
        replaces_cert_id=m[prefix + "replaces_cert_id"],
        revoked_at=m[prefix + "revoked_at"],
        revocation_reason=m[prefix + "revocation_reason"],
    )


def journal_record(row: Row[Any]) -> JournalRecord:
    detail = row.detail if isinstance(row.detail, dict) else {"corrupt": str(row.detail)}
    return JournalRecord(
        order_id=int(row.order_id),
        seq=int(row.seq),
        kind=row.kind,
        from_state=row.from_state,
        to_state=row.to_state,
        trigger=row.trigger,
        at=row.at,
        worker=row.worker,
        fence=int(row.fence),
        detail=detail,
    )
