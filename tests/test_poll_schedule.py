"""Polls at the CA's pace (issue 11): the schedule of :mod:`autotls.fsm.schedule` alone, then
as the engine keeps it (fake ports, a ManualClock: every wait is read from the row), and a
Retry-After HTTP-date read on the engine's clock by the real ACME adapter."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from autotls.adapters import AcmeAdapter
from autotls.fsm.clock import ManualClock
from autotls.fsm.machine import State
from autotls.fsm.ports import AcmeAccount, EngineSettings
from autotls.fsm.schedule import poll_at, poll_interval
from tests.fakes.acme_server import FakeAcmeServer
from tests.fixtures.engine import Engine

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
SETTINGS = EngineSettings()


def test_first_check_soon_then_doubling_up_to_the_cap() -> None:
    first, cap = 25 * MS, 2000 * MS
    checks, now = [], T0
    for _ in range(12):
        now = poll_at(now, T0, None, first=first, cap=cap, max_wait=timedelta(minutes=5))
        checks.append(now - T0)
    assert checks[:8] == [n * MS for n in (25, 50, 100, 200, 400, 800, 1600, 3200)]
    gaps = [b - a for a, b in itertools.pairwise(checks)]
    assert gaps[-4:] == [cap] * 4, "at the cap the interval stays there"
    assert all(g <= cap for g in gaps)


def test_interval_without_a_start_is_the_first() -> None:
    assert poll_interval(T0, None, 25 * MS, timedelta(seconds=2)) == 25 * MS
    # A first interval above the cap never exceeds the cap.
    assert poll_interval(T0, T0, timedelta(seconds=9), timedelta(seconds=2)) == timedelta(seconds=2)


def test_retry_after_is_honoured_and_capped() -> None:
    cap, max_wait = timedelta(seconds=2), timedelta(minutes=5)
    at = poll_at(T0, T0, 17, first=25 * MS, cap=cap, max_wait=max_wait)
    assert at == T0 + timedelta(seconds=17), "above our own cap: the CA's pace wins"
    assert poll_at(T0, T0, 0.5, first=25 * MS, cap=cap, max_wait=max_wait) == T0 + 500 * MS
    ten_days = 10 * 24 * 3600.0
    assert poll_at(T0, T0, ten_days, first=25 * MS, cap=cap, max_wait=max_wait) == T0 + max_wait
    # Zero or negative (an HTTP-date in the past): our own schedule.
    assert poll_at(T0, T0, 0, first=25 * MS, cap=cap, max_wait=max_wait) == T0 + 25 * MS
    assert poll_at(T0, T0, -3, first=25 * MS, cap=cap, max_wait=max_wait) == T0 + 25 * MS


async def _gaps_while_validating(engine: Engine, polls: int) -> list[timedelta]:
    """The waits the engine wrote from the answer to the authorization's validity."""
    engine.ca.pending_polls = polls
    order = await engine.order()
    await engine.drive_to(order.id, State.DNS_PROPAGATED)
    worker = engine.worker()
    gaps = []
    while (snap := await engine.store.get_order(order.id)).state == State.DNS_PROPAGATED.value:
        await worker.run_once()
        after = await engine.store.get_order(order.id)
        if after.state != State.DNS_PROPAGATED.value:
            break
        gaps.append(after.next_run_at - engine.clock.now())
        engine.clock.set(after.next_run_at)
        assert snap.data.get("answered_at") or after.data.get("answered_at")
    await engine.drive_to(order.id, State.INSTALLED)
    return gaps


async def test_engine_polls_the_order_on_the_geometric_schedule(engine: Engine) -> None:
    gaps = await _gaps_while_validating(engine, polls=9)
    first, cap = SETTINGS.first_poll_interval, SETTINGS.authz_poll_interval
    # After the answer: 25 ms, then the time waited so far (25, 50, 100 ms...), to the cap.
    expected = [first, first, *(first * 2**n for n in range(1, 7))]
    assert gaps[:8] == [min(g, cap) for g in expected]
    assert gaps[-1] == cap
    assert engine.ca.count("answer_challenge") == 1
    assert engine.ca.count("finalize") == 1


async def test_engine_honours_the_cas_retry_after_capped(engine: Engine) -> None:
    engine.ca.retry_after = 10 * 24 * 3600  # ten days: a broken header, not a plan
    gaps = await _gaps_while_validating(engine, polls=2)
    assert gaps == [
        SETTINGS.first_poll_interval,
        SETTINGS.max_poll_interval,
        SETTINGS.max_poll_interval,
    ]


async def test_processing_order_waits_retry_after_from_the_finalize(engine: Engine) -> None:
    engine.ca.processing_polls = 2
    engine.ca.retry_after = 3
    order = await engine.order()
    await engine.drive_to(order.id, State.VALIDATED)
    snap = await engine.store.get_order(order.id)
    assert snap.next_run_at == engine.clock.now() + timedelta(seconds=3)
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("finalize") == 1


async def test_retry_after_http_date_is_read_on_the_engine_clock() -> None:
    # The engine's clock is a year behind the wall clock: a date read on the wall clock would
    # be in the past (no wait at all); read on the engine's it is exactly 90 s away.
    clock = ManualClock(datetime(2025, 6, 1, 12, 0, tzinfo=UTC))
    async with FakeAcmeServer(now=clock.now) as ca:
        ca.authz_retry_after = format_datetime(clock.now() + timedelta(seconds=90), usegmt=True)
        acme = AcmeAdapter(ca.directory_url, clock=clock)
        try:
            key = acme.generate_account_key()
            registered = await acme.register_account(AcmeAccount(key, None))
            account = AcmeAccount(key, registered.url)
            placed = await acme.new_order(
                account, "*.k51example.libp2p.direct", profile=None, replaces=None
            )
            order = await acme.get_order(account, placed.url)
        finally:
            await acme.close()
    assert order.status == "pending"
    assert order.retry_after == 90
    at = poll_at(
        clock.now(),
        clock.now(),
        order.retry_after,
        first=SETTINGS.first_poll_interval,
        cap=SETTINGS.authz_poll_interval,
        max_wait=SETTINGS.max_poll_interval,
    )
    assert at == clock.now() + timedelta(seconds=90)
