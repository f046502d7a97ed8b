"""The store: the only code that reads or writes the database.

Its rooms: this module (the store's operations: open, create, claim, commit, leases, reads),
:mod:`~autotls.persistence.commit` (the single write that applies a result),
:mod:`~autotls.persistence.rows` (decoding rows, corrupt ones included),
:mod:`~autotls.persistence.sqlite` (what SQLite needs), :mod:`~autotls.persistence.models`
(the schema).

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
  ``NOTIFY`` in the journal insert; SQLite: ``PRAGMA data_version``); see
  :mod:`autotls.persistence.changes`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Self

from sqlalchemy import case, func, insert, or_, select, type_coerce, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from autotls.persistence import schema, sqlite
from autotls.persistence.changes import CHANNEL, ChangeFeed, Listener, notify_payload
from autotls.persistence.commit import append_journal, apply_plan
from autotls.persistence.errors import (
    ActiveOrderExistsError,
    OrderBusyError,
    OrderStateError,
    StoreError,
)
from autotls.persistence.models import INACTIVE_STATES, accounts, certificates, journal, orders
from autotls.persistence.records import (
    AccountRecord,
    CertificateRecord,
    CommitPlan,
    JournalNote,
    JournalRecord,
    OrderSnapshot,
)
from autotls.persistence.rows import (
    ClaimedOrder,
    CorruptOrder,
    account_record,
    certificate_record,
    journal_record,
    load_claimed,
    load_order,
)
from autotls.persistence.types import UTCDateTime
from autotls.persistence.urls import async_url, parse_database_url, redact

__all__ = ["ClaimedOrder", "CorruptOrder", "LeaseHeld", "Store"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseHeld:
    """A running lease on an active order."""

    order_id: int
    owner: str
    until: datetime
    fence: int
    peer_id: str | None = None  # for the log lines that name the order
    state: str | None = None


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
            sqlite.create_private_file(Path(str(parsed.database)))
        await asyncio.to_thread(schema.ensure_current, parsed, upgrade_allowed=upgrade)
        # Pre-ping guards against a restarted database server; a SQLite file has none, and the
        # extra round trip costs 15-20 % of a step there (bench/store.py).
        on_sqlite = parsed.get_backend_name() == "sqlite"
        # hide_parameters: statement parameters hold account and certificate keys, and
        # SQLAlchemy puts them into exception messages and its INFO log otherwise.
        engine = create_async_engine(
            async_url(parsed), pool_pre_ping=not on_sqlite, hide_parameters=True
        )
        if on_sqlite:
            sqlite.configure(engine)
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

    async def changes_told(self) -> None:
        """Until the change feed :meth:`on_change` started tells every commit from now on
        (tests and benchmarks, which must not commit before it listens)."""
        if self._changes is None:
            raise RuntimeError("nothing listens for changes: call on_change first")
        await self._changes.listening.wait()

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
        trigger: str,
        data: Mapping[str, Any] | None = None,
        actor: str = "operator",
    ) -> OrderSnapshot:
        """Insert a new order and its first journal entry (the machine's creating move,
        ``trigger``). One active order per peer."""
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
                await append_journal(
                    conn,
                    order_id,
                    JournalNote("operator", trigger, {"identifier": identifier}),
                    seq=1,
                    fence=0,
                    from_state=None,
                    to_state=initial_state,
                    at=now,
                    worker=actor,
                    peer_id=peer_id,
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
                out.append(await load_claimed(conn, order_id, fence))
        return out

    async def commit(
        self, snapshot: OrderSnapshot, plan: CommitPlan, *, now: datetime, worker: str
    ) -> bool:
        """Apply ``plan`` if ``snapshot.fence`` still holds the order (False: lease lost)."""
        async with self.engine.begin() as conn:
            return await apply_plan(conn, snapshot, plan, now=now, worker=worker, bump=False)

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
        self, order: CorruptOrder, *, failed_state: str, trigger: str, now: datetime, worker: str
    ) -> bool:
        """Set a corrupt row aside as failed (the machine's move ``trigger``). Its data column
        is left byte for byte as found."""
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
            await append_journal(
                conn,
                order.id,
                JournalNote("error", trigger, {"error": order.error}),
                seq=int(seq),
                fence=order.fence,
                from_state=order.state,
                to_state=failed_state,
                at=now,
                worker=worker,
                peer_id=order.peer_id,
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
            current = await load_order(conn, order_id)
            if current.state not in allowed_states:
                raise OrderStateError(order_id, current.state, allowed_states)
            if current.lease_until is not None and current.lease_until > now:
                raise OrderBusyError(
                    f"order {order_id} is being worked on by {current.lease_owner} until "
                    f"{current.lease_until.isoformat()}; try again after that"
                )
            plan = build(current)
            if not await apply_plan(conn, current, plan, now=now, worker=actor, bump=True):
                raise OrderBusyError(f"order {order_id} changed underneath; try again")
        return await self.get_order(order_id)

    async def record_revocation(
        self, certificate_id: int, *, now: datetime, reason: str | None
    ) -> CertificateRecord:
        """Record that an operator revoked the certificate ``certificate_id`` (unless it is
        recorded already: the first revocation's moment and reason stay)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(certificates)
                .where(certificates.c.id == certificate_id, certificates.c.revoked_at.is_(None))
                .values(revoked_at=now, revocation_reason=reason)
            )
            row = (
                await conn.execute(select(certificates).where(certificates.c.id == certificate_id))
            ).first()
            if row is not None and self.dialect == "postgresql":
                # No journal entry to ride on: a running node stops advertising it at once.
                payload = notify_payload(int(row.order_id), row.peer_id, None)
                await conn.execute(select(func.pg_notify(CHANNEL, payload)))
        if row is None:
            raise StoreError(f"no certificate with id {certificate_id}")
        return certificate_record(row)

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

    async def make_due_off_directory(
        self, *, now: datetime, directory_url: str, peers: Collection[str] | None = None
    ) -> int:
        """Make active orders whose account belongs to another ACME directory than
        ``directory_url`` due ``now``: the operator switched CA, and a worker moves them to
        that CA at once (``ca_changed``) rather than at their next renewal. Returns how many."""
        elsewhere = select(accounts.c.id).where(accounts.c.directory_url != directory_url)
        statement = (
            update(orders)
            .where(
                orders.c.state.not_in(INACTIVE_STATES),
                orders.c.account_id.in_(elsewhere),
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
            return await load_order(conn, order_id)

    async def active_order(self, peer_id: str) -> OrderSnapshot | None:
        async with self._read() as conn:
            order_id = await self._active_order_id(conn, peer_id)
            return None if order_id is None else await load_order(conn, order_id)

    async def latest_order(self, peer_id: str) -> OrderSnapshot | None:
        """The peer's most recent order, active or not."""
        async with self._read() as conn:
            order_id = (
                await conn.execute(select(func.max(orders.c.id)).where(orders.c.peer_id == peer_id))
            ).scalar_one_or_none()
            return None if order_id is None else await load_order(conn, int(order_id))

    async def list_orders(self) -> list[OrderSnapshot | CorruptOrder]:
        async with self._read() as conn:
            rows = (
                await conn.execute(select(orders.c.id, orders.c.fence).order_by(orders.c.id))
            ).all()
            return [await load_claimed(conn, int(r.id), int(r.fence)) for r in rows]

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

    async def count_by_state(self, *, peers: Collection[str] | None = None) -> dict[str, int]:
        """How many orders (of ``peers``) are in each state: one ``GROUP BY`` (metrics)."""
        query = select(orders.c.state, func.count()).group_by(orders.c.state)
        if peers is not None:
            query = query.where(orders.c.peer_id.in_(list(peers)))
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return {str(state): int(count) for state, count in rows}

    async def journal(self, order_id: int) -> list[JournalRecord]:
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(journal).where(journal.c.order_id == order_id).order_by(journal.c.seq)
                )
            ).all()
        return [journal_record(r) for r in rows]

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
        return [certificate_record(r) for r in rows]

    async def account(self, directory_url: str) -> AccountRecord | None:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    select(accounts).where(accounts.c.directory_url == directory_url)
                )
            ).first()
        return None if row is None else account_record(row)

    async def accounts(self) -> list[AccountRecord]:
        async with self._read() as conn:
            rows = (await conn.execute(select(accounts).order_by(accounts.c.id))).all()
        return [account_record(r) for r in rows]

    # -- internals ------------------------------------------------------------------------

    def _read(self) -> sqlite.ReadConnection:
        return sqlite.ReadConnection(self.engine)

    async def _active_order_id(self, conn: AsyncConnection, peer_id: str) -> int | None:
        result = await conn.execute(
            select(orders.c.id).where(
                orders.c.peer_id == peer_id, orders.c.state.not_in(INACTIVE_STATES)
            )
        )
        value = result.scalar_one_or_none()
        return None if value is None else int(value)
