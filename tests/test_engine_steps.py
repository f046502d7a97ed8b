"""Each step and each error class, against the in-memory fake ports (tests/fakes/ports.py)."""

from __future__ import annotations

import base64
import itertools
import json
import logging
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from autotls.fsm.errors import (
    AutoTLSError,
    ErrorClass,
    OrderInvalidError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from autotls.fsm.journal import is_valid_journal
from autotls.fsm.machine import InvalidTransitionError, State, Trigger
from autotls.fsm.ports import EngineSettings
from tests.fakes.ports import acme_problem
from tests.fixtures.engine import HAPPY_TRIGGERS, Engine


async def transitions(engine: Engine, order_id: int) -> list[str]:
    return [j.trigger for j in await engine.store.journal(order_id) if j.kind != "error"]


async def test_happy_path_installs_one_certificate(engine: Engine) -> None:
    order = await engine.order()
    snap = await engine.drive_to(order.id, State.INSTALLED)
    assert await transitions(engine, order.id) == HAPPY_TRIGGERS
    assert is_valid_journal(await engine.store.journal(order.id))
    certs = await engine.store.certificates(order_id=order.id)
    assert len(certs) == 1
    assert snap.certificate is not None and snap.certificate.id == certs[0].id
    assert engine.installer.installed == [(order.peer_id, certs[0].serial)]
    assert snap.cert_key_pem is None, "the in-flight key moves to the certificate row"
    assert certs[0].key_pem.startswith(b"-----BEGIN PRIVATE KEY")
    assert engine.ca.count("new_order") == 1 and engine.ca.count("finalize") == 1
    assert engine.broker.registrations == [(order.peer_id, snap.data["dns_value"])]
    # The Installed step then schedules renewal: with 1/3 of 90 days left, no ARI.
    assert await engine.worker().run_once() == 1
    snap = await engine.store.get_order(order.id)
    assert snap.next_run_at == certs[0].not_before + timedelta(days=60)
    assert snap.data["renewal"]["reason"] == "backstop"


def leak_marks(key_pem: bytes) -> list[str]:
    """What a leak of this private key would leave in a text: each long base64 line of its PEM
    (JSON escapes only the line ends) and its private value as a JWK, hex or decimal."""
    lines = [line for line in key_pem.decode().splitlines() if not line.startswith("-----")]
    marks = [line for line in lines if len(line) >= 16]
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    d = key.private_numbers().private_value
    raw = d.to_bytes((key.curve.key_size + 7) // 8, "big")
    marks += [base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), f"{d:x}", str(d)]
    return marks


async def test_journal_and_logs_never_hold_secrets(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    order = await engine.order()
    with caplog.at_level(logging.DEBUG, logger="autotls"):  # our own logs, all of them
        await engine.drive_to(order.id, State.INSTALLED)
    journal = await engine.store.journal(order.id)
    assert journal and caplog.records, "something to search"
    text = repr(journal) + json.dumps([j.detail for j in journal], default=str) + caplog.text
    accounts = await engine.store.accounts()
    certificates = await engine.store.certificates(order_id=order.id)
    secrets = [a.key_pem for a in accounts] + [c.key_pem for c in certificates]
    assert len(secrets) == 2, "the account key and the certificate key"
    for key_pem in secrets:
        marks = leak_marks(key_pem)
        # The marks do find a key written the way JSON or a repr would hold it.
        assert all(m in json.dumps({"key": key_pem.decode()}) for m in marks[:-3])
        assert [m for m in marks if m in text] == []


async def test_account_is_shared_and_registered_once(engine: Engine) -> None:
    first, second = await engine.order(), await engine.order()
    await engine.drive()
    a, b = await engine.store.get_order(first.id), await engine.store.get_order(second.id)
    assert a.state == b.state == State.INSTALLED.value
    assert a.account is not None and b.account is not None
    assert a.account.id == b.account.id
    assert len(await engine.store.accounts()) == 1
    assert len(engine.ca.accounts) == 1


async def test_transient_error_retries_with_backoff_and_keeps_state(engine: Engine) -> None:
    order = await engine.order()
    engine.ca.fail("new_order", TransientError("connection reset"))
    worker = engine.worker()
    await engine.drive_to(order.id, State.REGISTERED, worker)
    for _ in range(3):  # the intent, then the failing newOrder
        await worker.run_once()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.REGISTERED.value
    assert snap.attempts == 1
    assert snap.last_error_class == "transient"
    assert snap.last_error_message == "connection reset"
    delay = snap.next_run_at - engine.clock.now()
    assert timedelta(seconds=1) <= delay <= timedelta(seconds=2)
    errors = [j for j in await engine.store.journal(order.id) if j.kind == "error"]
    assert [e.trigger for e in errors] == [Trigger.RETRY_LATER]
    assert errors[0].detail["error_class"] == "transient"
    await engine.drive_to(order.id, State.INSTALLED, worker)
    assert (await engine.store.get_order(order.id)).attempts == 0


async def test_backoff_grows_and_survives_a_new_worker(engine: Engine) -> None:
    order = await engine.order()
    engine.ca.fail("register_account", *[TransientError("down")] * 4)
    await engine.worker().run_once()  # the account key
    delays = []
    for _ in range(4):
        worker = engine.worker()  # a fresh worker each time: the schedule lives in the row
        await worker.run_once()
        snap = await engine.store.get_order(order.id)
        if snap.last_error_class:
            delays.append((snap.next_run_at - engine.clock.now()).total_seconds())
        engine.clock.set(snap.next_run_at)
    assert len(delays) == 4
    assert all(later > earlier for earlier, later in itertools.pairwise(delays))
    assert (await engine.store.get_order(order.id)).attempts == 4


async def test_retry_after_wins_over_backoff(engine: Engine) -> None:
    order = await engine.order()
    engine.ca.fail("register_account", TransientError("503", retry_after=600))
    worker = engine.worker()
    await worker.run_once()  # account key
    await worker.run_once()  # register -> 503
    snap = await engine.store.get_order(order.id)
    assert snap.next_run_at == engine.clock.now() + timedelta(seconds=600)


async def test_rate_limited_waits_for_retry_after(engine: Engine) -> None:
    order = await engine.order()
    engine.ca.fail(
        "new_order", acme_problem("rateLimited", "too many orders", 429, retry_after=7200)
    )
    await engine.drive_to(order.id, State.REGISTERED)
    worker = engine.worker()
    await worker.run_once()
    await worker.run_once()
    snap = await engine.store.get_order(order.id)
    assert snap.last_error_class == ErrorClass.RATE_LIMITED.value
    assert snap.next_run_at == engine.clock.now() + timedelta(hours=2)
    await engine.drive_to(order.id, State.INSTALLED)


async def test_permanent_error_fails_with_problem_document(engine: Engine) -> None:
    order = await engine.order()
    engine.ca.fail("register_account", acme_problem("unauthorized", "account is deactivated", 403))
    await engine.drive()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.FAILED.value
    assert snap.last_error_class == "permanent"
    journal = await engine.store.journal(order.id)
    assert journal[-1].trigger == "fail"
    assert journal[-1].detail["problem"]["type"].endswith(":unauthorized")
    assert is_valid_journal(journal)
    # Failed orders are never claimed again.
    assert await engine.worker().run_once() == 0


async def test_failed_validation_reorders_within_budget(engine: Engine) -> None:
    engine.ca.validation = "invalid"
    order = await engine.order()
    await engine.drive_to(order.id, State.DNS_PROPAGATED)
    worker = engine.worker()
    await worker.run_once()  # answer
    engine.clock.advance(EngineSettings().first_poll_interval.total_seconds())  # first poll due
    await worker.run_once()  # order and authz invalid -> reorder
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.REGISTERED.value
    assert snap.last_error_class == "order_invalid"
    assert "TXT mismatch" in (snap.last_error_message or "")
    assert len(snap.data["validation_failures"]) == 1
    assert "order_url" not in snap.data
    assert snap.next_run_at == engine.clock.now() + timedelta(minutes=1)


async def test_validation_budget_holds_back_the_fourth_try(engine: Engine) -> None:
    engine.ca.validation = "invalid"
    order = await engine.order()
    start = engine.clock.now()
    orders_before = 0

    async def failures() -> int:
        return len((await engine.store.get_order(order.id)).data.get("validation_failures", []))

    async def three_failures() -> bool:
        return await failures() >= 3

    await engine.drive(until=three_failures)
    orders_before = engine.ca.count("new_order")
    snap = await engine.store.get_order(order.id)
    # 3 failures inside an hour spend the budget: the next order waits for the window.
    assert snap.next_run_at >= start + timedelta(hours=1)
    engine.ca.validation = "valid"
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("new_order") == orders_before + 1
    answered = engine.ca.count("answer_challenge")
    assert answered == 4, "never more than the budget of failed validations per hour"


async def test_account_lost_registers_again(engine: Engine) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.REGISTERED)
    engine.ca.forget_accounts()  # e.g. Pebble restarted
    await engine.drive_to(order.id, State.INSTALLED)
    triggers = await transitions(engine, order.id)
    assert "account_lost" in triggers
    assert engine.ca.count("register_account") == 2
    assert len(await engine.store.accounts()) == 1, "same key, same row: never a second account"


async def test_broker_down_waits_and_touches_nothing_at_the_ca(engine: Engine) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.CHALLENGED)
    engine.broker.healthy = False
    calls_before = len(engine.ca.calls)
    worker = engine.worker()
    await worker.run_once()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.CHALLENGED.value
    assert snap.last_error_class == "rate_limited"
    assert snap.next_run_at == engine.clock.now() + timedelta(hours=1)
    assert len(engine.ca.calls) == calls_before
    engine.broker.healthy = True
    await engine.drive_to(order.id, State.INSTALLED)


