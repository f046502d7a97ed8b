"""The store's guarantees on SQLite and PostgreSQL: leases, fences, one active order per peer,
corrupt rows set aside, private files."""

from __future__ import annotations

import asyncio
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update

from autotls.fsm.clock import ManualClock
from autotls.fsm.machine import State, Trigger
from autotls.fsm.worker import Worker
from autotls.persistence.errors import ActiveOrderExistsError, OrderBusyError
from autotls.persistence.models import orders
from autotls.persistence.records import CommitPlan, JournalNote
from autotls.persistence.store import CorruptOrder, Store
from tests.fixtures.engine import Engine, identifier_for, new_peer

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _plan(to: str, trigger: str | None = None, **data: object) -> CommitPlan:
    return CommitPlan(
        to_state=to,
        data=data,
        next_run_at=NOW,
        attempts=0,
        last_error_class=None,
        last_error_message=None,
        last_problem=None,
        journal=JournalNote("transition", trigger, {}) if trigger else None,
    )


@pytest.fixture
async def store(database_url: str):  # type: ignore[no-untyped-def]
    s = await Store.open(database_url)
    yield s
    await s.close()


async def _new(store: Store, peer: str | None = None) -> int:
    peer = peer or new_peer()
    snap = await store.create_order(
        peer, identifier_for(peer), initial_state="New", trigger=Trigger.CREATE, now=NOW
    )
    return snap.id


async def test_claim_takes_a_lease_and_bumps_the_fence(store: Store) -> None:
    order_id = await _new(store)
    [claimed] = await store.claim_due("w1", now=NOW, lease_seconds=60, limit=5)
    assert not isinstance(claimed, CorruptOrder)
    assert (claimed.id, claimed.fence, claimed.lease_owner) == (order_id, 1, "w1")
    assert await store.claim_due("w2", now=NOW, lease_seconds=60, limit=5) == []
    assert await store.next_due_at() == NOW + timedelta(seconds=60)


async def test_a_stale_workers_commit_is_rejected_by_the_fence(store: Store) -> None:
    order_id = await _new(store)
    [slow] = await store.claim_due("slow", now=NOW, lease_seconds=60, limit=1)
    later = NOW + timedelta(seconds=61)  # the slow worker's lease ran out
    [fast] = await store.claim_due("fast", now=later, lease_seconds=60, limit=1)
    assert not isinstance(slow, CorruptOrder) and not isinstance(fast, CorruptOrder)
    assert fast.fence == slow.fence + 1
    assert await store.commit(fast, _plan("Registered", "account_ready"), now=later, worker="fast")
    assert not await store.commit(slow, _plan("Failed", "fail"), now=later, worker="slow")
    snap = await store.get_order(order_id)
    assert snap.state == "Registered"
    assert [j.trigger for j in await store.journal(order_id)] == ["create", "account_ready"]


async def test_one_claim_commits_once(store: Store) -> None:
    await _new(store)
    [claimed] = await store.claim_due("w", now=NOW, lease_seconds=60, limit=1)
    assert not isinstance(claimed, CorruptOrder)
    assert await store.commit(claimed, _plan("Registered", "account_ready"), now=NOW, worker="w")
    assert not await store.commit(
        claimed, _plan("Registered", "account_ready"), now=NOW, worker="w"
    )


async def test_one_active_order_per_peer(store: Store) -> None:
    peer = new_peer()
    first = await _new(store, peer)
    with pytest.raises(ActiveOrderExistsError, match=f"peer {peer} already has an active order"):
        await _new(store, peer)
    [claimed] = await store.claim_due("w", now=NOW, lease_seconds=60, limit=1)
    assert not isinstance(claimed, CorruptOrder)
    await store.commit(claimed, _plan("Failed", "fail"), now=NOW, worker="w")
    second = await _new(store, peer)  # a failed order no longer blocks the peer
    # Retrying the failed one now would make two active orders: refused by the index.
    with pytest.raises(ActiveOrderExistsError):
        await store.operator_commit(
            first,
            allowed_states={"Failed"},
            build=lambda snap: _plan("New", "retry"),
            now=NOW,
            actor="op",
        )
    assert (await store.get_order(first)).state == "Failed"
    assert (await store.active_order(peer)).id == second  # type: ignore[union-attr]


async def test_unique_index_holds_under_concurrent_creates(store: Store) -> None:
    peer = new_peer()
    results = await asyncio.gather(*(_new(store, peer) for _ in range(8)), return_exceptions=True)
    assert sum(isinstance(r, int) for r in results) == 1
    assert all(isinstance(r, (int, ActiveOrderExistsError)) for r in results)


async def test_concurrent_claimers_never_share_an_order(store: Store) -> None:
    for _ in range(30):
        await _new(store)
    batches = await asyncio.gather(
        *(store.claim_due(f"w{i}", now=NOW, lease_seconds=60, limit=4) for i in range(10))
    )
    ids = [c.id for batch in batches for c in batch]
    assert len(ids) == len(set(ids)) == 30


async def test_operator_action_waits_for_a_live_lease(store: Store) -> None:
    order_id = await _new(store)
    await store.claim_due("w", now=NOW, lease_seconds=60, limit=1)
    with pytest.raises(OrderBusyError, match="being worked on by w"):
        await store.operator_commit(
            order_id,
            allowed_states={"New"},
            build=lambda snap: _plan("Failed", "fail"),
            now=NOW,
            actor="op",
        )


