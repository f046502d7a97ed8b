"""The single write: a step's (or an operator's) result applied to the database.

Everything an order's move changes happens here, in the caller's one transaction: the order
row, guarded by ``WHERE id = ? AND fence = ?`` (a worker that lost its lease changes nothing);
the account it adopted or updated; the certificate it installed (and the row's pointer to it);
the revocation an operator recorded; and the journal entry. ``journal(order_id, fence)`` is
unique, so one claim can never be committed twice.

A step's usual commit is one round trip: on PostgreSQL one statement (the row's ``UPDATE``,
the journal's ``INSERT`` and the ``NOTIFY`` that tells other processes,
:mod:`~autotls.persistence.changes`, as data-modifying CTEs: the notification is delivered
only if the transaction commits); on SQLite the two statements run in the store's thread in
one hand-off. The statements are built once per shape and reused (SQLAlchemy then finds
their compiled form in its cache).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Executable,
    bindparam,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from autotls.persistence.changes import CHANNEL, notify_payload
from autotls.persistence.errors import ActiveOrderExistsError
from autotls.persistence.models import INACTIVE_STATES, accounts, certificates, journal, orders
from autotls.persistence.records import KEEP, CommitPlan, JournalNote, OrderSnapshot

# The columns every commit sets from the plan, as bind parameters named after them.
_PLAN_COLUMNS = (
    "state",
    "data",
    "next_run_at",
    "attempts",
    "last_error_class",
    "last_error_message",
    "last_problem",
    "updated_at",
)
_JOURNAL_COLUMNS = (
    "order_id",
    "seq",
    "kind",
    "from_state",
    "to_state",
    "trigger",
    "at",
    "worker",
    "fence",
    "detail",
)


def _bind(table: Any, name: str, key: str | None = None) -> Any:
    return bindparam(key or f"p_{name}", type_=table.c[name].type)


_JOURNAL_INSERT = insert(journal).values({n: _bind(journal, n, f"j_{n}") for n in _JOURNAL_COLUMNS})
# PostgreSQL: the entry and its notification in one statement (a data-modifying CTE).
_JOURNAL_NOTIFY = select(func.pg_notify(CHANNEL, bindparam("payload"))).select_from(
    _JOURNAL_INSERT.returning(journal.c.id).cte("written")
)
_statements: dict[tuple[Any, ...], Executable] = {}


def _row_update(*, journaled: bool, bump: bool, key: bool, account: bool) -> Any:
    """The fenced ``UPDATE`` of the order row for a plan of this shape (built once each)."""
    values: dict[str, Any] = {name: _bind(orders, name) for name in _PLAN_COLUMNS}
    now = values["updated_at"]
    values.update(lease_owner=None, lease_until=None)
    if journaled:
        values["seq"] = orders.c.seq + 1
    if bump:
        values["fence"] = orders.c.fence + 1
    if key:
        values["cert_key_pem"] = _bind(orders, "cert_key_pem")
    if account:
        values["account_id"] = _bind(orders, "account_id")
    return (
        update(orders)
        .where(
            orders.c.id == bindparam("p_id"),
            orders.c.fence == bindparam("p_fence"),
            # A worker's commit ends its lease, so the same claim cannot commit twice. An
            # operator needs only that no lease is live: a dead worker's expired lease keeps
            # its owner's name, and its fence (bumped here) refuses it.
            or_(orders.c.lease_until.is_(None), orders.c.lease_until <= now)
            if bump
            else orders.c.lease_owner == bindparam("p_owner"),
        )
        .values(**values)
        .returning(orders.c.seq, orders.c.fence)
    )


def _statement(dialect: str, *, journaled: bool, bump: bool, key: bool, account: bool) -> Any:
    shape = (dialect, journaled, bump, key, account)
    cached = _statements.get(shape)
    if cached is not None:
        return cached
    moved = _row_update(journaled=journaled, bump=bump, key=key, account=account)
    if dialect == "postgresql" and journaled:
        # One statement: the row, its journal entry (numbered from the row's new seq and
        # fence) and the notification; no row back when the fence refused the update.
        moved = moved.cte("moved")
        entry = select(
            *(
                moved.c[name].label(name)
                if name in ("seq", "fence")
                else _bind(journal, name, f"j_{name}").label(name)
                for name in _JOURNAL_COLUMNS
            )
        ).select_from(moved)
        written = (
            insert(journal).from_select(list(_JOURNAL_COLUMNS), entry).returning(journal.c.id)
        ).cte("written")
        statement: Any = select(
            moved.c.seq,
            moved.c.fence,
            func.pg_notify(CHANNEL, bindparam("payload")).label("notified"),
        ).select_from(moved.join(written, true()))
    else:
        statement = moved
    _statements[shape] = statement
    return statement


def apply_plan(
    conn: Connection,
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
    dialect = conn.dialect.name
    params: dict[str, Any] = {
        "p_id": snapshot.id,
        "p_fence": snapshot.fence,
        "p_owner": snapshot.lease_owner,
        "p_state": plan.to_state,
        "p_data": dict(plan.data),
        "p_next_run_at": plan.next_run_at,
        "p_attempts": plan.attempts,
        "p_last_error_class": plan.last_error_class,
        "p_last_error_message": plan.last_error_message,
        "p_last_problem": dict(plan.last_problem) if plan.last_problem is not None else None,
        "p_updated_at": now,
    }
    key = plan.cert_key_pem is not KEEP
    if key:
        pem = plan.cert_key_pem
        params["p_cert_key_pem"] = None if pem is None else bytes(pem).decode("ascii")  # type: ignore[arg-type]
    account_id = snapshot.account.id if snapshot.account else None
    if plan.new_account is not None:
        account_id = params["p_account_id"] = _adopt_account(conn, plan, now)
    journaled = plan.journal is not None
    one_statement = journaled and dialect == "postgresql"
    if one_statement:
        assert plan.journal is not None
        params.update(
            _journal_params(
                snapshot.id,
                plan.journal,
                from_state=snapshot.state,
                to_state=plan.to_state,
                at=now,
                worker=worker,
                prefix="j_",
            )
        )
        params["payload"] = notify_payload(snapshot.id, snapshot.peer_id, worker)
    statement = _statement(
        dialect, journaled=journaled, bump=bump, key=key, account=plan.new_account is not None
    )
    try:
        row = conn.execute(statement, params).first()
    except IntegrityError as exc:
        if plan.to_state not in INACTIVE_STATES and snapshot.state in INACTIVE_STATES:
            raise ActiveOrderExistsError(snapshot.peer_id) from exc
        raise
    if row is None:
        conn.rollback()
        return False
    seq, fence = int(row.seq), int(row.fence)
    if plan.account_update is not None and account_id is not None:
        conn.execute(
            update(accounts)
            .where(accounts.c.id == account_id)
            .values(url=plan.account_update.url, status=plan.account_update.status, updated_at=now)
        )
    if plan.new_certificate is not None:
        _install_certificate(conn, snapshot, plan, now)
    if plan.revocation is not None:
        conn.execute(
            update(certificates)
            .where(
                certificates.c.id == plan.revocation.certificate_id,
                certificates.c.order_id == snapshot.id,
            )
            .values(revoked_at=now, revocation_reason=plan.revocation.reason)
        )
    if plan.journal is not None and not one_statement:
        append_journal(
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


def _install_certificate(
    conn: Connection, snapshot: OrderSnapshot, plan: CommitPlan, now: datetime
) -> None:
    cert = plan.new_certificate
    assert cert is not None
    cert_row = conn.execute(
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
    conn.execute(
        update(orders)
        .where(orders.c.id == snapshot.id)
        .values(current_certificate_id=int(cert_row.scalar_one()))
    )


def _journal_params(
    order_id: int,
    note: JournalNote,
    *,
    from_state: str | None,
    to_state: str,
    at: datetime,
    worker: str | None,
    prefix: str = "",
    seq: int | None = None,
    fence: int | None = None,
) -> dict[str, Any]:
    values = {
        "order_id": order_id,
        "kind": note.kind,
        "from_state": from_state,
        "to_state": to_state,
        "trigger": note.trigger,
        "at": at,
        "worker": worker,
        "detail": dict(note.detail),
    }
    if seq is not None:
        values["seq"] = seq
    if fence is not None:
        values["fence"] = fence
    return {prefix + k: v for k, v in values.items()}


def append_journal(
    conn: Connection,
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
    processes hear of it: on PostgreSQL a ``NOTIFY`` rides in the same statement, on
    SQLite they see ``data_version`` move."""
    values = _journal_params(
        order_id,
        note,
        from_state=from_state,
        to_state=to_state,
        at=at,
        worker=worker,
        seq=seq,
        fence=fence,
        prefix="j_",
    )
    if conn.dialect.name != "postgresql":
        conn.execute(_JOURNAL_INSERT, values)
        return
    values["payload"] = notify_payload(order_id, peer_id or "", worker)
    conn.execute(_JOURNAL_NOTIFY, values)


def _adopt_account(conn: Connection, plan: CommitPlan, now: datetime) -> int:
    """Insert the directory's account unless another worker won the race; use the winner."""
    assert plan.new_account is not None
    directory = plan.new_account.directory_url
    find = select(accounts.c.id).where(accounts.c.directory_url == directory)
    existing = conn.execute(find).scalar_one_or_none()
    if existing is not None:
        return int(existing)
    try:
        with conn.begin_nested():
            result = conn.execute(
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
        return int(conn.execute(find).scalar_one())


__all__ = ["append_journal", "apply_plan"]
