"""Change notifications between processes (issue 10 §3): a commit made through one store is
told to another at once -- PostgreSQL ``LISTEN/NOTIFY``, SQLite ``PRAGMA data_version`` --
so a running worker takes an operator's move without waiting for its idle poll.

Every test runs on SQLite and on PostgreSQL. The workers here run on a ManualClock that
never moves: a sleeping worker can only be woken by a notification, so "it moved the
order" is the proof, with no timing assertion. The real-process version (``autotls run`` +
``autotls renew --force``) is in ``test_cli_e2e.py``; ``bench.operator`` prints latencies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta

import pytest
from sqlalchemy import text

from autotls.fsm import operator
from autotls.fsm.machine import State
from autotls.fsm.worker import Worker
from autotls.persistence.changes import ANYTHING, Change, notify_payload, parse_payload
from autotls.persistence.records import CommitPlan, JournalNote
from autotls.persistence.store import Store
from tests.fixtures.engine import Engine, identifier_for, new_peer, open_engine

WITHIN_S = 15.0  # turns a notification that never comes into a failure, never a pass


async def within(awaitable: Awaitable[object], what: str) -> None:
    try:
        async with asyncio.timeout(WITHIN_S):
            await awaitable
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


@pytest.fixture
async def engine_on(database_url: str) -> AsyncIterator[Engine]:
    """The fake-ports engine on either backend."""
    async with open_engine(database_url) as engine:
        yield engine


class Heard:
    """A change listener (called on the event loop) that tests can wait on."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self._told = asyncio.Event()

    def __call__(self, changes: Sequence[Change]) -> None:
        self.changes.extend(changes)
        self._told.set()

    async def until(self, condition: Callable[[list[Change]], bool], what: str) -> None:
        """Until what was told satisfies ``condition``; re-checked at each delivery."""

        async def told() -> None:
            while not condition(self.changes):
                self._told.clear()
                await self._told.wait()

        await within(told(), what)


def test_payloads_round_trip_and_garbage_means_anything() -> None:
    assert parse_payload(notify_payload(7, "k51peer", "cli:ops@host")) == Change(
        7, "k51peer", "cli:ops@host"
    )
    assert parse_payload("not json") == ANYTHING
    assert parse_payload('{"order": "x"}') == ANYTHING
    assert ANYTHING.concerns(frozenset({"a"})) and Change(1, "b", None).concerns(None)
    assert not Change(1, "b", None).concerns(frozenset({"a"}))


async def test_commits_through_another_store_are_told(database_url: str, engine_on: Engine) -> None:
    heard = Heard()
    unsubscribe = engine_on.store.on_change(heard)
    await engine_on.store.changes_told()
    other = await Store.open(database_url, upgrade=False)
    try:
        peer = new_peer()
        created = await operator.create_order(
            other, peer, identifier_for(peer), now=engine_on.clock.now(),
            actor="cli:someone@elsewhere",
        )  # fmt: skip
        await heard.until(
            lambda told: Change(created.id, peer, "cli:someone@elsewhere") in told,
            "the new order was told",
        )
        before = len(heard.changes)
        unsubscribe()
        await engine_on.order()  # nobody listens any more: nothing is delivered
        peer2 = new_peer()
        await operator.create_order(other, peer2, identifier_for(peer2), now=engine_on.clock.now())
        resubscribed = Heard()
        engine_on.store.on_change(resubscribed)
        peer3 = new_peer()
        third = await operator.create_order(
            other, peer3, identifier_for(peer3), now=engine_on.clock.now()
        )
        await resubscribed.until(
            lambda told: any(c.order_id == third.id for c in told), "told again"
        )
        assert len(heard.changes) == before
    finally:
        await other.close()


async def test_an_operator_move_wakes_a_sleeping_worker(
    database_url: str, engine_on: Engine
) -> None:
    order = await engine_on.order()
    await engine_on.drive_to(order.id, State.INSTALLED)
    worker = Worker(
        engine_on.store, engine_on.ports, worker_id="sleeper", idle_poll=timedelta(hours=10)
    )
    moved = asyncio.Event()
    stop = asyncio.Event()
    running = asyncio.ensure_future(worker.run(stop, grace=1.0))
    try:
        # Asleep until the renewal is due (weeks away on a clock that never moves).
        await within(engine_on.clock.sleeping(), "the worker sleeps")
        worker.subscribe(lambda event: moved.set() if event.order_id == order.id else None)
        await engine_on.store.changes_told()
        operator_store = await Store.open(database_url, upgrade=False)
        try:
            await operator.force_renewal(
                operator_store, order.id, now=engine_on.clock.now(), actor="cli:ops@host"
            )
        finally:
            await operator_store.close()

        async def journaled_by_the_sleeper() -> None:
            """Until the journal has an entry by the worker after the operator's: looked at
            each time the worker tells a step of the order (a wait is told, not journaled)."""
            while True:
                await moved.wait()
                moved.clear()
                journal = await engine_on.store.journal(order.id)
                forced = max(i for i, e in enumerate(journal) if e.trigger == "force_renewal")
                if any(e.worker == "sleeper" for e in journal[forced + 1 :]):
                    return

        await within(journaled_by_the_sleeper(), "the sleeping worker journaled a move")
        assert worker.changes_seen >= 1
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


