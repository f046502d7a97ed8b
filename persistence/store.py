"""The store: the only code that reads or writes the database.

Its rooms: this module (the store's operations: open, create, claim, commit, leases, reads),
:mod:`~autotls.persistence.claim` (leasing due orders and reading them),
:mod:`~autotls.persistence.commit` (the single write that applies a result),
:mod:`~autotls.persistence.rows` (decoding rows, corrupt ones included),
:mod:`~autotls.persistence.sqlite` (what SQLite needs), :mod:`~autotls.persistence.models`
(the schema).

What it guarantees (design.md rules 4-6 and 10):

* **Claims** are one ``UPDATE ... WHERE id IN (due rows) RETURNING`` that sets the lease and
  bumps ``fence``, and returns the snapshots in the same round trip
  (:mod:`~autotls.persistence.claim`). PostgreSQL adds ``FOR UPDATE SKIP LOCKED`` to the inner
  select so concurrent claimers pass each other; SQLite runs it under ``BEGIN IMMEDIATE``.
* **Commits** are ``UPDATE ... WHERE id = ? AND fence = ?``: a worker whose lease was taken
  over updates zero rows and its result is dropped. The journal entry, account, in-flight key
  and certificate changes ride in the same transaction. ``journal(order_id, fence)`` is
  unique, so one claim can never be committed twice.
* **No transaction spans network I/O**: every method opens and closes its own transaction;
  callers hold only immutable snapshots in between.
* **One hand-off per transaction**: each operation is a plain function of a connection, run
  whole in one transaction -- on SQLite in the store's own thread on the standard driver
  (:class:`~autotls.persistence.sqlite.StoreThread`), on PostgreSQL on the async engine
  (``run_sync``) -- so a step costs two round trips: the claim and the commit.
* One corrupt row is reported as :class:`CorruptOrder` and never stops a claim of the others.
* **Changes are told**: every journaled commit is a :class:`~autotls.persistence.changes.Change`
  that other processes learn of at once through :meth:`Store.on_change` (PostgreSQL:
  ``NOTIFY`` in the journal insert; SQLite: ``PRAGMA data_version``); see
  :mod:`autotls.persistence.changes`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from sqlalchemy import (
    ColumnElement,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import IntegrityError

from autotls.persistence import claim, schema, sqlite
from autotls.persistence.changes import CHANNEL, ChangeFeed, Listener, notify_payload
from autotls.persistence.commit import append_journal, apply_plan
from autotls.persistence.errors import (
    ActiveOrderExistsError,
    OrderBusyError,
    OrderStateError,
    StoreError,
)
from autotls.persistence.models import (
    ACTIVE,
    accounts,
    certificates,
    journal,
    orders,
)
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
from autotls.persistence.urls import async_url, parse_database_url, redact

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["ClaimedOrder", "CorruptOrder", "LeaseHeld", "Store"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class LeaseHeld:
    """A running lease on an active order."""

    order_id: int
    owner: str
    until: datetime
    fence: int
    peer_id: str | None = None  # for the log lines that name the order
    state: str | None = None


def _peers(statement: Any, peers: Collection[str] | None) -> Any:
    return statement if peers is None else statement.where(orders.c.peer_id.in_(list(peers)))


class Store:
    def __init__(self, url: URL) -> None:
        self.url = url
        self.dialect = url.get_backend_name()
        self._engine: AsyncEngine | None = None
        self._thread = sqlite.StoreThread(url) if self.dialect == "sqlite" else None
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
        return cls(parsed)

    @property
    def engine(self) -> AsyncEngine:
        """An async engine on the database: the store's own on PostgreSQL; on SQLite one made
        on first use for callers that want to run their own statements (tests)."""
        if self._engine is None:
            # Pre-ping guards against a restarted database server; a SQLite file has none.
            # hide_parameters: statement parameters hold account and certificate keys, and
            # SQLAlchemy puts them into exception messages and its INFO log otherwise.
            # (imported here: a SQLite store's own work never needs the async engine)
            from sqlalchemy.ext.asyncio import create_async_engine

            on_sqlite = self.dialect == "sqlite"
            self._engine = create_async_engine(
                async_url(self.url), pool_pre_ping=not on_sqlite, hide_parameters=True
            )
            if on_sqlite:
                sqlite.configure(self._engine.sync_engine)
        return self._engine

    async def close(self) -> None:
        changes, self._changes = self._changes, None
        if changes is not None:
            await changes.close()
        if self._thread is not None:
            await self._thread.close()
        if self._engine is not None:
            await self._engine.dispose()

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

        def create(conn: Connection) -> OrderSnapshot:
            existing = _active_order_id(conn, peer_id)
            if existing is not None:
                raise ActiveOrderExistsError(peer_id, existing)
            result = conn.execute(
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
            append_journal(
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
            return load_order(conn, order_id)

        try:
            return await self._run(create)
        except IntegrityError as exc:
            if "uq_orders_active_peer" in str(exc.orig) or "orders.peer_id" in str(exc.orig):
                raise ActiveOrderExistsError(peer_id) from None
            raise

    async def claim_due(
        self,
        owner: str,
        *,
        now: datetime,
        lease_seconds: float,
        limit: int,
        peers: Collection[str] | None = None,
    ) -> list[ClaimedOrder]:
        """Lease up to ``limit`` due orders to ``owner`` in one statement; bump their fences;
        return their snapshots (in id order).

        ``peers`` restricts the claim to orders of those peer identities (a node's own worker
        on a shared database holds only its own key)."""
        return await self._run(
            claim.claim_due,
            owner,
            single=True,  # one statement on PostgreSQL
            now=now,
            lease_seconds=lease_seconds,
            limit=limit,
            peers=peers,
        )

    async def commit(
        self, snapshot: OrderSnapshot, plan: CommitPlan, *, now: datetime, worker: str
    ) -> bool:
        """Apply ``plan`` if ``snapshot.fence`` still holds the order (False: lease lost)."""
        # The usual commit (the row and its journal entry, or a wait's row alone) is one
        # statement on PostgreSQL; one that also adopts an account or installs a certificate
        # needs its transaction.
        single = (
            plan.new_account is None
            and plan.account_update is None
            and plan.new_certificate is None
            and plan.revocation is None
        )
        return await self._run(
            apply_plan, snapshot, plan, now=now, worker=worker, bump=False, single=single
        )

    async def renew_lease(self, order_id: int, fence: int, owner: str, until: datetime) -> bool:
        return (
            await self._rowcount(
                update(orders)
                .where(
                    orders.c.id == order_id, orders.c.fence == fence, orders.c.lease_owner == owner
                )
                .values(lease_until=until)
            )
            == 1
        )

    async def release(self, order_id: int, fence: int) -> bool:
        """Give a claimed order back untouched (graceful shutdown mid-step)."""
        return (
            await self._rowcount(
                update(orders)
                .where(orders.c.id == order_id, orders.c.fence == fence)
                .values(lease_owner=None, lease_until=None)
            )
            == 1
        )

    async def fail_corrupt(
        self, order: CorruptOrder, *, failed_state: str, trigger: str, now: datetime, worker: str
    ) -> bool:
        """Set a corrupt row aside as failed (the machine's move ``trigger``). Its data column
        is left byte for byte as found."""

        def fail(conn: Connection) -> bool:
            seq = conn.execute(
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
            ).scalar_one_or_none()
            if seq is None:
                return False
            append_journal(
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

        return await self._run(fail)

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

        def take(conn: Connection) -> None:
            current = load_order(conn, order_id)
            if current.state not in allowed_states:
                raise OrderStateError(order_id, current.state, allowed_states)
            if current.lease_until is not None and current.lease_until > now:
                raise OrderBusyError(
                    f"order {order_id} is being worked on by {current.lease_owner} until "
                    f"{current.lease_until.isoformat()}; try again after that"
                )
            plan = build(current)
            if not apply_plan(conn, current, plan, now=now, worker=actor, bump=True):
                raise OrderBusyError(f"order {order_id} changed underneath; try again")

        await self._run(take)
        return await self.get_order(order_id)

    async def record_revocation(
        self, certificate_id: int, *, now: datetime, reason: str | None
    ) -> CertificateRecord:
        """Record that an operator revoked the certificate ``certificate_id`` (unless it is
        recorded already: the first revocation's moment and reason stay)."""

        def record(conn: Connection) -> Any:
            conn.execute(
                update(certificates)
                .where(certificates.c.id == certificate_id, certificates.c.revoked_at.is_(None))
                .values(revoked_at=now, revocation_reason=reason)
            )
            row = conn.execute(
                select(certificates).where(certificates.c.id == certificate_id)
            ).first()
            if row is not None and self.dialect == "postgresql":
                # No journal entry to ride on: a running node stops advertising it at once.
                payload = notify_payload(int(row.order_id), row.peer_id, None)
                conn.execute(select(func.pg_notify(CHANNEL, payload)))
            return row

        row = await self._run(record)
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
        ).where(ACTIVE, orders.c.lease_until > now, orders.c.lease_owner.is_not(None))
        rows = await self._all(_peers(query, peers).order_by(orders.c.id))
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
        return (
            await self._rowcount(
                update(orders)
                .where(
                    orders.c.id == lease.order_id,
                    orders.c.lease_owner == lease.owner,
                    orders.c.fence == lease.fence,
                    orders.c.lease_until > now,
                )
                .values(lease_until=now)
            )
            == 1
        )

    async def make_due(
        self,
        *,
        now: datetime,
        last_error_class: str | None = None,
        directory_url: str | None = None,
        peers: Collection[str] | None = None,
    ) -> int:
        """Make active orders (of ``peers``) that wait for something a new process may have
        changed due ``now``; returns how many:

        * ``last_error_class``: those waiting after an error of that class (this process may
          hold the fix for what they wait on);
        * ``directory_url``: those whose account belongs to another ACME directory: the
          operator switched CA, and a worker moves them to that CA at once (``ca_changed``)
          rather than at their next renewal."""
        which: ColumnElement[bool]
        if (last_error_class is None) == (directory_url is None):
            raise ValueError("make_due: give last_error_class or directory_url")
        if last_error_class is not None:
            which = orders.c.last_error_class == last_error_class
        else:
            elsewhere = select(accounts.c.id).where(accounts.c.directory_url != directory_url)
            which = orders.c.account_id.in_(elsewhere)
        statement = update(orders).where(ACTIVE, which, orders.c.next_run_at > now)
        return await self._rowcount(_peers(statement, peers).values(next_run_at=now))

    # -- reads ----------------------------------------------------------------------------

    async def get_order(self, order_id: int) -> OrderSnapshot:
        return await self._run(load_order, order_id, write=False)

    async def active_order(self, peer_id: str) -> OrderSnapshot | None:
        def read(conn: Connection) -> OrderSnapshot | None:
            order_id = _active_order_id(conn, peer_id)
            return None if order_id is None else load_order(conn, order_id)

        return await self._run(read, write=False)

    async def latest_order(self, peer_id: str) -> OrderSnapshot | None:
        """The peer's most recent order, active or not."""

        def read(conn: Connection) -> OrderSnapshot | None:
            order_id = conn.execute(
                select(func.max(orders.c.id)).where(orders.c.peer_id == peer_id)
            ).scalar_one_or_none()
            return None if order_id is None else load_order(conn, int(order_id))

        return await self._run(read, write=False)

    async def list_orders(self) -> list[OrderSnapshot | CorruptOrder]:
        def read(conn: Connection) -> list[OrderSnapshot | CorruptOrder]:
            rows = conn.execute(select(orders.c.id, orders.c.fence).order_by(orders.c.id)).all()
            return [load_claimed(conn, int(r.id), int(r.fence)) for r in rows]

        return await self._run(read, write=False)

    async def next_due_at(self, *, peers: Collection[str] | None = None) -> datetime | None:
        """The earliest moment any active order (of ``peers``) can be claimed: its
        ``next_run_at``, or the end of a live lease on it, whichever is later."""
        return await self._run(claim.next_due_at, peers, write=False, single=True)

    async def count_by_state(self, *, peers: Collection[str] | None = None) -> dict[str, int]:
        """How many orders (of ``peers``) are in each state: one ``GROUP BY`` (metrics)."""
        query = select(orders.c.state, func.count()).group_by(orders.c.state)
        rows = await self._all(_peers(query, peers))
        return {str(state): int(count) for state, count in rows}

    async def journal(self, order_id: int) -> list[JournalRecord]:
        query = select(journal).where(journal.c.order_id == order_id).order_by(journal.c.seq)
        return [journal_record(r) for r in await self._all(query)]

    async def certificates(
        self, *, order_id: int | None = None, peer_id: str | None = None
    ) -> list[CertificateRecord]:
        query = select(certificates).order_by(certificates.c.id)
        if order_id is not None:
            query = query.where(certificates.c.order_id == order_id)
        if peer_id is not None:
            query = query.where(certificates.c.peer_id == peer_id)
        return [certificate_record(r) for r in await self._all(query)]

    async def account(self, directory_url: str) -> AccountRecord | None:
        rows = await self._all(select(accounts).where(accounts.c.directory_url == directory_url))
        return account_record(rows[0]) if rows else None

    async def accounts(self) -> list[AccountRecord]:
        rows = await self._all(select(accounts).order_by(accounts.c.id))
        return [account_record(r) for r in rows]

    # -- internals ------------------------------------------------------------------------

    async def _run(
        self,
        fn: Callable[..., T],
        *args: Any,
        write: bool = True,
        single: bool = False,
        **kw: Any,
    ) -> T:
        """``fn(connection, *args, **kw)`` in one transaction (a reader's on SQLite when not
        ``write``): one hand-off to the store's thread on SQLite, ``run_sync`` on PostgreSQL.

        ``single``: ``fn`` writes with one statement at most (atomic by itself), so on
        PostgreSQL it runs in autocommit, sparing the ``BEGIN`` and ``COMMIT`` round trips."""
        if kw:
            fn = functools.partial(fn, **kw)
        if self._thread is not None:
            return await self._thread.run(fn, *args, write=write)
        if single:
            async with self.engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                return await conn.run_sync(fn, *args)
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn, *args)

    async def _all(self, query: Any) -> list[Any]:
        return await self._run(lambda conn: conn.execute(query).all(), write=False, single=True)

    async def _rowcount(self, statement: Any) -> int:
        return await self._run(lambda conn: int(conn.execute(statement).rowcount), single=True)


def _active_order_id(conn: Connection, peer_id: str) -> int | None:
    value = conn.execute(
        select(orders.c.id).where(orders.c.peer_id == peer_id, ACTIVE)
    ).scalar_one_or_none()
    return None if value is None else int(value)
