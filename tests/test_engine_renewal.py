"""Renewal decisions: ARI windows (RFC 9773), the lifetime backstop, the emergency threshold,
expired certificates, and the fallbacks around ``replaces``. On the in-memory fake CA: Pebble
2.4.0 has no ARI."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autotls.fsm.errors import TransientError
from autotls.fsm.machine import State, Trigger
from autotls.fsm.ports import RenewalWindow
from autotls.fsm.renewal import backstop_time, pick_in_window, plan_renewal
from autotls.persistence.records import JournalRecord
from tests.fakes.ports import acme_problem
from tests.fixtures.engine import Engine

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def _dropped_replaces(engine: Engine, order_id: int) -> JournalRecord:
    """The journal entry that says the CA refused ``replaces`` (a declared move)."""
    journal = await engine.store.journal(order_id)
    return next(j for j in journal if j.trigger == Trigger.DROP_REPLACES)


async def installed(engine: Engine) -> int:
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    await engine.worker().run_once()  # the Installed step plans the renewal
    return order.id


def test_backstop_is_a_third_of_the_lifetime_or_half_under_ten_days() -> None:
    assert backstop_time(T0, T0 + timedelta(days=90)) == T0 + timedelta(days=60)
    assert backstop_time(T0, T0 + timedelta(hours=160)) == T0 + timedelta(hours=80)


@given(
    start=st.integers(0, 10_000),
    span=st.integers(1, 10_000),
    now=st.integers(0, 30_000),
    seed=st.integers(0, 2**32),
)
def test_the_chosen_moment_lies_in_the_window_and_not_in_the_past(
    start: int, span: int, now: int, seed: int
) -> None:
    window = RenewalWindow(T0 + timedelta(seconds=start), T0 + timedelta(seconds=start + span))
    moment = pick_in_window(window, T0 + timedelta(seconds=now), random.Random(seed))
    current = T0 + timedelta(seconds=now)
    if window.end <= current:
        assert moment == current
    else:
        assert max(window.start, current) <= moment <= window.end


def test_emergency_overrides_a_late_ari_window() -> None:
    plan = plan_renewal(
        now=T0,
        not_before=T0,
        not_after=T0 + timedelta(days=90),
        ari_time=T0 + timedelta(days=89),
        emergency_fraction=0.1,
    )
    assert plan.reason == "emergency" and plan.renew_at == T0 + timedelta(days=81)


async def test_ari_window_picks_a_random_time_and_renews_with_replaces(engine: Engine) -> None:
    engine.ca.ari = True
    engine.ca.window = (timedelta(days=30), timedelta(days=32))
    order_id = await installed(engine)
    snap = await engine.store.get_order(order_id)
    cert = snap.certificate
    assert cert is not None and cert.cert_id
    renewal = snap.data["renewal"]
    ari_time = datetime.fromisoformat(renewal["ari_time"])
    assert cert.not_before + timedelta(days=30) <= ari_time <= cert.not_before + timedelta(days=32)
    assert renewal["reason"] == "ari"
    # The next wake-up is the earlier of the chosen time and the next ARI check (6 h).
    assert snap.next_run_at == engine.clock.now() + timedelta(hours=6)
    await engine.drive_to(order_id, State.RENEW_DUE)
    assert engine.clock.now() >= ari_time
    await engine.drive_to(order_id, State.INSTALLED)
    certs = await engine.store.certificates(order_id=order_id)
    assert len(certs) == 2
    assert certs[1].replaces_cert_id == cert.cert_id
    assert engine.ca.orders[str(certs[1].acme_order_url)].replaces == cert.cert_id


async def test_the_chosen_time_stays_put_while_the_window_does(engine: Engine) -> None:
    engine.ca.ari = True
    engine.ca.window = (timedelta(days=30), timedelta(days=40))
    order_id = await installed(engine)
    first = (await engine.store.get_order(order_id)).data["renewal"]["ari_time"]
    for _ in range(3):  # three ARI re-checks, 6 h apart, same window
        engine.clock.set((await engine.store.get_order(order_id)).next_run_at)
        await engine.worker().run_once()
    snap = await engine.store.get_order(order_id)
    assert snap.data["renewal"]["ari_time"] == first
    assert engine.ca.count("renewal_info") == 4
    # The CA moves the window earlier (e.g. a revocation event): a new moment is chosen in it.
    engine.ca.window = (timedelta(days=1), timedelta(days=1, hours=1))
    engine.clock.set(snap.next_run_at)
    await engine.worker().run_once()
    moved = datetime.fromisoformat(
        (await engine.store.get_order(order_id)).data["renewal"]["ari_time"]
    )
    cert = snap.certificate
    assert cert is not None
    assert moved <= cert.not_before + timedelta(days=1, hours=1)


async def test_without_ari_there_is_no_replaces(engine: Engine) -> None:
    order_id = await installed(engine)
    await engine.drive_to(order_id, State.RENEW_DUE)
    await engine.drive_to(order_id, State.INSTALLED)
    certs = await engine.store.certificates(order_id=order_id)
    assert [c.replaces_cert_id for c in certs] == [None, None]
    assert engine.ca.count("renewal_info") == 0


async def test_already_replaced_falls_back_to_an_order_without_replaces(engine: Engine) -> None:
    engine.ca.ari = True
    engine.ca.window = (timedelta(days=1), timedelta(days=2))
    order_id = await installed(engine)
    cert = (await engine.store.get_order(order_id)).certificate
    assert cert is not None and cert.cert_id
    engine.ca.serials_replaced.add(cert.cert_id)  # someone already renewed it
    await engine.drive_to(order_id, State.RENEW_DUE)
    await engine.drive_to(order_id, State.INSTALLED)
    dropped = await _dropped_replaces(engine, order_id)
    assert "alreadyReplaced" in dropped.detail["refused"]
    assert dropped.detail["replaces"] == cert.cert_id
    assert (await engine.store.certificates(order_id=order_id))[1].replaces_cert_id is None


@pytest.mark.parametrize("status", [404])
async def test_replaces_refused_as_malformed_404_falls_back(engine: Engine, status: int) -> None:
    engine.ca.ari = True
    engine.ca.window = (timedelta(days=1), timedelta(days=2))
    order_id = await installed(engine)
    await engine.drive_to(order_id, State.REGISTERED)
    engine.ca.fail("new_order", acme_problem("malformed", "certificate not found", status))
    await engine.drive_to(order_id, State.INSTALLED)
    snap = await engine.store.get_order(order_id)
    assert snap.data["replaces"] is None
    assert "malformed" in (await _dropped_replaces(engine, order_id)).detail["refused"]


async def test_an_expired_certificate_renews_at_once_without_replaces_or_ari(
    engine: Engine,
) -> None:
    engine.ca.ari = True
    order_id = await installed(engine)
    cert = (await engine.store.get_order(order_id)).certificate
    assert cert is not None
    checks = engine.ca.count("renewal_info")
    engine.clock.set(cert.not_after + timedelta(days=3))  # the node was off for months
    await engine.worker().run_once()
    snap = await engine.store.get_order(order_id)
    assert snap.state == State.RENEW_DUE.value
    last = (await engine.store.journal(order_id))[-1]
    assert (last.trigger, last.detail["reason"]) == (Trigger.RENEWAL_DUE, "expired")
    assert engine.ca.count("renewal_info") == checks, "no ARI polling for an expired cert"
    await engine.drive_to(order_id, State.INSTALLED)
    assert (await engine.store.certificates(order_id=order_id))[1].replaces_cert_id is None


async def test_ari_outage_keeps_the_backstop_and_retries_later(engine: Engine) -> None:
    engine.ca.ari = True
    engine.ca.fail("renewal_info", TransientError("ARI endpoint timed out"))
    order_id = await installed(engine)
    snap = await engine.store.get_order(order_id)
    assert snap.state == State.INSTALLED.value
    assert snap.last_error_class is None, "an ARI blip is not an order error"
    assert snap.data["renewal"]["reason"] == "backstop"
    assert "ARI endpoint timed out" in snap.data["renewal"]["ari_error"]
    assert snap.next_run_at == engine.clock.now() + timedelta(hours=1)


async def test_short_lived_profile_renews_at_half_life(engine: Engine) -> None:
    engine.ca.lifetime = timedelta(hours=160)  # Let's Encrypt "shortlived"
    order_id = await installed(engine)
    snap = await engine.store.get_order(order_id)
    cert = snap.certificate
    assert cert is not None
    assert snap.next_run_at == cert.not_before + timedelta(hours=80)


async def test_profile_is_sent_with_the_order(engine: Engine) -> None:
    from dataclasses import replace

    engine.ports.settings = replace(engine.ports.settings, profile="tlsserver")
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    assert {o.profile for o in engine.ca.orders.values()} == {"tlsserver"}


async def test_lets_encrypt_order_reuse_makes_a_replayed_new_order_free(engine: Engine) -> None:
    """Boulder returns the pending order again for the same account, identifiers and profile:
    a crash after newOrder, before its URL was committed, costs nothing there."""
    from autotls.fsm.faults import FaultPlan, FaultPoint, FaultRule, InjectedCrash

    engine.ca.reuse_orders = True
    order = await engine.order()
    await engine.drive_to(order.id, State.REGISTERED)
    doomed = engine.worker(
        faults=FaultPlan([FaultRule(FaultPoint.AFTER_EFFECT, "Registered", 2, "raise")])
    )
    with pytest.raises(InjectedCrash):
        await engine.drive(doomed)
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("new_order") == 2
    assert len(engine.ca.orders) == 1, "the replayed newOrder got the same order back"
