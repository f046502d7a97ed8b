"""The store: the only code that reads or writes the database.

What it guarantees (design.md rules 4-6 and 10):

* **Claims** are one ``UPDATE ... WHERE id IN (due rows) RETURNING`` that sets the lease and
  bumps ``fence``. PostgreSQL adds ``FOR UPDATE SKIP LOCKED`` to the inner select so concurrent
  claimers pass each other; SQLite runs the statement under ``BEGIN IMMEDIATE`` (SQLAlchemy
  would silently drop ``SKIP LOCKED`` there, so we never rely on it).
* **Commits** are ``UPDATE ... WHERE id = ? AND fence = ?``: a worker whose lease was taken
  over updates zero rows and its result is dropped. The journal entry, account, in-flight key
  and certificate changes ride in the same transaction. ``journal(order_id, fence)`` is
  unique, so one claim can never be committed twice.
* **No transaction spans network I/O**: every method opens and closes its own transaction;
  callers hold only immutable snapshots in between.
* One corrupt row is reported as :class:`CorruptOrder` and never stops a claim of the others.
* **Changes are told**: every journaled commit is a :class:`~autotls.persistence.changes.Change`
  that other processes learn of at once through :meth:`Store.on_change` (PostgreSQL:
  ``NOTIFY`` inside the commit; SQLite: ``PRAGMA data_version``); see
  :mod:`autotls.persistence.changes`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Self, cast

from sqlalchemy import Row, Table, case, event, func, insert, or_, select, type_coerce, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from autotls._files import make_private_dirs
from autotls.persistence import schema
from autotls.persistence.changes import CHANNEL, ChangeFeed, Listener, notify_payload
from autotls.persistence.errors import (
    ActiveOrderExistsError,
    CorruptRowError,
    OrderBusyError,
    OrderNotFoundError,
)
from autotls.persistence.models import INACTIVE_STATES, Account, Certificate, JournalEntry, Order
from autotls.persistence.records import (
    KEEP,
    AccountRecord,
    CertificateRecord,
    CommitPlan,
    JournalRecord,
    OrderSnapshot,
)
from autotls.persistence.types import CorruptJSON, UTCDateTime
from autotls.persistence.urls import async_url, parse_database_url, redact

log = logging.getLogger(__name__)

orders = cast(Table, Order.__table__)
accounts = cast(Table, Account.__table__)
certificates = cast(Table, Certificate.__table__)
journal = cast(Table, JournalEntry.__table__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
_READ_ONLY = "autotls_read_only"


@dataclass(frozen=True)
class CorruptOrder:
    """A claimed row that could not be decoded. The worker fails it (keeping its bytes)."""

    id: int
    fence: int
    peer_id: str | None
    state: str | None
    error: str


ClaimedOrder = OrderSnapshot | CorruptOrder


@dataclass(frozen=True)
class LeaseHeld:
    """A running lease on an active order."""

    order_id: int
    owner: str
    until: datetime
    fence: int
    peer_id: str | None = None  # for the log lines that name the order
    state: str | None = None


def _is_active(state: str) -> bool:
    return state not in INACTIVE_STATES


class Store:
    def __init__(self, engine: AsyncEngine, url: URL) -> None:
        self.engine = engine
        self.url = url
        self.dialect = url.get_backend_name()
        self._changes: ChangeFeed | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str | URL, *, upgrade: bool = True) -> Self:
        """Open (and create, for SQLite) the database, then bring its schema to our head.

        Refuses a schema newer than this code (``SchemaTooNewError``); with ``upgrade=False``
        refuses an older one too (``SchemaOutdatedError``)."""
        parsed = parse_database_url(url) if isinstance(url, str) else url
        if parsed.get_backend_name() == "sqlite":
            _create_private_sqlite_file(Path(str(parsed.database)))
        await asyncio.to_thread(schema.ensure_current, parsed, upgrade_allowed=upgrade)
        # Pre-ping guards against a restarted database server; a SQLite file has none, and the
        # extra round trip costs 15-20 % of a step there (bench/store.py).
        sqlite = parsed.get_backend_name() == "sqlite"
        # hide_parameters: statement parameters hold account and certificate keys, and
        # SQLAlchemy puts them into exception messages and its INFO log otherwise.
        engine = create_async_engine(
            async_url(parsed), pool_pre_ping=not sqlite, hide_parameters=True
        )
        if sqlite:
            _configure_sqlite(engine)
        return cls(engine, parsed)

    async def close(self) -> None:
        changes, self._changes = self._changes, None
        if changes is not None:
            await changes.close()
        await self.engine.dispose()

    def on_change(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` (on this event loop) with the changes committed through other
        connections -- other processes, or another :class:`Store` -- as they happen; returns
        the function that unsubscribes it. The first call starts the feed; :meth:`close`
        ends it. Must be called from a running event loop."""
        if self._changes is None:
            self._changes = ChangeFeed(self.url)
        return self._changes.subscribe(listener)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def describe(self) -> str:
        return redact(self.url)

    # -- orders ---------------------------------------------------------------------------

    async def create_order(
        self,
        peer_id: str,
        identifier: str,
        *,
        initial_state: str,
        now: datetime,
        data: Mapping[str, Any] | None = None,
        actor: str = "operator",
    ) -> OrderSnapshot:
        """Insert a new order (and its first journal entry). One active order per peer."""
        try:
            async with self.engine.begin() as conn:
                existing = await self._active_order_id(conn, peer_id)
                if existing is not None:
                    raise ActiveOrderExistsError(peer_id, existing)
                result = await conn.execute(
                    insert(orders)
                    .values(
                        peer_id=peer_id,
                        identifier=identifier,
                        state=initial_state,
                        data=dict(data or {}),
                        fence=0,
                        seq=1,
                        next_run_at=now,
                        attempts=0,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(orders.c.id)
                )
                order_id = int(result.scalar_one())
                await self._journal(
                    conn,
                    peer_id,
                    order_id=order_id,
                    seq=1,
                    kind="operator",
                    from_state=None,
                    to_state=initial_state,
                    trigger="create",
                    at=now,
                    worker=actor,
                    fence=0,
                    detail={"identifier": identifier},
                )
        except IntegrityError as exc:
            if "uq_orders_active_peer" in str(exc.orig) or "orders.peer_id" in str(exc.orig):
                raise ActiveOrderExistsError(peer_id) from None
            raise
        return await self.get_order(order_id)

    async def claim_due(
        self,
        owner: str,
        *,
        now: datetime,
        lease_seconds: float,
        limit: int,
        peers: Collection[str] | None = None,
    ) -> list[ClaimedOrder]:
        """Lease up to ``limit`` due orders to ``owner`` in one statement; bump their fences.

        ``peers`` restricts the claim to orders of those peer identities (a node's own worker
        on a shared database holds only its own key)."""
        due = (
            select(orders.c.id)
            .where(
                orders.c.state.not_in(INACTIVE_STATES),
                orders.c.next_run_at <= now,
                # A lease is over at its end: next_due_at reports that very moment.
                or_(orders.c.lease_until.is_(None), orders.c.lease_until <= now),
            )
            .order_by(orders.c.next_run_at, orders.c.id)
            .limit(limit)
        )
        if peers is not None:
            due = due.where(orders.c.peer_id.in_(list(peers)))
        if self.dialect == "postgresql":
            due = due.with_for_update(skip_locked=True)
        claim = (
            update(orders)
            .where(orders.c.id.in_(due.scalar_subquery()))
            .values(
                lease_owner=owner,
                lease_until=now + timedelta(seconds=lease_seconds),
                fence=orders.c.fence + 1,
            )
            .returning(orders.c.id, orders.c.fence)
        )
        async with self.engine.begin() as conn:
            claimed = [(int(r.id), int(r.fence)) for r in (await conn.execute(claim)).all()]
            out: list[ClaimedOrder] = []
            for order_id, fence in sorted(claimed):
                out.append(await self._load_claimed(conn, order_id, fence))
        return out

    async def commit(
        self, snapshot: OrderSnapshot, plan: CommitPlan, *, now: datetime, worker: str
    ) -> bool:
        """Apply ``plan`` if ``snapshot.fence`` still holds the order (False: lease lost)."""
        async with self.engine.begin() as conn:
            return await self._apply(conn, snapshot, plan, now=now, worker=worker, bump=False)

    async def renew_lease(self, order_id: int, fence: int, owner: str, until: datetime) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(orders)
                .where(
                    orders.c.id == order_id, orders.c.fence == fence, orders.c.lease_owner == owner
                )
                .values(lease_until=until)
            )
            return result.rowcount == 1

    async def release(self, order_id: int, fence: int) -> bool:
        """Give a claimed order back untouched (graceful shutdown mid-step)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(orders)
                .where(orders.c.id == order_id, orders.c.fence == fence)
                .values(lease_owner=None, lease_until=None)
            )
            return result.rowcount == 1

    async def fail_corrupt(
        self, order: CorruptOrder, *, failed_state: str, now: datetime, worker: str
    ) -> bool:
        """Set a corrupt row aside as failed. Its data column is left byte for byte as found."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(orders)
                .where(orders.c.id == order.id, orders.c.fence == order.fence)
                .values(
                    state=failed_state,
                    seq=orders.c.seq + 1,
                    lease_owner=None,
                    lease_until=None,
                    last_error_class="permanent",
                    last_error_message=f"corrupt order row: {order.error}",
                    updated_at=now,
                )
                .returning(orders.c.seq)
            )
            seq = result.scalar_one_or_none()
            if seq is None:
                return False
            await self._journal(
                conn,
                order.peer_id or "",
                order_id=order.id,
                seq=seq,
                kind="error",
                from_state=order.state,
                to_state=failed_state,
                trigger="corrupt",
                at=now,
                worker=worker,
                fence=order.fence,
                detail={"error": order.error},
            )
            return True

    async def operator_commit(
        self,
        order_id: int,
        *,
        allowed_states: Collection[str],
        build: Callable[[OrderSnapshot], CommitPlan],
        now: datetime,
        actor: str,
    ) -> OrderSnapshot:
        """An operator action (retry, force renewal...) applied like a worker commit.

        It takes the order only when no worker holds a live lease, and bumps the fence so a
        worker that claimed it earlier cannot commit over the operator's decision."""
        async with self.engine.begin() as conn:
            current = await self._load(conn, order_id)
            if current.state not in allowed_states:
                raise OrderBusyError(
                    f"order {order_id} is {current.state}; this action needs one of "
                    + ", ".join(sorted(allowed_states))
                )
            if current.lease_until is not None and current.lease_until > now:
                raise OrderBusyError(
                    f"order {order_id} is being worked on by {current.lease_owner} until "
                    f"{current.lease_until.isoformat()}; try again after that"
                )
            plan = build(current)
            if not await self._apply(conn, current, plan, now=now, worker=actor, bump=True):
                raise OrderBusyError(f"order {order_id} changed underneath; try again")
        return await self.get_order(order_id)

    async def live_leases(
        self, *, now: datetime, peers: Collection[str] | None = None
    ) -> list[LeaseHeld]:
        """Active orders (of ``peers``) whose lease is still running at ``now``."""
        query = select(
            orders.c.id,
            orders.c.lease_owner,
            orders.c.lease_until,
            orders.c.fence,
            orders.c.peer_id,
            orders.c.state,
        ).where(
            orders.c.state.not_in(INACTIVE_STATES),
            orders.c.lease_until > now,
            orders.c.lease_owner.is_not(None),
        )
        if peers is not None:
            query = query.where(orders.c.peer_id.in_(list(peers)))
        async with self._read() as conn:
            rows = (await conn.execute(query.order_by(orders.c.id))).all()
        return [
            LeaseHeld(
                int(r.id), str(r.lease_owner), r.lease_until, int(r.fence), r.peer_id, r.state
            )
            for r in rows
        ]

    async def end_lease(self, lease: LeaseHeld, *, now: datetime) -> bool:
        """End a lease whose owner is known to be dead: it expires ``now`` (the owner's name
        stays, and the next claim bumps the fence, so a late commit of the dead owner is still
        refused). False when the lease changed meanwhile (released, committed, taken)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(orders)
                .where(
                    orders.c.id == lease.order_id,
                    orders.c.lease_owner == lease.owner,
                    orders.c.fence == lease.fence,
                    orders.c.lease_until > now,
                )
                .values(lease_until=now)
            )
            return result.rowcount == 1

    async def make_due(
        self, *, now: datetime, last_error_class: str, peers: Collection[str] | None = None
    ) -> int:
        """Make active orders waiting after an error of ``last_error_class`` due ``now`` (a
        new process may hold the fix for what they wait on). Returns how many."""
        statement = (
            update(orders)
            .where(
                orders.c.state.not_in(INACTIVE_STATES),
                orders.c.last_error_class == last_error_class,
                orders.c.next_run_at > now,
            )
            .values(next_run_at=now)
        )
        if peers is not None:
            statement = statement.where(orders.c.peer_id.in_(list(peers)))
        async with self.engine.begin() as conn:
            return int((await conn.execute(statement)).rowcount)

    # -- reads ----------------------------------------------------------------------------

    async def get_order(self, order_id: int) -> OrderSnapshot:
        async with self._read() as conn:
            return await self._load(conn, order_id)

    async def active_order(self, peer_id: str) -> OrderSnapshot | None:
        async with self._read() as conn:
            order_id = await self._active_order_id(conn, peer_id)
            return None if order_id is None else await self._load(conn, order_id)

    async def latest_order(self, peer_id: str) -> OrderSnapshot | None:
        """The peer's most recent order, active or not."""
        async with self._read() as conn:
            order_id = (
                await conn.execute(select(func.max(orders.c.id)).where(orders.c.peer_id == peer_id))
            ).scalar_one_or_none()
            return None if order_id is None else await self._load(conn, int(order_id))

    async def list_orders(self) -> list[OrderSnapshot | CorruptOrder]:
        async with self._read() as conn:
            rows = (
                await conn.execute(select(orders.c.id, orders.c.fence).order_by(orders.c.id))
            ).all()
            return [await self._load_claimed(conn, int(r.id), int(r.fence)) for r in rows]

    async def next_due_at(self, *, peers: Collection[str] | None = None) -> datetime | None:
        """The earliest moment any active order (of ``peers``) can be claimed: its
        ``next_run_at``, or the end of a live lease on it, whichever is later."""
        claimable_at = case(
            (orders.c.lease_until > orders.c.next_run_at, orders.c.lease_until),
            else_=orders.c.next_run_at,
        )
        query = select(type_coerce(func.min(claimable_at), UTCDateTime())).where(
            orders.c.state.not_in(INACTIVE_STATES)
        )
        if peers is not None:
            query = query.where(orders.c.peer_id.in_(list(peers)))
        async with self._read() as conn:
            result = await conn.execute(query)
            value: datetime | None = result.scalar_one_or_none()
        return value

    async def journal(self, order_id: int) -> list[JournalRecord]:
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(journal).where(journal.c.order_id == order_id).order_by(journal.c.seq)
                )
            ).all()
        return [_journal_record(r) for r in rows]

    async def certificates(
        self, *, order_id: int | None = None, peer_id: str | None = None
    ) -> list[CertificateRecord]:
        query = select(certificates).order_by(certificates.c.id)
        if order_id is not None:
            query = query.where(certificates.c.order_id == order_id)
        if peer_id is not None:
            query = query.where(certificates.c.peer_id == peer_id)
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [_certificate_record(r) for r in rows]

    async def account(self, directory_url: str) -> AccountRecord | None:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    select(accounts).where(accounts.c.directory_url == directory_url)
                )
            ).first()
        return None if row is None else _account_record(row)

    async def accounts(self) -> list[AccountRecord]:
        async with self._read() as conn:
            rows = (await conn.execute(select(accounts).order_by(accounts.c.id))).all()
        return [_account_record(r) for r in rows]

    # -- internals ------------------------------------------------------------------------

    def _read(self) -> _ReadConnection:
        return _ReadConnection(self.engine)

    async def _active_order_id(self, conn: AsyncConnection, peer_id: str) -> int | None:
        result = await conn.execute(
            select(orders.c.id).where(
                orders.c.peer_id == peer_id, orders.c.state.not_in(INACTIVE_STATES)
            )
        )
        value = result.scalar_one_or_none()
        return None if value is None else int(value)

    async def _apply(
        self,
        conn: AsyncConnection,
        snapshot: OrderSnapshot,
        plan: CommitPlan,
        *,
        now: datetime,
        worker: str,
        bump: bool,
    ) -> bool:
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
            values["account_id"] = await self._adopt_account(conn, plan, now)
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
            if _is_active(plan.to_state) and not _is_active(snapshot.state):
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
                .values(
                    url=plan.account_update.url, status=plan.account_update.status, updated_at=now
                )
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
        if plan.journal is not None:
            await self._journal(
                conn,
                snapshot.peer_id,
                order_id=snapshot.id,
                seq=seq,
                kind=plan.journal.kind,
                from_state=snapshot.state,
                to_state=plan.to_state,
                trigger=plan.journal.trigger,
                at=now,
                worker=worker,
                fence=fence,
                detail=dict(plan.journal.detail),
            )
        return True

    async def _journal(self, conn: AsyncConnection, peer_id: str, **entry: Any) -> None:
        """Append a journal entry and tell other processes of it: on PostgreSQL a ``NOTIFY``
        in the same statement (a data-modifying CTE: no extra round trip), delivered only if
        the transaction commits; SQLite readers see ``data_version`` move."""
        statement = insert(journal).values(**entry)
        if self.dialect != "postgresql":
            await conn.execute(statement)
            return
        payload = notify_payload(entry["order_id"], peer_id, entry["worker"])
        written = statement.returning(journal.c.id).cte("written")
        await conn.execute(select(func.pg_notify(CHANNEL, payload)).select_from(written))

    async def _adopt_account(self, conn: AsyncConnection, plan: CommitPlan, now: datetime) -> int:
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
                await conn.execute(
                    select(accounts.c.id).where(accounts.c.directory_url == directory)
                )
            ).scalar_one()
            return int(winner)

    async def _load(self, conn: AsyncConnection, order_id: int) -> OrderSnapshot:
        claimed = await self._load_claimed(conn, order_id, None)
        if isinstance(claimed, CorruptOrder):
            raise CorruptRowError(f"order {order_id}: {claimed.error}")
        return claimed

    async def _load_claimed(
        self, conn: AsyncConnection, order_id: int, fence: int | None
    ) -> ClaimedOrder:
        try:
            row = (await conn.execute(select(orders).where(orders.c.id == order_id))).first()
        except Exception as exc:  # undecodable column values (e.g. a mangled timestamp)
            return await self._corrupt(conn, order_id, fence, f"unreadable row: {exc}")
        if row is None:
            raise OrderNotFoundError(order_id)
        problems = []
        if isinstance(row.data, CorruptJSON):
            problems.append(f"data column {row.data.error}")
        if isinstance(row.last_problem, CorruptJSON):
            problems.append(f"last_problem column {row.last_problem.error}")
        if problems:
            return CorruptOrder(
                order_id, int(row.fence), row.peer_id, row.state, "; ".join(problems)
            )
        account = None
        if row.account_id is not None:
            arow = (
                await conn.execute(select(accounts).where(accounts.c.id == row.account_id))
            ).first()
            account = None if arow is None else _account_record(arow)
        cert = None
        if row.current_certificate_id is not None:
            crow = (
                await conn.execute(
                    select(certificates).where(certificates.c.id == row.current_certificate_id)
                )
            ).first()
            cert = None if crow is None else _certificate_record(crow)
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
        )

    async def _corrupt(
        self, conn: AsyncConnection, order_id: int, fence: int | None, error: str
    ) -> CorruptOrder:
        basic = (
            await conn.execute(
                select(orders.c.fence, orders.c.peer_id, orders.c.state).where(
                    orders.c.id == order_id
                )
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


class _ReadConnection:
    """A connection for reads: on SQLite a deferred BEGIN, so readers never take the write lock."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncConnection:
        conn = await self._engine.connect()
        self._conn = await conn.execution_options(**{_READ_ONLY: True})
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        assert self._conn is not None
        await self._conn.rollback()
        await self._conn.close()


def _create_private_sqlite_file(path: Path) -> None:
    """The SQLite file holds account and certificate keys: create it 0600 before SQLite does
    (and any directory it needs, 0700)."""
    make_private_dirs(path.parent)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN IMMEDIATE is ours to emit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the lock up front: a deferred transaction that reads then writes can
        # hit SQLITE_BUSY without the busy handler ever being consulted.
        if conn.get_execution_options().get(_READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _account_record(row: Row[Any]) -> AccountRecord:
    return AccountRecord(
        id=int(row.id),
        directory_url=row.directory_url,
        key_pem=row.key_pem.encode("ascii"),
        url=row.url,
        status=row.status,
    )


def _certificate_record(row: Row[Any]) -> CertificateRecord:
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
    )


def _journal_record(row: Row[Any]) -> JournalRecord:
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