async def test_a_worker_is_not_woken_by_its_own_commits(
    database_url: str, engine_on: Engine
) -> None:
    order = await engine_on.order()
    worker = Worker(engine_on.store, engine_on.ports, worker_id="busy")
    feed_heard = Heard()
    engine_on.store.on_change(feed_heard)
    await engine_on.store.changes_told()
    stop = asyncio.Event()
    running = asyncio.ensure_future(worker.run(stop, grace=1.0))
    try:
        # The feed has told about the worker's own commit ...
        await feed_heard.until(
            lambda told: any(c.actor == "busy" for c in told), "the commit was told"
        )
        assert worker.steps_run > 0
        # ... and the worker let it pass.
        assert worker.changes_seen == 0
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert (await engine_on.store.get_order(order.id)).state != State.NEW.value


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_dropped_listen_connection_reports_anything_and_resumes(
    database_url: str, engine_on: Engine
) -> None:
    heard = Heard()
    engine_on.store.on_change(heard)
    await engine_on.store.changes_told()
    first = await engine_on.order()
    other = await Store.open(database_url, upgrade=False)
    try:
        await operator_touch(other, first.id)
        await heard.until(lambda told: any(c.order_id == first.id for c in told), "told")
        async with other.engine.begin() as conn:
            killed = await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                )
            )
            assert killed.scalars().all() == [True]
        await heard.until(lambda told: ANYTHING in told, "a lost connection says so")
        # Reconnected, it says so again: what was committed meanwhile was not told.
        await heard.until(lambda told: told.count(ANYTHING) >= 2, "listening again")
        peer = new_peer()
        second = await operator.create_order(
            other, peer, identifier_for(peer), now=engine_on.clock.now()
        )
        await heard.until(lambda told: any(c.order_id == second.id for c in told), "resumed")
    finally:
        await other.close()


async def operator_touch(store: Store, order_id: int) -> None:
    """A journaled commit through ``store``: claim the order and fail it."""
    snap = await store.get_order(order_id)
    claimed = await store.claim_due("toucher", now=snap.next_run_at, lease_seconds=1, limit=1)
    assert claimed
    await store.commit(
        claimed[0],  # type: ignore[arg-type]
        CommitPlan(
            to_state=State.FAILED.value,
            data={},
            next_run_at=snap.next_run_at,
            attempts=0,
            last_error_class="permanent",
            last_error_message="test",
            last_problem=None,
            journal=JournalNote("error", "fail", {}),
        ),
        now=snap.next_run_at,
        worker="toucher",
    )


async def test_a_wake_up_during_a_claim_is_not_lost(engine: Engine) -> None:
    """A notification can arrive while the worker claims or reads the next due time; the
    sleep that follows must end at once, not wait for the idle poll (it used to clear the
    wake-up as it began)."""
    worker = Worker(engine.store, engine.ports, worker_id="w", idle_poll=timedelta(hours=10))
    reading = asyncio.Event()
    release = asyncio.Event()
    claimed_again = asyncio.Event()
    claims = 0
    real_next_due_at = engine.store.next_due_at
    real_claim_due = engine.store.claim_due

    async def next_due_at(**kwargs: object):  # type: ignore[no-untyped-def]
        if not release.is_set():
            reading.set()
            await release.wait()
        return await real_next_due_at(**kwargs)  # type: ignore[arg-type]

    async def claim_due(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        nonlocal claims
        claims += 1
        if claims >= 2:
            claimed_again.set()
        return await real_claim_due(*args, **kwargs)  # type: ignore[arg-type]

    engine.store.next_due_at = next_due_at  # type: ignore[method-assign]
    engine.store.claim_due = claim_due  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.ensure_future(worker.run(stop, grace=1.0))
    try:
        await asyncio.wait_for(reading.wait(), WITHIN_S)  # nothing due: it reads the next time
        assert claims == 1
        worker.wake()  # ... as a notification would, right then
        release.set()
        await within(claimed_again.wait(), "the worker claimed again instead of sleeping")
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


async def test_a_revocation_without_a_move_is_told_too(
    database_url: str, engine_on: Engine
) -> None:
    """``revoke --no-renew`` records the revocation on the certificate's row and moves no
    order: no journal entry, and still a running node must stop advertising at once."""
    order = await engine_on.order()
    installed = await engine_on.drive_to(order.id, State.INSTALLED)
    assert installed.certificate is not None
    heard = Heard()
    engine_on.store.on_change(heard)
    other = await Store.open(database_url, upgrade=False)
    try:
        await engine_on.store.changes_told()
        await other.record_revocation(
            installed.certificate.id, now=engine_on.clock.now(), reason="keyCompromise"
        )
    finally:
        await other.close()
    await heard.until(lambda told: Change(order.id, order.peer_id, None) in told, "told")
