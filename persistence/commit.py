"""The single write: a step's (or an operator's) result applied to the database.

Everything an order's move changes happens here, in the caller's one transaction: the order
row, guarded by ``WHERE id = ? AND fence = ?`` (a worker that lost its lease changes nothing);
the account it adopted or updated; the certificate it installed (and the row's pointer to it);
the revocation an operator recorded; and the journal entry. ``journal(order_id, fence)`` is
unique, so one claim can never be committed twice. On PostgreSQL the journal entry also
notifies the other processes (``NOTIFY``, :mod:`~autotls.persistence.changes`), in the same
statement, so it costs no round trip and is delivered only if the transaction commits.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from autotls.persistence.changes import CHANNEL, notify_payload
from autotls.persistence.errors import ActiveOrderExistsError
from autotls.persistence.models import INACTIVE_STATES, accounts, certificates, journal, orders
from autotls.persistence.records import KEEP, CommitPlan, JournalNote, OrderSnapshot


async def apply_plan(
    conn: AsyncConnection,
    snapshot: OrderSnapshot,
    plan: CommitPlan,
    *,
    now: datetime,
    worker: str,
    bump: bool,
) -> bool:
    """Apply ``plan`` to the order ``snapshot`` was taken of, inside the caller's transaction:
    the row (``WHERE id AND fence``), then what rides along. False (rolled back) when the
    fence no longer holds: the caller lost the order, and nothing was written.

    ``bump``: an operator's commit, which needs no lease of its own but takes the order from
    whoever claimed it before (their fence no longer matches)."""
    values: dict[str, Any] = {
        "state": plan.to_state,
        "data": dict(plan.data),
        "next_run_at": plan.next_run_at,
        "attempts": plan.attempts,
        "last_error_class": plan.last_error_class,
        "last_error_message": plan.last_error_message,
        "last_problem": dict(plan.last_problem) if plan.last_problem is not None else None,
        "lease_owner": None,
        "lease_until": None,
        "updated_at": now,
    }
    if plan.journal is not None:
        values["seq"] = orders.c.seq + 1
    if bump:
        values["fence"] = orders.c.fence + 1
    if plan.cert_key_pem is not KEEP:
        values["cert_key_pem"] = (
            None if plan.cert_key_pem is None else bytes(plan.cert_key_pem).decode("ascii")
        )
    if plan.new_account is not None:
        values["account_id"] = await _adopt_account(conn, plan, now)
    try:
        result = await conn.execute(
            update(orders)
            .where(
                orders.c.id == snapshot.id,
                orders.c.fence == snapshot.fence,
                # A worker's commit ends its lease, so the same claim cannot commit twice.
                # An operator needs only that no lease is live: a dead worker's expired
                # lease keeps its owner's name, and its fence (bumped here) refuses it.
                or_(orders.c.lease_until.is_(None), orders.c.lease_until <= now)
                if bump
                else orders.c.lease_owner == snapshot.lease_owner,
            )
            .values(**values)
            .returning(orders.c.seq, orders.c.fence)
        )
    except IntegrityError as exc:
        if plan.to_state not in INACTIVE_STATES and snapshot.state in INACTIVE_STATES:
            raise ActiveOrderExistsError(snapshot.peer_id) from exc
        raise
    row = result.first()
    if row is None:
        await conn.rollback()
        return False
    seq, fence = int(row.seq), int(row.fence)
    account_id = values.get("account_id", snapshot.account.id if snapshot.account else None)
    if plan.account_update is not None and account_id is not None:
        await conn.execute(
            update(accounts)
            .where(accounts.c.id == account_id)
            .values(url=plan.account_update.url, status=plan.account_update.status, updated_at=now)
        )
    if plan.new_certificate is not None:
        cert = plan.new_certificate
        cert_row = await conn.execute(
            insert(certificates)
            .values(
                order_id=snapshot.id,
                peer_id=snapshot.peer_id,
                chain_pem=cert.chain_pem,
                key_pem=bytes(cert.key_pem).decode("ascii"),
                serial=cert.serial,
                cert_id=cert.cert_id,
                acme_order_url=cert.acme_order_url,
                not_before=cert.not_before,
                not_after=cert.not_after,
                issued_at=now,
                replaces_cert_id=cert.replaces_cert_id,
            )
            .returning(certificates.c.id)
        )
        await conn.execute(
            update(orders)
            .where(orders.c.id == snapshot.id)
            .values(current_certificate_id=int(cert_row.scalar_one()))
        )
    if plan.revocation is not None:
        await conn.execute(
            update(certificates)
            .where(
                certificates.c.id == plan.revocation.certificate_id,
                certificates.c.order_id == snapshot.id,
            )
            .values(revoked_at=now, revocation_reason=plan.revocation.reason)
        )
    if plan.journal is not None:
        await append_journal(
            conn,
            snapshot.id,
            plan.journal,
            seq=seq,
            fence=fence,
            from_state=snapshot.state,
            to_state=plan.to_state,
            at=now,
            worker=worker,
            peer_id=snapshot.peer_id,
        )
    return True


async def append_journal(
    conn: AsyncConnection,
    order_id: int,
    note: JournalNote,
    *,
    seq: int,
    fence: int,
    from_state: str | None,
    to_state: str,
    at: datetime,
    worker: str | None,
    peer_id: str | None,
) -> None:
    """One journal entry; ``(order_id, fence)`` is unique, so one claim journals once. Other
    processes hear of it: on PostgreSQL a ``NOTIFY`` rides in the same statement (a
    data-modifying CTE), on SQLite they see ``data_version`` move."""
    entry = insert(journal).values(
        order_id=order_id,
        seq=seq,
        kind=note.kind,
        from_state=from_state,
        to_state=to_state,
        trigger=note.trigger,
        at=at,
        worker=worker,
        fence=fence,
        detail=dict(note.detail),
    )
    if conn.dialect.name != "postgresql":
        await conn.execute(entry)
        return
    payload = notify_payload(order_id, peer_id or "", worker)
    written = entry.returning(journal.c.id).cte("written")
    await conn.execute(select(func.pg_notify(CHANNEL, payload)).select_from(written))


async def _adopt_account(conn: AsyncConnection, plan: CommitPlan, now: datetime) -> int:
    """Insert the directory's account unless another worker won the race; use the winner."""
    assert plan.new_account is not None
    directory = plan.new_account.directory_url
    existing = (
        await conn.execute(select(accounts.c.id).where(accounts.c.directory_url == directory))
    ).scalar_one_or_none()
    if existing is not None:
        return int(existing)
    try:
        async with conn.begin_nested():
            result = await conn.execute(
                insert(accounts)
                .values(
                    directory_url=directory,
                    key_pem=bytes(plan.new_account.key_pem).decode("ascii"),
                    url=None,
                    status="unregistered",
                    created_at=now,
                    updated_at=now,
                )
                .returning(accounts.c.id)
            )
            return int(result.scalar_one())
    except IntegrityError:
        winner = (
            await conn.execute(select(accounts.c.id).where(accounts.c.directory_url == directory))
        ).scalar_one()
        return int(winner)