async def test_broker_errors_are_classified(engine: Engine) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.CHALLENGED)
    engine.broker.fail(TransientError("error testing addresses: dial timeout"))
    worker = engine.worker()
    await worker.run_once()
    snap = await engine.store.get_order(order.id)
    assert (snap.state, snap.last_error_class) == (State.CHALLENGED.value, "transient")
    engine.broker.fail(PermanentError("403 forbidden: denylisted"))
    engine.clock.set(snap.next_run_at)
    await worker.run_once()
    assert (await engine.store.get_order(order.id)).state == State.FAILED.value


async def test_dns_lag_polls_then_advances(engine: Engine) -> None:
    engine.dns.lag = 3
    order = await engine.order()
    await engine.drive_to(order.id, State.BROKER_NOTIFIED)
    await engine.drive_to(order.id, State.DNS_PROPAGATED)
    assert engine.dns.checks == 4
    # Polling is not journaled: only the transition is, with what each server answered.
    last = (await engine.store.journal(order.id))[-1]
    assert (last.trigger, last.detail["servers"]) == (Trigger.TXT_VISIBLE, {"ns1.fake": "ok"})


async def test_txt_never_visible_resends_then_reorders_without_answering(engine: Engine) -> None:
    engine.dns.never_visible = True
    engine.ports.settings = replace(engine.ports.settings, dns_poll_interval=timedelta(minutes=3))
    order = await engine.order()

    async def resent_three_times() -> bool:
        return (await transitions(engine, order.id)).count("txt_timeout") >= 3

    await engine.drive(until=resent_three_times)

    async def reordered() -> bool:
        return "reorder" in await transitions(engine, order.id)

    await engine.drive(until=reordered)
    assert engine.ca.count("answer_challenge") == 0, "never answer what DNS does not show"
    assert len(engine.broker.registrations) == 4
    assert is_valid_journal(await engine.store.journal(order.id))


