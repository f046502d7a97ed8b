"""The worker loop itself: lease renewal during long steps, graceful shutdown, waking, and
sleeping until the next due time instead of polling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta

import pytest

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

    async def reachability(self, peer_id: str):  # type: ignore[no-untyped-def]
        return await self.inner.reachability(peer_id)  # type: ignore[attr-defined]

    async def register(self, peer_id: str, value: str) -> Sequence[str]:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return await self.inner.register(peer_id, value)  # type: ignore[attr-defined,no-any-return]


class StepsWaitingOnShutdown(logging.Handler):
    """Set when the worker, told to stop, starts waiting for its steps in flight (the one
    line it logs then): a test releases a step after that, not after some scheduling luck."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("stopping: waiting up to"):
            self.seen.set()


async def test_a_long_step_keeps_its_lease(engine: Engine) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.CHALLENGED)
    blocking = BlockingBroker(engine.broker)
    engine.ports.broker = blocking  # type: ignore[assignment]
    slow = Worker(engine.store, engine.ports, worker_id="slow", lease=timedelta(seconds=60))
    run = asyncio.ensure_future(slow.run_once())
    await blocking.entered.wait()
    for n in range(4):  # 4 x 30 s = two lease lengths while the step hangs
        # The lease keeper waits on the clock: after a first period, and after each renewal.
        await engine.clock.sleeping()
        assert slow.lease_renewals == n
        engine.clock.advance(30)
    await engine.clock.sleeping()
    assert slow.lease_renewals == 4
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


async def test_graceful_shutdown_lets_a_quick_step_commit(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    watch = StepsWaitingOnShutdown()
    worker_log = logging.getLogger("autotls.worker")
    worker_log.addHandler(watch)
    try:
        with caplog.at_level(logging.INFO, logger="autotls.worker"):
            order_id, blocking, running = await stopping_during_a_hung_step(engine, grace=30)
            async with asyncio.timeout(10):
                await watch.seen.wait()  # the worker noticed the stop and grants the grace
    finally:
        worker_log.removeHandler(watch)
    blocking.release.set()  # finishes within the grace period
    await asyncio.wait_for(running, 5)
    assert (await engine.store.get_order(order_id)).state == State.BROKER_NOTIFIED.value


async def test_the_loop_sleeps_until_the_next_due_time_and_wakes_on_demand(engine: Engine) -> None:
    events: asyncio.Queue[OrderEvent] = asyncio.Queue()
    worker = Worker(engine.store, engine.ports, worker_id="loop", idle_poll=timedelta(hours=1))
    worker.subscribe(events.put_nowait)
    stop = asyncio.Event()
    running = asyncio.ensure_future(worker.run(stop))
    await engine.clock.sleeping()  # idle: asleep on the clock, not polling
    order = await engine.order()
    worker.wake()
    seen: list[OrderEvent] = []
    async with asyncio.timeout(30):
        while not seen or seen[-1].to_state != State.INSTALLED.value:
            seen.append(event := await events.get())  # the worker's next commit
            assert event.order_id == order.id
            if event.next_run_at is not None and event.next_run_at > engine.clock.now():
                engine.clock.set(event.next_run_at)  # the worker waits exactly for this moment
    stop.set()
    await asyncio.wait_for(running, 5)
    assert [e.trigger for e in seen if e.trigger][:2] == ["account_ready", "order_placed"]
