"""The failure-injection suite (issue 12 §3): the real worker, steps and policy, with the real
adapters, against real Pebble, the local broker and challtestsrv -- through fault proxies that
follow a script (tests/fixtures/faultproxy.py).

Every scenario scripts one kind of fault at one request class (``times`` in a row), then lets the
requests through, and requires:

* the order ends Installed with no operator action;
* nothing is lost: the CA issued exactly one certificate for the order and it is the one
  installed; no extra ACME order, except where the fault ate the answer to a newOrder the CA
  had already created (Pebble 2.4.0 has no order reuse, so the replayed newOrder makes another);
* the journal shows each fault, in the step it hit, with its error class (and the Retry-After
  it waited); a DNS fault the engine waits out shows no error, and the challenge is never
  answered before the node saw its TXT value.

The results are printed as a table at the end of the session (tests/conftest.py).

Run it alone: ``.venv/bin/python -m pytest -m faultinjection tests``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from autotls.fsm.journal import is_valid_journal
from autotls.fsm.machine import State
from autotls.persistence.records import JournalRecord
from tests.fixtures.faultproxy import AFTER_UPSTREAM, Fault, FaultKind
from tests.fixtures.faultstack import RESULTS, FaultStack, ScenarioResult

pytestmark = [pytest.mark.faultinjection, pytest.mark.usefixtures("libp2p_installed")]

K = FaultKind
# What the journal shows for a DNS fault the engine simply waits out: nothing (the TXT check
# says "not visible yet" and polls again).
WAIT = "no error"
# A record the broker's DNS lost to another writer: the engine registers again.
TXT_TIMEOUT = "txt_timeout"
# Health trouble is an outage: wait max(1 h, min(Retry-After, 24 h)) (protocol.md §4).
OUTAGE_WAIT = 3600.0


@dataclass(frozen=True)
class Scenario:
    kind: FaultKind
    request_class: str
    step: State
    journal: str  # the error class each fault must show, or WAIT / TXT_TIMEOUT
    times: int = 1
    after: int = 0
    retry_after: int = 120  # what a RETRY_AFTER_503 sends
    waits: float | None = None  # the Retry-After the journal must record
    # aiohttp resends an idempotent request (GET, HEAD) once when the connection drops before
    # the answer's headers (RFC 9112 §9.3.1): the first such fault never reaches the engine.
    absorbed: int = 0
    # The wait outlived Pebble's one-hour pending authorization: the order is placed again
    # instead of waiting into it (fsm/policy.py, plan_lapsed).
    lapses: bool = False

    @property
    def surfaced(self) -> int:
        """How many faults the engine sees (each is one journal entry)."""
        return self.times - self.absorbed

    @property
    def id(self) -> str:
        parts = [self.kind.value, self.request_class]
        if self.after:
            parts.append(f"after{self.after}")
        if self.times > 1:
            parts.append(f"x{self.times}")
        return "-".join(parts)

    @property
    def extra_orders(self) -> int:
        """Orders the CA created whose answer the fault ate (each makes the replay a new one)."""
        lost = self.times if self.request_class == "newOrder" and self.kind in AFTER_UPSTREAM else 0
        return lost + (1 if self.lapses else 0)


T, R = "transient", "rate_limited"
S = State
SCENARIOS: list[Any] = [
    # New: the account.
    Scenario(K.HTML_503, "directory", S.NEW, T),
    Scenario(K.RESET, "directory", S.NEW, T, times=2, absorbed=1),
    Scenario(K.HANG, "directory", S.NEW, T),
    Scenario(K.TRUNCATED, "directory", S.NEW, T),
    Scenario(K.SLOW_LORIS, "directory", S.NEW, T),
    Scenario(K.HTML_502, "newNonce", S.NEW, T),
    Scenario(K.RESET, "newNonce", S.NEW, T, times=2, absorbed=1),
    Scenario(K.HTML_502, "newAccount", S.NEW, T),
    Scenario(K.JSON_500, "newAccount", S.NEW, T),
    Scenario(K.LOST_RESPONSE, "newAccount", S.NEW, T),
    Scenario(K.TRUNCATED, "newAccount", S.NEW, T),
    # Registered: the order.
    Scenario(K.HTML_502, "newOrder", S.REGISTERED, T),
    Scenario(K.RETRY_AFTER_503, "newOrder", S.REGISTERED, T, waits=120),
    Scenario(K.JSON_500, "newOrder", S.REGISTERED, T),
    Scenario(K.RESET, "newOrder", S.REGISTERED, T),
    Scenario(K.HANG, "newOrder", S.REGISTERED, T),
    Scenario(K.LOST_RESPONSE, "newOrder", S.REGISTERED, T),
    Scenario(K.TRUNCATED, "newOrder", S.REGISTERED, T),
    Scenario(K.SLOW_LORIS, "newOrder", S.REGISTERED, T),
    Scenario(K.HTML_502, "authz", S.REGISTERED, T),
    Scenario(K.TRUNCATED, "authz", S.REGISTERED, T),
    # Registered, before the order: the broker's health. An outage starts no authorization
    # clock, so none lapses and no order is placed twice.
    Scenario(K.HTML_502, "health", S.REGISTERED, R, waits=OUTAGE_WAIT),
    Scenario(K.RETRY_AFTER_503, "health", S.REGISTERED, R, retry_after=7200, waits=7200),
    Scenario(K.RESET, "health", S.REGISTERED, T, times=2, absorbed=1),
    Scenario(K.HANG, "health", S.REGISTERED, T),
    # Challenged: the broker. Its health again (an outage that began after the order: a wait
    # of an hour outlives Pebble's pending authorization), then the registration.
    Scenario(K.HTML_502, "health", S.CHALLENGED, R, after=1, waits=OUTAGE_WAIT, lapses=True),
    Scenario(K.HTML_502, "challenge_leg", S.CHALLENGED, T),
    Scenario(K.RETRY_AFTER_503, "challenge_leg", S.CHALLENGED, T, waits=120),
    Scenario(K.JSON_500, "challenge_leg", S.CHALLENGED, T),
    Scenario(K.RESET, "challenge_leg", S.CHALLENGED, T),
    Scenario(K.HANG, "challenge_leg", S.CHALLENGED, T),
    Scenario(K.TRUNCATED, "challenge_leg", S.CHALLENGED, T),
    # A captive portal or a misrouted load balancer: a broker protocol error (issue 8).
    Scenario(K.OK_INSTEAD_OF_CHALLENGE, "challenge_leg", S.CHALLENGED, T),
    Scenario(K.OK_INSTEAD_OF_CHALLENGE, "challenge_leg", S.CHALLENGED, T, times=5),
    Scenario(K.HTML_502, "registration_leg", S.CHALLENGED, T),
    Scenario(K.RETRY_AFTER_503, "registration_leg", S.CHALLENGED, T, waits=120),
    Scenario(K.JSON_500, "registration_leg", S.CHALLENGED, T),
    Scenario(K.RESET, "registration_leg", S.CHALLENGED, T),
    Scenario(K.HANG, "registration_leg", S.CHALLENGED, T),
    Scenario(K.LOST_RESPONSE, "registration_leg", S.CHALLENGED, T),
    Scenario(K.TRUNCATED, "registration_leg", S.CHALLENGED, T),
    Scenario(K.SLOW_LORIS, "registration_leg", S.CHALLENGED, T),
    # BrokerNotified: DNS.
    Scenario(K.PLACEHOLDER, "txt", S.BROKER_NOTIFIED, WAIT, times=3),
    Scenario(K.WRONG_VALUE, "txt", S.BROKER_NOTIFIED, WAIT, times=2),
    Scenario(K.NO_ANSWER, "txt", S.BROKER_NOTIFIED, T, times=2),
    Scenario(K.OVERWRITTEN, "txt", S.BROKER_NOTIFIED, TXT_TIMEOUT),
    # DNSPropagated: the challenge, the order poll (ready once the CA validated), finalize.
    Scenario(K.HTML_503, "challenge", S.DNS_PROPAGATED, T),
    Scenario(K.LOST_RESPONSE, "challenge", S.DNS_PROPAGATED, T),
    Scenario(K.TRUNCATED, "challenge", S.DNS_PROPAGATED, T),
    Scenario(K.SLOW_LORIS, "challenge", S.DNS_PROPAGATED, T),
    Scenario(K.RESET, "order", S.DNS_PROPAGATED, T),
    Scenario(K.HANG, "order", S.DNS_PROPAGATED, T),
    Scenario(K.HTML_502, "finalize", S.DNS_PROPAGATED, T),
    Scenario(K.RETRY_AFTER_503, "finalize", S.DNS_PROPAGATED, T, waits=120),
    Scenario(K.RESET, "finalize", S.DNS_PROPAGATED, T),
    Scenario(K.HANG, "finalize", S.DNS_PROPAGATED, T),
    Scenario(K.LOST_RESPONSE, "finalize", S.DNS_PROPAGATED, T),
    Scenario(K.TRUNCATED, "finalize", S.DNS_PROPAGATED, T),
    Scenario(K.SLOW_LORIS, "finalize", S.DNS_PROPAGATED, T),
    # Validated: the order after finalize.
    Scenario(K.HTML_502, "order", S.VALIDATED, T, after=1),
    Scenario(K.TRUNCATED, "order", S.VALIDATED, T, after=1),
    # Finalized: the download.
    Scenario(K.HTML_502, "certificate", S.FINALIZED, T),
    Scenario(K.RESET, "certificate", S.FINALIZED, T),
    Scenario(K.HANG, "certificate", S.FINALIZED, T),
    Scenario(K.LOST_RESPONSE, "certificate", S.FINALIZED, T),
    Scenario(K.TRUNCATED, "certificate", S.FINALIZED, T),
    Scenario(K.SLOW_LORIS, "certificate", S.FINALIZED, T),
]


def _param(item: Any) -> Any:
    return item if not isinstance(item, Scenario) else pytest.param(item, id=item.id)


def _errors(journal: list[JournalRecord]) -> list[JournalRecord]:
    return [entry for entry in journal if "error_class" in entry.detail]


def _shown(entry: JournalRecord) -> str:
    """How the table names what the journal says about one error."""
    detail = entry.detail
    if str(detail.get("message", "")).startswith("internal error"):
        return f"internal error ({detail['error_class']})"
    waited = detail.get("retry_after")
    return str(detail["error_class"]) + (f", waits {waited:g} s" if waited is not None else "")


def _note(scenario: Scenario, request: pytest.FixtureRequest) -> str:
    if scenario.lapses:
        return "the 1 h authorization lapsed: ordered again"
    return f"{scenario.absorbed} resent by aiohttp" if scenario.absorbed else ""


@pytest.mark.parametrize("scenario", [_param(s) for s in SCENARIOS])
async def test_scripted_fault_ends_installed_with_nothing_lost(
    fault_stack: FaultStack, scenario: Scenario, request: pytest.FixtureRequest
) -> None:
    stack, real = fault_stack, fault_stack.real
    stack.plan(
        {
            scenario.request_class: [
                Fault(scenario.kind, scenario.times, scenario.after, scenario.retry_after)
            ]
        }
    )
    order = await real.order()
    snap = await real.drive(real.worker(stack.ports()), order.id, [State.INSTALLED, State.FAILED])
    journal = await real.store.journal(order.id)
    certificates = await real.store.certificates(order_id=order.id)
    log = stack.log
    injected = log.faults()
    installed = snap.state == State.INSTALLED.value
    errors = _errors(journal)
    shown = sorted({_shown(e) for e in errors if e.from_state == scenario.step.value})
    if not shown:
        shown = [TXT_TIMEOUT if any(j.trigger == TXT_TIMEOUT for j in journal) else WAIT]
    RESULTS.append(
        ScenarioResult(
            fault=scenario.kind.value,
            step=scenario.step.value,
            request_class=scenario.request_class,
            injected=len(injected),
            survived=len(injected) if installed else 0,
            orders_lost=(0 if installed else 1) + max(0, log.finalized - len(certificates)),
            extra_orders=max(0, log.orders_created - 1),
            journal_classes=shown,
            note=_note(scenario, request),
        )
    )

    # Every scripted fault was injected, and the order came through with no operator action.
    assert stack.script.pending == {}
    assert len(injected) == scenario.times
    assert all(e.request_class == scenario.request_class for e in injected)
    assert installed, (snap.state, snap.last_error_message)
    assert is_valid_journal(journal)
    assert not any(j.trigger in ("fail", "retry") for j in journal)

    # Nothing lost: one certificate issued by the CA for this order, and it is installed.
    assert log.finalized == 1
    assert len(certificates) == 1
    assert snap.certificate is not None and snap.certificate.id == certificates[0].id
    assert log.orders_created == 1 + scenario.extra_orders

    # The journal shows each fault where it hit, with its class; none is an internal error.
    for entry in errors:
        assert not str(entry.detail.get("message", "")).startswith("internal error"), entry
    if scenario.journal == WAIT:
        assert errors == []
    elif scenario.journal == TXT_TIMEOUT:
        assert errors == []
        assert [j.trigger for j in journal].count(TXT_TIMEOUT) == scenario.times
    else:
        assert [(e.from_state, e.detail["error_class"]) for e in errors] == [
            (scenario.step.value, scenario.journal)
        ] * scenario.surfaced
        if scenario.waits is not None:
            assert [e.detail.get("retry_after") for e in errors] == [scenario.waits] * len(errors)
            # ...and the engine did wait exactly that long before asking again (a new order
            # waits at least that long, and until the old authorization is gone).
            fault = injected[-1]
            retry = next(e for e in log.of(scenario.request_class) if e.seq > fault.seq)
            waited = (retry.at - fault.at).total_seconds()
            if scenario.lapses:
                assert scenario.waits <= waited <= scenario.waits + 60
                [lapse] = [j for j in journal if j.trigger == "reorder"]
                assert lapse.from_state == scenario.step.value
            else:
                assert waited == scenario.waits

    # The challenge was answered only after the node's check saw its own TXT value.
    answered = [e.seq for e in log.of("challenge") if e.upstream_status == 200]
    assert answered, "the challenge was never answered"
    checks = [e for e in log.of("txt") if e.seq < answered[0]]
    assert checks and checks[-1].fault is None
    assert str(snap.data["dns_value"]) in checks[-1].answered