async def test_pending_authorization_honours_retry_after(engine: Engine) -> None:
    engine.ca.pending_polls = 2
    engine.ca.retry_after = 17
    order = await engine.order()
    await engine.drive_to(order.id, State.DNS_PROPAGATED)
    worker = engine.worker()
    await worker.run_once()  # answer; the first poll on our schedule (no Retry-After yet)
    first = EngineSettings().first_poll_interval
    snap = await engine.store.get_order(order.id)
    assert snap.next_run_at == engine.clock.now() + first
    engine.clock.advance(first.total_seconds())
    await worker.run_once()  # pending, Retry-After 17
    snap = await engine.store.get_order(order.id)
    assert snap.next_run_at == engine.clock.now() + timedelta(seconds=17)
    await engine.drive_to(order.id, State.INSTALLED)


async def test_processing_order_is_polled_and_finalized_once(engine: Engine) -> None:
    engine.ca.processing_polls = 3
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("finalize") == 1


async def test_reused_authorization_skips_broker_and_dns(engine: Engine) -> None:
    engine.ca.reuse_authz = True
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    assert "authorization_reused" in await transitions(engine, order.id)
    assert engine.broker.registrations == []
    assert engine.dns.checks == 0


async def test_installer_rejection_is_permanent(engine: Engine) -> None:
    order = await engine.order()
    engine.installer.fail(PermanentError("certificate names the wrong domain"))
    await engine.drive()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.FAILED.value
    assert snap.cert_key_pem is not None, "nothing stored is lost on failure"


