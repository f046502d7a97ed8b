"""From rows to records: how the store reads what it wrote, and what it cannot read.

Every read of an order goes through :func:`load_claimed`: a row whose JSON or timestamps do
not decode becomes a :class:`CorruptOrder` (reported, and set aside by the worker) instead of
an exception that would stop the claim of every other row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from autotls.persistence.errors import CorruptRowError, OrderNotFoundError
from autotls.persistence.models import accounts, certificates, orders
from autotls.persistence.records import (
    AccountRecord,
    CertificateRecord,
    JournalRecord,
    OrderSnapshot,
)
from autotls.persistence.types import CorruptJSON


@dataclass(frozen=True)
class CorruptOrder:
    """A claimed row that could not be decoded. The worker fails it (keeping its bytes)."""

    id: int
    fence: int
    peer_id: str | None
    state: str | None
    error: str


ClaimedOrder = OrderSnapshot | CorruptOrder


async def load_order(conn: AsyncConnection, order_id: int) -> OrderSnapshot:
    """The order ``order_id`` (raises :class:`CorruptRowError` for a row it cannot read)."""
    claimed = await load_claimed(conn, order_id, None)
    if isinstance(claimed, CorruptOrder):
        raise CorruptRowError(f"order {order_id}: {claimed.error}")
    return claimed


async def load_claimed(conn: AsyncConnection, order_id: int, fence: int | None) -> ClaimedOrder:
    """The order ``order_id``, or what can be told about it when the row cannot be decoded."""
    try:
        row = (await conn.execute(select(orders).where(orders.c.id == order_id))).first()
    except Exception as exc:  # undecodable column values (e.g. a mangled timestamp)
        return await _corrupt(conn, order_id, fence, f"unreadable row: {exc}")
    if row is None:
        raise OrderNotFoundError(order_id)
    problems = []
    if isinstance(row.data, CorruptJSON):
        problems.append(f"data column {row.data.error}")
    if isinstance(row.last_problem, CorruptJSON):
        problems.append(f"last_problem column {row.last_problem.error}")
    if problems:
        return CorruptOrder(order_id, int(row.fence), row.peer_id, row.state, "; ".join(problems))
    account = None
    if row.account_id is not None:
        arow = (await conn.execute(select(accounts).where(accounts.c.id == row.account_id))).first()
        account = None if arow is None else account_record(arow)
    cert = None
    if row.current_certificate_id is not None:
        crow = (
            await conn.execute(
                select(certificates).where(certificates.c.id == row.current_certificate_id)
            )
        ).first()
        cert = None if crow is None else certificate_record(crow)
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


async def _corrupt(
    conn: AsyncConnection, order_id: int, fence: int | None, error: str
) -> CorruptOrder:
    basic = (
        await conn.execute(
            select(orders.c.fence, orders.c.peer_id, orders.c.state).where(orders.c.id == order_id)
        )
    ).first()
    if basic is None:
        raise OrderNotFoundError(order_id)
    return CorruptOrder(
        order_id,
        int(basic.fence if fence is None else fence),
        basic.peer_id,
        basic.state,
        error,
    )


def account_record(row: Row[Any]) -> AccountRecord:
    return AccountRecord(
        id=int(row.id),
        directory_url=row.directory_url,
        key_pem=row.key_pem.encode("ascii"),
        url=row.url,
        status=row.status,
    )


def certificate_record(row: Row[Any]) -> CertificateRecord:
    return CertificateRecord(
        id=int(row.id),
        order_id=int(row.order_id),
        peer_id=row.peer_id,
        chain_pem=row.chain_pem,
        key_pem=row.key_pem.encode("ascii"),
        serial=row.serial,
        cert_id=row.cert_id,
        not_before=row.not_before,
        not_after=row.not_after,
        issued_at=row.issued_at,
        acme_order_url=row.acme_order_url,
        replaces_cert_id=row.replaces_cert_id,
        revoked_at=row.revoked_at,
        revocation_reason=row.revocation_reason,
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
