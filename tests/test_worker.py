"""The worker loop itself: lease renewal during long steps, graceful shutdown, waking, and
sleeping until the next due time instead of polling."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import timedelta

from autotls.fsm.machine import State
from autotls.fsm.worker import OrderEvent, Worker
from tests.fixtures.engine import Engine


class BlockingBroker:
    """Wraps the fake broker so a registration hangs until the test lets it go."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False

    async def health(self):  # type: ignore[no-untyped-def]
        return await self.inner.health()  # type: ignore[attr-defined]

    async def register(self, peer_id: str, value: str) -> Sequence[str]:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return await self.inner.register(peer_id, value)  # type: ignore[attr-defined,no-any-return]


async def settle_tasks() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def eventually(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Wait for a condition another thread makes true (the store runs SQLite in aiosqlite's
    thread); the deadline turns a hang into a failure naming what never happened."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - set after a thread's result reaches the loop
            await asyncio.sleep(0.005)
    assert condition(), what


async def test_a_long_step_keeps_its_lease(engine: Engine) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.CHALLENGED)
    blocking = BlockingBroker(engine.broker)
    engine.ports.broker = blocking  # type: ignore[assignment]
    slow = Worker(engine.store, engine.ports, worker_id="slow", lease=timedelta(seconds=60))
    run = asyncio.ensure_future(slow.run_once())
    await blocking.entered.wait()
    for n in range(1, 5):  # 4 x 30 s = two lease lengths while the step hangs
        await eventually(lambda: engine.clock.sleepers > 0, "the lease keeper is waiting")
        engine.clock.advance(30)
        await eventually(lambda n=n: slow.lease_renewals >= n, f"renewal {n}")
    held = await engine.store.get_order(order.id)
    assert held.lease_owner == "slow"
    assert held.lease_until is not None and held.lease_until > engine.clock.now()
    other = Worker(engine.store, engine.ports, worker_id="other")
    assert await other.run_once() == 0, "a renewed lease is not up for grabs"
    blocking.release.set()
    assert await run == 1
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.BROKER_NOTIFIED.value
    assert slow.lost_leases == 0


async def stopping_during_a_hung_step(
    engine: Engine, grace: float
) -> tuple[int, BlockingBroker, asyncio.Future[None]]:
    """An order whose broker registration hangs, a running worker inside that step, and
    the worker told to stop: (order id, the hanging broker, the worker's run)."""
    order = await engine.order()
    await engine.drive_to(order.id, State.CHALLENGED)
    blocking = BlockingBroker(engine.broker)
    engine.ports.broker = blocking  # type: ignore[assignment]
    worker = Worker(engine.store, engine.ports, worker_id="stopping")
    stop = asyncio.Event()
    running = asyncio.ensure_future(worker.run(stop, grace=grace))
    await blocking.entered.wait()
    stop.set()
    return order.id, blocking, running


async def test_graceful_shutdown_releases_what_it_cannot_finish(engine: Engine) -> None:
    order_id, blocking, running = await stopping_during_a_hung_step(engine, grace=0.05)
    await asyncio.wait_for(running, 5)
    assert blocking.cancelled, "the hanging call was cancelled after the grace period"
    snap = await engine.store.get_order(order_id)
    assert snap.state == State.CHALLENGED.value, "nothing half-done was committed"
    assert snap.lease_owner is None and snap.lease_until is None, "the lease was given back"
    engine.ports.broker = engine.broker
    await engine.drive_to(order_id, State.INSTALLED)


async def test_graceful_shutdown_lets_a_quick_step_commit(engine: Engine) -> None:
    order_id, blocking, running = await stopping_during_a_hung_step(engine, grace=30)
    await settle_tasks()
    blocking.release.set()  # finishes within the grace period
    await asyncio.wait_for(running, 5)
    assert (await engine.store.get_order(order_id)).state == State.BROKER_NOTIFIED.value


async def test_the_loop_sleeps_until_the_next_due_time_and_wakes_on_demand(engine: Engine) -> None:
    events: list[OrderEvent] = []
    worker = Worker(engine.store, engine.ports, worker_id="loop", idle_poll=timedelta(hours=1))
    worker.subscribe(events.append)
    stop = asyncio.Event()
    running = asyncio.ensure_future(worker.run(stop))
    await eventually(lambda: engine.clock.sleepers >= 1, "idle: asleep on the clock, not polling")
    order = await engine.order()
    worker.wake()
    for _ in range(200):
        await settle_tasks()
        snap = await engine.store.get_order(order.id)
        if snap.state == State.INSTALLED.value:
            break
        if engine.clock.sleepers and snap.next_run_at > engine.clock.now():
            engine.clock.set(snap.next_run_at)  # the worker waits exactly for this moment
        await asyncio.sleep(0.01)  # let the store's threads run; the engine never sleeps
    stop.set()
    await asyncio.wait_for(running, 5)
    assert snap.state == State.INSTALLED.value
    assert [e.trigger for e in events if e.trigger][:2] == ["account_ready", "order_placed"]