async def test_a_bug_is_class_internal_on_the_slow_schedule_and_never_fails_the_order(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # Let's Encrypt's 7-day pending authorization outlives the whole schedule below (a
    # shorter one makes the engine order anew instead: test_lets_encrypt_2027.py).
    engine.ca.authz_lifetime = timedelta(days=7)
    good = await engine.order()
    await engine.drive_to(good.id, State.INSTALLED)  # its polls move the clock: first
    bad = await engine.order()
    engine.broker.fail(*[ZeroDivisionError("bug")] * 6, peer=bad.peer_id)
    await engine.drive_to(bad.id, State.CHALLENGED)
    worker = engine.worker()
    delays = []
    with caplog.at_level(logging.INFO, logger="autotls"):
        for _ in range(6):
            await worker.run_once()
            snap = await engine.store.get_order(bad.id)
            assert (snap.state, snap.last_error_class) == (State.CHALLENGED.value, "internal")
            delays.append(snap.next_run_at - engine.clock.now())
            engine.clock.set(snap.next_run_at)
    # Let's Encrypt's schedule for failing issuance, and never Failed however long it lasts.
    minutes = [timedelta(minutes=m) for m in (1, 10, 100)]
    assert delays == [*minutes, timedelta(days=1), timedelta(days=1), timedelta(days=1)]
    assert snap.attempts == 6
    assert "internal error in step Challenged: ZeroDivisionError: bug" in (
        snap.last_error_message or ""
    )
    # One line per occurrence at the default level, no traceback below debug.
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and "bug" in r.getMessage()]
    assert len(lines) == 6 and all(r.exc_info is None for r in lines)
    assert all(r.levelno == logging.WARNING for r in lines)
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert debug == [], "the traceback is logged at debug only (caplog captured from INFO)"
    await engine.drive_to(bad.id, State.INSTALLED)  # the bug is gone: it resumes
    journal = await engine.store.journal(bad.id)
    internal = [j for j in journal if j.detail.get("error_class") == "internal"]
    assert [j.trigger for j in internal] == [Trigger.RETRY_LATER] * 6
    assert is_valid_journal(journal)


async def test_an_impossible_move_is_a_bug_not_a_failure(engine: Engine) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.FINALIZED)
    # A step that forgot what its destination needs: the guard refuses the move.
    engine.installer.fail(InvalidTransitionError("'certificate_installed' lacks data: x"))
    worker = engine.worker()
    await worker.run_once()  # the chain is downloaded and stored
    await worker.run_once()  # the install raises
    snap = await engine.store.get_order(order.id)
    assert (snap.state, snap.last_error_class) == (State.FINALIZED.value, "internal")
    await engine.drive_to(order.id, State.INSTALLED)