async def test_corrupt_row_is_set_aside_and_others_continue(engine: Engine) -> None:
    bad, good = await engine.order(), await engine.order()
    async with engine.store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE orders SET data = '{not json' WHERE id = :id"), {"id": bad.id}
        )
    claimed = await engine.store.claim_due("w", now=engine.clock.now(), lease_seconds=60, limit=5)
    corrupt = [c for c in claimed if isinstance(c, CorruptOrder)]
    assert [c.id for c in corrupt] == [bad.id]
    assert "data column not JSON" in corrupt[0].error
    await engine.store.release(good.id, next(c.fence for c in claimed if c.id == good.id))
    await engine.store.release(bad.id, corrupt[0].fence)
    await engine.drive()
    assert (await engine.store.get_order(good.id)).state == State.INSTALLED.value
    async with engine.store.engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT state, data, last_error_message FROM orders WHERE id = :id"),
                {"id": bad.id},
            )
        ).one()
    assert row.state == "Failed"
    assert row.data == "{not json", "the stored bytes are kept for the operator"
    assert "corrupt order row" in row.last_error_message


async def test_unknown_state_is_set_aside(engine: Engine) -> None:
    order = await engine.order()
    async with engine.store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE orders SET state = 'Limbo' WHERE id = :id"), {"id": order.id}
        )
    worker = Worker(engine.store, engine.ports, worker_id="w")
    await worker.run_once()
    snap = await engine.store.get_order(order.id)
    assert snap.state == "Failed"
    assert snap.last_error_message == "corrupt order row: unknown state"


async def test_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "autotls.db"
    store = await Store.open(f"sqlite:///{path}")
    await _new(store)
    await store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_manual_clock_wakes_sleepers_only_when_advanced() -> None:
    clock = ManualClock(NOW)
    woke = asyncio.Event()

    async def sleeper() -> None:
        await clock.sleep_until(NOW + timedelta(seconds=10))
        woke.set()

    task = asyncio.ensure_future(sleeper())
    await clock.sleeping()
    clock.advance(9)
    assert clock.sleepers == 1, "nine seconds in, the sleeper still waits"
    clock.advance(1)
    assert clock.sleepers == 0
    await asyncio.wait_for(task, 1)
    assert woke.is_set()


async def test_an_order_is_claimable_exactly_when_next_due_at_says(store: Store) -> None:
    """next_due_at and claim_due agree on the boundary: a lease is over at its end time
    (a deterministic driver that jumps the clock to next_due_at must find work there)."""
    await _new(store)
    await store.claim_due("crashed", now=NOW, lease_seconds=60, limit=1)
    due = await store.next_due_at()
    assert due == NOW + timedelta(seconds=60)
    assert (
        await store.claim_due("w", now=due - timedelta(microseconds=1), lease_seconds=60, limit=1)
        == []
    )
    [claimed] = await store.claim_due("w", now=due, lease_seconds=60, limit=1)
    assert not isinstance(claimed, CorruptOrder) and claimed.fence == 2


async def test_an_operator_can_act_on_an_order_whose_worker_died(store: Store) -> None:
    """A dead worker's lease expires but keeps its owner's name; the operator's move must
    not wait for another worker to claim the order, and the dead worker's fence is void."""
    order_id = await _new(store)
    [claimed] = await store.claim_due("dead", now=NOW, lease_seconds=60, limit=1)
    assert not isinstance(claimed, CorruptOrder)
    later = NOW + timedelta(seconds=61)
    moved = await store.operator_commit(
        order_id,
        allowed_states={"New"},
        build=lambda snap: _plan("Failed", "fail"),
        now=later,
        actor="op",
    )
    assert moved.state == "Failed" and moved.fence == claimed.fence + 1
    assert not await store.commit(
        claimed, _plan("Registered", "account_ready"), now=later, worker="dead"
    )


async def test_next_due_at_sees_past_more_leased_orders_than_it_reads_at_first(
    store: Store,
) -> None:
    """next_due_at reads the soonest-due orders first (claim.NEXT_DUE_WINDOW of them); when
    every one of those holds a live lease, the answer may lie beyond them -- here an order
    due later than all of them but sooner than any lease ends -- and it must still be found,
    for all orders and for one peer's."""
    from autotls.persistence.claim import NEXT_DUE_WINDOW

    for _ in range(NEXT_DUE_WINDOW):
        await _new(store)
    leased = await store.claim_due("w", now=NOW, lease_seconds=3600, limit=NEXT_DUE_WINDOW)
    assert len(leased) == NEXT_DUE_WINDOW
    later_peer = new_peer()
    later = await _new(store, later_peer)
    soon = NOW + timedelta(minutes=5)
    async with store.engine.begin() as conn:
        await conn.execute(update(orders).where(orders.c.id == later).values(next_run_at=soon))
    assert await store.next_due_at() == soon
    assert await store.next_due_at(peers={later_peer}) == soon
    assert await store.next_due_at(peers={leased[0].peer_id}) == NOW + timedelta(hours=1)
