"""Ready for Let's Encrypt in 2027 (issue 10 §4, protocol.md §6): the real engine, the real ACME
client and adapter and the real installer, against FakeAcmeServer -- a fake, because Pebble
2.4.0 has no profiles, ARI, order and authorization lifetimes, or chains shaped like Let's
Encrypt's Gen Y hierarchy -- with Let's Encrypt's real lifetimes, on an injected clock.

* The default profile's certificates go from 90 to 64 days on 2027-02-10 and to 45 days on
  2028-02-16: renewal stays at the ARI window, or (no ARI) at 1/3 of the lifetime left.
* ``shortlived`` (160-hour certificates, 1-hour pending authorizations, 8-hour orders)
  completes, and no wait of the retry schedule outlives the order's authorization: the
  engine orders anew instead of waiting into an expired one (Boulder answers 404 for it).
* ``--preferred-chain`` never selects a chain that does not build to the trust roots.
* Challenge types we do not know (``dns-persist-01``) are ignored; ``dns-01`` does the work.

Broker and DNS are the in-memory fakes of tests/fakes/ports.py (their real counterparts are
exercised elsewhere); the fake CA validates against what the fake broker published.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from autotls.acme.messages import Authorization
from autotls.acme.problems import AcmeProtocolError
from autotls.adapters import AcmeAdapter
from autotls.fsm import operator
from autotls.fsm.clock import ManualClock
from autotls.fsm.errors import (
    AutoTLSError,
    InternalError,
    LocalIOError,
    MisconfiguredError,
    RateLimitedError,
    TransientError,
)
from autotls.fsm.machine import ACTIVE_STATES, State
from autotls.fsm.outcomes import Wait
from autotls.fsm.policy import plan_error, plan_outcome
from autotls.fsm.ports import AcmeAccount, EngineSettings, Ports
from autotls.fsm.renewal import backstop_time
from autotls.fsm.steps import AUTHZ_EXPIRY_MARGIN
from autotls.fsm.worker import Worker, run_until_idle
from autotls.install import Installer
from autotls.persistence.records import CertificateRecord, OrderSnapshot
from autotls.persistence.store import Store
from tests.fakes.acme_server import (
    DNS_PERSIST_01,
    GEN_Y_ROOT_CN,
    ROOT_CN,
    FakeAcmeServer,
    classic_lifetime,
)
from tests.fakes.ports import FakeBroker, FakeDns
from tests.fixtures.engine import claimed_snapshot, identifier_for, new_peer

BACKDATE = timedelta(minutes=1)  # the fake, like Boulder, backdates notBefore
PRE_VALIDATION = (State.CHALLENGED.value, State.BROKER_NOTIFIED.value, State.DNS_PROPAGATED.value)


@dataclass
class LetsEncrypt:
    clock: ManualClock
    ca: FakeAcmeServer
    acme: AcmeAdapter
    dns: FakeDns
    broker: FakeBroker
    installer: Installer
    store: Store
    ports: Ports
    worker: Worker

    async def order(self) -> int:
        peer = new_peer()
        snap = await operator.create_order(
            self.store, peer, identifier_for(peer), now=self.clock.now()
        )
        return snap.id

    async def snap(self, order_id: int) -> OrderSnapshot:
        return await self.store.get_order(order_id)

    async def certificates(self, order_id: int) -> list[CertificateRecord]:
        return await self.store.certificates(order_id=order_id)

    async def drive(
        self,
        order_id: int,
        until: Callable[[OrderSnapshot], Awaitable[bool] | bool],
        *,
        watch: Callable[[OrderSnapshot], None] | None = None,
        max_rounds: int = 20_000,
    ) -> OrderSnapshot:
        """Run the worker, jumping the clock to each next due time, until ``until`` holds;
        ``watch`` sees the order after every round (to assert invariants or to script the
        outside world)."""

        async def stop() -> bool:
            snap = await self.snap(order_id)
            if watch is not None:
                watch(snap)
            assert snap.state != State.FAILED.value, (snap.last_error_message, snap.data)
            done = until(snap)
            return bool(await done if not isinstance(done, bool) else done)

        await run_until_idle(
            self.worker, advance_clock=self.clock.set, stop_when=stop, max_rounds=max_rounds
        )
        return await self.snap(order_id)

    async def installed(self, order_id: int, count: int = 1) -> list[CertificateRecord]:
        async def enough(snap: OrderSnapshot) -> bool:
            return (
                snap.state == State.INSTALLED.value
                and len(await self.certificates(order_id)) >= count
            )

        await self.drive(order_id, enough)
        return await self.certificates(order_id)


class MakeLetsEncrypt(Protocol):
    async def __call__(
        self,
        start: datetime,
        *,
        profile: str | None = ...,
        ari: bool = ...,
        chains: str = ...,
        trust: Sequence[str] = ...,
        preferred_chain: str | None = ...,
        broker: FakeBroker | None = ...,
        ca_behind: timedelta = ...,
    ) -> LetsEncrypt: ...


@pytest.fixture
async def lets_encrypt(tmp_path: Path) -> AsyncIterator[MakeLetsEncrypt]:
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            start: datetime,
            *,
            profile: str | None = None,
            ari: bool = False,
            chains: str = "single",
            trust: Sequence[str] = ("old",),
            preferred_chain: str | None = None,
            broker: FakeBroker | None = None,
            ca_behind: timedelta = timedelta(0),
        ) -> LetsEncrypt:
            clock = ManualClock(start)
            dns = broker.dns if broker is not None else FakeDns()

            async def published(identifier: str, expected: str) -> bool:
                return dns.records.get(f"_acme-challenge.{identifier}") == expected

            def ca_now() -> datetime:
                return clock.now() - ca_behind

            ca = await stack.enter_async_context(
                FakeAcmeServer(now=ca_now, ari=ari, chains=chains, validator=published)
            )
            pems = {"old": ca.root_pem, "gen-y": ca.gen_y_root_pem if chains != "single" else ""}
            roots = [x509.load_pem_x509_certificate(pems[name].encode()) for name in trust]
            acme = AcmeAdapter(
                ca.directory_url, preferred_chain=preferred_chain, trust_roots=roots, clock=clock
            )
            stack.push_async_callback(acme.close)
            installer = Installer(tmp_path / "data", trust_roots=roots, clock=clock)
            store = await Store.open(f"sqlite:///{tmp_path / 'engine.db'}")
            stack.push_async_callback(store.close)
            broker = broker or FakeBroker(dns)
            ports = Ports(
                acme=acme,
                broker=broker,
                dns=dns,
                installer=installer,
                clock=clock,
                settings=EngineSettings(profile=profile),
                rng=random.Random(7),
            )
            worker = Worker(store, ports, worker_id="w1", concurrency=1)
            return LetsEncrypt(clock, ca, acme, dns, broker, installer, store, ports, worker)

        yield make


def lifetime(cert: CertificateRecord) -> timedelta:
    return cert.not_after - cert.not_before - BACKDATE


def issued_at(cert: CertificateRecord) -> datetime:
    return cert.not_before + BACKDATE


# -- the default profile: 90 -> 64 -> 45 days ----------------------------------------------


async def test_backstop_renewal_follows_the_lifetime_cuts_of_2027_and_2028(
    lets_encrypt: MakeLetsEncrypt,
) -> None:
    le = await lets_encrypt(datetime(2026, 12, 20, tzinfo=UTC))  # no ARI
    order_id = await le.order()

    async def renewed_a_45_day_certificate(snap: OrderSnapshot) -> bool:
        certs = await le.certificates(order_id)
        return any(lifetime(c) == timedelta(days=45) for c in certs[:-1])

    await le.drive(order_id, renewed_a_45_day_certificate)
    certs = await le.certificates(order_id)
    lifetimes = [lifetime(c).days for c in certs]
    assert lifetimes[0] == 90 and lifetimes[-1] == 45
    assert set(lifetimes) == {90, 64, 45}
    assert lifetimes == sorted(lifetimes, reverse=True)
    for cert in certs:
        assert lifetime(cert) == classic_lifetime(issued_at(cert)), cert.serial
    # The first renewal crosses 2027-02-10: a 90-day certificate renewed at 1/3 left...
    assert issued_at(certs[1]) == datetime(2027, 2, 17, 23, 59, 40, tzinfo=UTC)
    assert lifetime(certs[1]) == timedelta(days=64)
    # ...and every certificate is renewed with 1/3 of its own lifetime left, whatever it is.
    for cert, successor in itertools.pairwise(certs):
        assert issued_at(successor) == backstop_time(cert.not_before, cert.not_after)
        assert successor.replaces_cert_id is None  # no ARI, no `replaces`
    assert min(issued_at(c) for c in certs if lifetime(c).days == 45) >= datetime(
        2028, 2, 16, tzinfo=UTC
    )
    renewals = [j for j in await le.store.journal(order_id) if j.trigger == "renewal_due"]
    assert [j.detail["reason"] for j in renewals] == ["backstop"] * (len(certs) - 1)


async def test_ari_renewal_stays_in_the_window_across_the_2027_cut(
    lets_encrypt: MakeLetsEncrypt,
) -> None:
    le = await lets_encrypt(datetime(2027, 1, 1, tzinfo=UTC), ari=True)
    le.ca.ari_retry_after = "86400"  # the longest re-check we honour: fewer idle wake-ups
    order_id = await le.order()
    certs = await le.installed(order_id, count=3)
    assert [lifetime(c).days for c in certs] == [90, 64, 64]
    for cert, successor in itertools.pairwise(certs):
        # The fake's window: the middle of the last third of the lifetime (renewal
        # planned in it, at a random moment, with `replaces`).
        span = cert.not_after - cert.not_before
        start = cert.not_before + span * 2 / 3
        end = start + span / 6
        assert start - timedelta(seconds=1) <= issued_at(successor) <= end, cert.serial
        assert successor.replaces_cert_id == cert.cert_id
    renewals = [j for j in await le.store.journal(order_id) if j.trigger == "renewal_due"]
    assert [j.detail["reason"] for j in renewals] == ["ari", "ari"]
    # The 64-day certificate is renewed in its own window (by 5/6 of 64 days), not in one
    # computed for 90 days (60 days or later).
    assert issued_at(certs[2]) - issued_at(certs[1]) < timedelta(days=64 * 5 / 6 + 1)


# -- shortlived: 160-hour certificates, 1-hour authorizations, 8-hour orders ------------


async def test_shortlived_issues_and_renews_at_half_life(lets_encrypt: MakeLetsEncrypt) -> None:
    le = await lets_encrypt(datetime(2027, 3, 1, tzinfo=UTC), profile="shortlived")
    order_id = await le.order()
    certs = await le.installed(order_id, count=3)
    assert all(lifetime(c) == timedelta(hours=160) for c in certs)
    for cert, successor in itertools.pairwise(certs):
        assert issued_at(successor) == cert.not_before + (cert.not_after - cert.not_before) / 2
    assert {o.profile for o in le.ca.orders.values()} == {"shortlived"}
    # What the engine recorded of the last order: a 1-hour authorization in an 8-hour order.
    data = (await le.snap(order_id)).data
    placed = issued_at(certs[-1])
    assert datetime.fromisoformat(data["authz_expires"]) == placed + timedelta(hours=1)
    assert datetime.fromisoformat(data["order_expires"]) == placed + timedelta(hours=8)


def lapse_watch(le: LetsEncrypt) -> Callable[[OrderSnapshot], None]:
    """The invariant: while an order waits on a pending authorization, its next run is
    before that authorization (or its order) expires; and the CA never had to answer for an
    expired authorization."""

    def watch(snap: OrderSnapshot) -> None:
        assert not [p for p in le.ca.problems if "Expired authorization" in p[2]]
        if snap.state not in PRE_VALIDATION:
            return
        expiries = [
            datetime.fromisoformat(snap.data[k])
            for k in ("authz_expires", "order_expires")
            if snap.data.get(k)
        ]
        assert snap.next_run_at <= min(expiries) - AUTHZ_EXPIRY_MARGIN, (
            snap.state,
            snap.next_run_at,
            min(expiries),
            snap.last_error_message,
        )

    return watch


class ClockedBroker(FakeBroker):
    """A broker in trouble until ``until`` on the clock: unhealthy, or registering with
    ``error`` (a transient failure, or a bug). ``healthy_checks``: health checks answered
    well before the trouble shows (1: the outage begins once the order is placed)."""

    def __init__(
        self,
        clock: ManualClock,
        until: datetime,
        *,
        error: BaseException | None = None,
        healthy_checks: int = 0,
    ) -> None:
        super().__init__(FakeDns())
        self.clock = clock
        self.until = until
        self.error = error
        self.healthy_checks = healthy_checks

    async def health(self) -> Any:
        early = self.health_checks < self.healthy_checks
        self.healthy = early or self.error is not None or self.clock.now() >= self.until
        return await super().health()

    async def register(self, peer_id: str, value: str) -> Sequence[str]:
        if self.error is not None and self.clock.now() < self.until:
            raise self.error
        return await super().register(peer_id, value)


SHORT_START = datetime(2027, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "trouble",
    [
        "broker unhealthy for 90 min once the order is placed",
        "broker registration times out for 2 h",
        "a bug in the broker step for 2 h",
        "CA answers 503 with Retry-After 1 h",
        "validation takes 2 h",
    ],
)
async def test_shortlived_retry_schedule_never_outlives_the_authorization(
    lets_encrypt: MakeLetsEncrypt, trouble: str
) -> None:
    clock_for_broker = ManualClock(SHORT_START)  # replaced below by the stack's own clock
    broker: FakeBroker | None = None
    if trouble.startswith("broker unhealthy"):
        # The check before the order passes; the one in Challenged meets the outage.
        broker = ClockedBroker(
            clock_for_broker, SHORT_START + timedelta(minutes=90), healthy_checks=1
        )
        broker.wait_s = 3600.0
    elif trouble.startswith("broker registration"):
        broker = ClockedBroker(
            clock_for_broker,
            SHORT_START + timedelta(hours=2),
            error=TransientError("broker registration timed out"),
        )
    elif trouble.startswith("a bug"):
        broker = ClockedBroker(
            clock_for_broker, SHORT_START + timedelta(hours=2), error=RuntimeError("oops")
        )
    le = await lets_encrypt(SHORT_START, profile="shortlived", broker=broker)
    if isinstance(broker, ClockedBroker):
        broker.clock = le.clock
    scripted: set[str] = set()
    invariant = lapse_watch(le)

    def watch(snap: OrderSnapshot) -> None:
        invariant(snap)
        if snap.state != State.DNS_PROPAGATED.value or not snap.data.get("answered_at"):
            return
        if trouble.startswith("CA answers 503") and "503" not in scripted:
            scripted.add("503")
            le.ca.unavailable_next("order", retry_after="3600")  # the poll after the answer
        if trouble.startswith("validation takes") and "slow" not in scripted:
            scripted.add("slow")
            le.ca.authz_retry_after = "300"
            url = str(snap.data["authz_url"])
            le.ca.authorizations[url.rsplit("/", 1)[-1]].pending_polls_left = 24

    order_id = await le.order()
    await le.drive(order_id, lambda s: s.state == State.INSTALLED.value, watch=watch)
    snap = await le.snap(order_id)
    [cert] = await le.certificates(order_id)
    assert lifetime(cert) == timedelta(hours=160)
    reorders = [j for j in await le.store.journal(order_id) if j.trigger == "reorder"]
    assert reorders, "the first order's authorization expired: a new order was due"
    assert len(le.ca.orders) == len(reorders) + 1
    # Nothing failed at the CA: no failed validation counted against the budget.
    assert not snap.data.get("validation_failures")


async def test_a_broker_outage_before_the_order_costs_no_order(
    lets_encrypt: MakeLetsEncrypt,
) -> None:
    """The broker's health is checked before newOrder: an outage longer than a shortlived
    pending authorization (1 h) starts no authorization clock, so no order lapses and none
    is placed again."""
    broker = ClockedBroker(ManualClock(SHORT_START), SHORT_START + timedelta(minutes=150))
    broker.wait_s = 3600.0
    le = await lets_encrypt(SHORT_START, profile="shortlived", broker=broker)
    broker.clock = le.clock
    order_id = await le.order()
    await le.drive(order_id, lambda s: s.state == State.INSTALLED.value)
    journal = await le.store.journal(order_id)
    waits = [j for j in journal if j.detail.get("error_class") == "rate_limited"]
    assert [(j.from_state, j.detail["retry_after"]) for j in waits] == [
        (State.REGISTERED.value, 3600.0)
    ] * 3
    assert not [j for j in journal if j.trigger == "reorder"]
    assert len(le.ca.orders) == 1
    [order] = le.ca.orders.values()
    assert le.clock.now() >= SHORT_START + timedelta(minutes=150)
    assert order.expires > SHORT_START + timedelta(minutes=150), "ordered after the outage"


async def test_an_order_that_lapses_while_the_ca_rate_limits_finalize_is_placed_again(
    lets_encrypt: MakeLetsEncrypt,
) -> None:
    """In Validated the order may already be finalized, so the engine waits for the CA's
    word (a finalized order stays valid past its expiry); when the CA's Retry-After outlived
    the 8-hour order, the order is placed again -- not counted as a failed validation."""
    le = await lets_encrypt(SHORT_START, profile="shortlived")
    le.ca.rate_limit_next("finalize", retry_after=str(9 * 3600))
    order_id = await le.order()
    await le.drive(order_id, lambda s: s.state == State.INSTALLED.value)
    snap = await le.snap(order_id)
    assert not snap.data.get("validation_failures")
    assert len(le.ca.orders) == 2
    first = min(le.ca.orders.values(), key=lambda o: o.expires)
    assert not first.finalized
    [cert] = await le.certificates(order_id)
    assert issued_at(cert) >= SHORT_START + timedelta(hours=9)


async def test_a_worker_back_after_the_authorization_expired_orders_again(
    lets_encrypt: MakeLetsEncrypt,
) -> None:
    """The node was off for two hours with an order in Challenged: its authorization is
    gone (Boulder would answer 404), so neither the broker nor the CA is asked about it."""
    le = await lets_encrypt(SHORT_START, profile="shortlived")
    order_id = await le.order()
    await le.drive(order_id, lambda s: s.state == State.CHALLENGED.value)
    le.clock.advance(hours=2)
    await le.drive(order_id, lambda s: s.state == State.INSTALLED.value, watch=lapse_watch(le))
    assert len(le.broker.registrations) == 1, "the lapsed authorization's value was not sent"
    assert len(le.ca.orders) == 2


async def test_a_clock_an_hour_ahead_of_the_ca_does_not_make_the_engine_order_in_a_loop(
    lets_encrypt: MakeLetsEncrypt,
) -> None:
    """Our clock 59 minutes ahead of the CA's: every 1-hour authorization looks dead on
    arrival. No deadline can be trusted then, so the engine goes on as the CA says -- one
    order, not a new one every round."""
    le = await lets_encrypt(SHORT_START, profile="shortlived", ca_behind=timedelta(minutes=59))
    order_id = await le.order()
    [cert] = await le.installed(order_id)
    assert len(le.ca.orders) == 1
    assert not [j for j in await le.store.journal(order_id) if j.trigger == "reorder"]
    assert lifetime(cert) == timedelta(hours=160)


# -- chains: never one that does not build to the trust roots -------------------------------


def top_issuer(chain_pem: str) -> str:
    top = x509.load_pem_x509_certificates(chain_pem.encode())[-1]
    return str(top.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


@pytest.mark.parametrize(
    ("chains", "trust", "preferred", "served"),
    [
        # The preference names the new root, which this store lacks: the default is served.
        ("cross-signed", ("old",), GEN_Y_ROOT_CN, ROOT_CN),
        # The store has the new root: the preference is honoured.
        ("cross-signed", ("old", "gen-y"), GEN_Y_ROOT_CN, GEN_Y_ROOT_CN),
        # The CA's default ends at the new root the store lacks: the cross-signed one.
        ("gen-y", ("old",), None, ROOT_CN),
        ("gen-y", ("old",), GEN_Y_ROOT_CN, ROOT_CN),
        # No preference and a default that builds: the default.
        ("cross-signed", ("old", "gen-y"), None, ROOT_CN),
        ("gen-y", ("old", "gen-y"), None, GEN_Y_ROOT_CN),
        # No trust roots configured (e.g. staging): nothing to check, the preference decides.
        ("cross-signed", (), GEN_Y_ROOT_CN, GEN_Y_ROOT_CN),
    ],
)
async def test_the_served_chain_builds_to_the_trust_roots(
    lets_encrypt: MakeLetsEncrypt,
    chains: str,
    trust: tuple[str, ...],
    preferred: str | None,
    served: str,
) -> None:
    le = await lets_encrypt(
        datetime(2027, 3, 1, tzinfo=UTC),
        profile="shortlived",
        chains=chains,
        trust=trust,
        preferred_chain=preferred,
    )
    order_id = await le.order()
    [cert] = await le.installed(order_id)
    assert top_issuer(cert.chain_pem) == served
    fullchain = (le.installer.certificate_dir((await le.snap(order_id)).peer_id)) / "fullchain.pem"
    assert fullchain.read_text() == cert.chain_pem
    assert le.ca.count("certificate") == 2, "the default chain and its one alternate"


# -- challenge types we do not know ----------------------------------------------------------


async def test_unknown_challenge_types_are_ignored_and_dns_01_does_the_work(
    lets_encrypt: MakeLetsEncrypt,
) -> None:
    le = await lets_encrypt(datetime(2027, 3, 1, tzinfo=UTC))
    le.ca.extra_challenges = [
        DNS_PERSIST_01,
        # A type from a draft yet to come, with fields of its own (a token that is not a
        # string, a status and members we have never heard of).
        {"type": "dns-02", "status": "queued", "token": {"v": 2}, "x-fields": [1, 2]},
    ]
    order_id = await le.order()

    def unhindered(snap: OrderSnapshot) -> None:
        assert snap.last_error_message is None, snap.last_error_message

    await le.drive(order_id, lambda s: s.state == State.INSTALLED.value, watch=unhindered)
    [cert] = await le.certificates(order_id)
    assert lifetime(cert) == timedelta(days=64)
    answered = [p for e, p in le.ca.payloads if e == "challenge" and p is not None]
    assert answered == [{}]
    assert not le.ca.problems


async def test_a_valid_authorization_that_lists_only_dns_persist_01_is_reused(
    lets_encrypt: MakeLetsEncrypt,
) -> None:
    """Boulder shows a valid authorization with the challenge that validated it only; when
    that was dns-persist-01 there is no dns-01 to take, and none is needed: the order goes
    from Challenged straight to Validated, bothering neither the broker nor DNS."""
    le = await lets_encrypt(datetime(2027, 3, 1, tzinfo=UTC))
    le.ca.extra_challenges = [DNS_PERSIST_01]
    le.ca.standing_validation = "dns-persist-01"
    order_id = await le.order()
    await le.drive(order_id, lambda s: s.state == State.INSTALLED.value)
    assert len(await le.certificates(order_id)) == 1
    triggers = [j.trigger for j in await le.store.journal(order_id)]
    assert triggers == [
        "create",
        "account_ready",
        "order_placed",
        "authorization_reused",
        "certificate_issued",
        "certificate_installed",
    ]
    assert le.broker.registrations == []
    assert not [e for e, _ in le.ca.payloads if e == "challenge"], "no challenge answered"
    [authz] = le.ca.authorizations.values()
    body = le.ca._authz_json(authz)
    assert [c["type"] for c in body["challenges"]] == ["dns-persist-01"]


async def test_the_fake_ca_lists_the_unknown_challenges_first() -> None:
    """What the test above relies on: the authorization really lists them."""
    async with FakeAcmeServer() as ca:
        ca.extra_challenges = [DNS_PERSIST_01]
        adapter = AcmeAdapter(ca.directory_url)
        try:
            key = adapter.generate_account_key()
            registered = await adapter.register_account(AcmeAccount(key, None))
            account = AcmeAccount(key, registered.url)
            order = await adapter.new_order(
                account, "*.example.libp2p.direct", profile=None, replaces=None
            )
            authz = await adapter.get_authorization(account, order.authorizations[0])
        finally:
            await adapter.close()
    assert [c.type for c in authz.challenges] == ["dns-persist-01", "dns-01"]
    assert authz.challenge("dns-01") is not None


# -- the rule itself, for every error class and wait ---------------------------------------

NOW = datetime(2027, 6, 1, tzinfo=UTC)
IN_FLIGHT = {
    "order_url": "https://ca/order/1",
    "authz_url": "https://ca/authz/1",
    "challenge_url": "https://ca/chall/1",
    "dns_value": "v",
    "broker_sent_at": NOW.isoformat(),
    "txt_seen_at": NOW.isoformat(),
    "authz_valid_at": NOW.isoformat(),
    "order_expires": (NOW + timedelta(hours=8)).isoformat(),
}


def in_flight(state: State, authz_left: timedelta, attempts: int) -> OrderSnapshot:
    return claimed_snapshot(
        state,
        NOW,
        data={**IN_FLIGHT, "authz_expires": (NOW + authz_left).isoformat()},
        attempts=attempts,
    )


TROUBLE = st.one_of(
    st.builds(TransientError, st.just("timeout"), retry_after=st.none() | st.floats(0, 2e5)),
    st.builds(RateLimitedError, st.just("429"), retry_after=st.none() | st.floats(0, 2e5)),
    st.builds(InternalError, st.just("bug")),
    st.builds(MisconfiguredError, st.just("setting")),
    st.builds(LocalIOError, st.just("disk full")),
)


@settings(max_examples=300, deadline=None)
@given(
    # Every state a worker steps (a Failed order is never claimed: no step, no error to plan).
    state=st.sampled_from(list(ACTIVE_STATES)),
    authz_left=st.integers(0, 10 * 3600).map(lambda s: timedelta(seconds=s)),
    attempts=st.integers(0, 30),
    trouble=st.one_of(TROUBLE, st.integers(0, 10**6)),
)
def test_no_planned_retry_outlives_the_pending_authorization(
    state: State, authz_left: timedelta, attempts: int, trouble: AutoTLSError | int
) -> None:
    """For every error class, backoff attempt and Retry-After, and for a step's own wait of
    any length: an order that needs its pending authorization is due again before the
    authorization expires, or is re-ordered (not before the old one is gone, and without
    counting a failed validation). Elsewhere nothing changes."""
    snap = in_flight(state, authz_left, attempts)
    if isinstance(trouble, int):
        outcome = Wait(NOW + timedelta(seconds=trouble), "polling")
        plan = plan_outcome(snap, outcome, NOW)
        unchanged = (snap.state, NOW + timedelta(seconds=trouble))
    else:
        plan = plan_error(snap, trouble, NOW, EngineSettings(), random.Random(attempts))
        unchanged = None
    lapses = min(NOW + authz_left, NOW + timedelta(hours=8))
    if state in (State.CHALLENGED, State.BROKER_NOTIFIED, State.DNS_PROPAGATED):
        if plan.to_state == state.value:
            assert plan.next_run_at <= lapses - AUTHZ_EXPIRY_MARGIN
        else:
            assert plan.to_state == State.REGISTERED.value
            assert plan.journal is not None and plan.journal.trigger == "reorder"
            assert plan.next_run_at > lapses
            assert not set(plan.data) & {"order_url", "authz_url", "authz_expires", "dns_value"}
            assert "validation_failures" not in plan.data
    elif unchanged is not None:
        assert (plan.to_state, plan.next_run_at) == unchanged
    if not isinstance(trouble, int) and state not in (
        State.CHALLENGED,
        State.BROKER_NOTIFIED,
        State.DNS_PROPAGATED,
    ):
        assert plan.journal is None or plan.journal.trigger != "reorder"


# -- the parser: what it skips and what it still refuses --------------------------------------


def authorization(*challenges: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": "pending",
        "expires": "2027-06-01T01:00:00Z",
        "identifier": {"type": "dns", "value": "k51x.libp2p.direct"},
        "wildcard": True,
        "challenges": list(challenges),
    }


DNS_01 = {"type": "dns-01", "url": "https://ca/chall/1", "status": "pending", "token": "tok"}


def test_challenges_of_unknown_types_never_make_an_authorization_unreadable() -> None:
    persist = {**DNS_PERSIST_01, "url": "https://ca/chall/2"}
    odd = {"type": "dns-02", "status": "queued", "token": {"v": 2}, "url": 7}
    parsed = Authorization.parse(authorization(persist, odd, DNS_01), "https://ca/authz/1")
    assert [c.type for c in parsed.challenges] == ["dns-persist-01", "dns-01"]
    assert parsed.challenge("dns-01").token == "tok"
    assert parsed.challenges[0].token is None


@pytest.mark.parametrize(
    "broken",
    [
        {**DNS_01, "token": 5},  # a type we use, mistyped: the CA is broken, say so
        {**DNS_01, "status": "queued"},
        {"url": "https://ca/chall/3", "status": "pending"},  # no type at all
    ],
)
def test_a_broken_challenge_of_a_known_type_is_still_an_error(broken: dict[str, Any]) -> None:
    with pytest.raises(AcmeProtocolError, match="challenges"):
        Authorization.parse(authorization(broken), "https://ca/authz/1")