async def test_error_classes_from_every_port_reach_the_row(engine: Engine) -> None:
    cases: list[tuple[str, AutoTLSError, str]] = [
        ("get_authorization", TransientError("timeout"), "transient"),
        ("get_authorization", RateLimitedError("slow down", retry_after=30), "rate_limited"),
    ]
    order = await engine.order()
    await engine.drive_to(order.id, State.REGISTERED)
    worker = engine.worker()
    await worker.run_once()  # intent
    for n, (operation, error, klass) in enumerate(cases):
        engine.ca.fail(operation, error)
        await worker.run_once()
        snap = await engine.store.get_order(order.id)
        assert snap.last_error_class == klass
        if n == 0:  # the newOrder step fetches the authorization too: the order URL is kept
            assert snap.state == State.REGISTERED.value and snap.data["order_url"]
        engine.clock.set(snap.next_run_at)
    await engine.drive_to(order.id, State.INSTALLED, worker)
    assert engine.ca.count("new_order") == 1


async def test_order_invalid_outside_an_order_is_retried_not_reordered(engine: Engine) -> None:
    order = await engine.order()
    engine.ca.fail("register_account", OrderInvalidError("odd"))
    worker = engine.worker()
    await worker.run_once()
    await worker.run_once()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.NEW.value
    assert snap.last_error_class == "order_invalid"


async def test_crash_after_answering_never_answers_twice(engine: Engine) -> None:
    from autotls.fsm.faults import FaultPlan, FaultPoint, FaultRule, InjectedCrash

    order = await engine.order()
    await engine.drive_to(order.id, State.DNS_PROPAGATED)
    doomed = engine.worker(
        faults=FaultPlan([FaultRule(FaultPoint.AFTER_EFFECT, "DNSPropagated", 1, "raise")])
    )
    with pytest.raises(InjectedCrash):
        await doomed.run_once()
    assert engine.ca.count("answer_challenge") == 1
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("answer_challenge") == 1


async def test_operator_moves_drop_the_steps_own_wait_note(engine: Engine) -> None:
    from autotls.fsm import operator

    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    await engine.worker().run_once()
    assert "renewal at" in (await engine.store.get_order(order.id)).data["waiting_for"]
    snap = await operator.force_renewal(engine.store, order.id, now=engine.clock.now(), actor="op")
    assert snap.state == State.RENEW_DUE.value
    assert "waiting_for" not in snap.data


async def test_a_dead_stored_order_is_replaced_after_a_pause_not_in_a_loop(engine: Engine) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.REGISTERED)
    worker = engine.worker()
    await worker.run_once()  # intent
    engine.ca.fail("get_authorization", TransientError("timeout"))
    await worker.run_once()  # newOrder: the URL is stored (its authorization is not fetched)
    snap = await engine.store.get_order(order.id)
    engine.ca.orders[snap.data["order_url"]].status = "invalid"  # e.g. expired during an outage
    engine.clock.set(snap.next_run_at)
    await worker.run_once()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.REGISTERED.value and "order_url" not in snap.data
    assert snap.next_run_at == engine.clock.now() + timedelta(minutes=1)
    # The per-order history says why the stored order went (a declared move that stays).
    last = (await engine.store.journal(order.id))[-1]
    assert (last.from_state, last.to_state, last.trigger) == (
        State.REGISTERED.value,
        State.REGISTERED.value,
        Trigger.ABANDON_ORDER,
    )
    assert "stored order is invalid" in last.detail["reason"]
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("new_order") == 2
    assert is_valid_journal(await engine.store.journal(order.id))


async def test_happy_path_asks_the_ca_nothing_twice(engine: Engine) -> None:
    # newOrder's authorization is fetched once; the answer goes without a fetch (the first
    # claim after the TXT was seen); the order is polled once to find it ready (and finalized
    # in that step) and once to find it valid.
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    calls = {op: engine.ca.count(op) for op in ("get_authorization", "get_order", "new_order")}
    assert calls == {"get_authorization": 1, "get_order": 2, "new_order": 1}
    assert engine.ca.count("answer_challenge") == 1 and engine.ca.count("finalize") == 1
    journal = await engine.store.journal(order.id)
    assert [j.trigger for j in journal if j.kind != "error"] == list(HAPPY_TRIGGERS)
