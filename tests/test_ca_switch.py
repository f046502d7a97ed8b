"""Switching CA on the same data directory (``--staging`` to production, another ``--ca``).

The store keeps one ACME account per directory URL. An order whose account belongs to another
directory than the worker's moves to the worker's CA (``ca_changed``, journaled, back to New
with what belonged to the old CA's order cleared), is linked to that directory's account
(made once, reused when switching back), keeps serving the certificate it has until the new
CA's is installed, and orders from the new CA without ``replaces`` (ARI CertIDs are per CA).
A worker that starts makes such orders due at once, not at their next renewal.

* Two real Pebbles: the first issues, the second takes over after a switch (before the fix,
  the renewal reached the second Pebble with the first one's account URL as ``kid``, and
  Pebble refused it for good: "Key ID (kid) in JWS header missing expected URL prefix").
* Two FakeAcmeServers with ARI (a fake: Pebble 2.4.0 has no ARI): an order about to renew
  with ``replaces`` sends none to the new CA.
"""

from __future__ import annotations

import contextlib
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from autotls.adapters import AcmeAdapter, BrokerAdapter
from autotls.dnscheck import AuthoritativeTxtChecker, parse_nameserver
from autotls.fsm import operator
from autotls.fsm.clock import ManualClock
from autotls.fsm.machine import State
from autotls.fsm.policy import CA_BOUND_STATES, plan_ca_changed
from autotls.fsm.ports import EngineSettings, Ports
from autotls.fsm.worker import Worker, run_until_idle
from autotls.install import Installer
from autotls.localstack.pebble import PebbleOptions
from autotls.persistence.records import AccountRecord, OrderSnapshot
from autotls.persistence.store import Store
from tests.fakes.acme_server import FakeAcmeServer
from tests.fakes.ports import FakeBroker, FakeDns
from tests.fixtures.engine import HAPPY_TRIGGERS, claimed_snapshot, identifier_for, new_peer
from tests.fixtures.pebble import PebbleFactory
from tests.fixtures.realstack import RealStack

pytestmark = pytest.mark.usefixtures("libp2p_installed")


def roots_of(pems: list[str]) -> list[x509.Certificate]:
    return [c for pem in pems for c in x509.load_pem_x509_certificates(pem.encode())]


async def test_switching_pebbles_moves_the_order_and_keeps_serving_until_replaced(
    real_stack: RealStack, pebble_factory: PebbleFactory
) -> None:
    stack = real_stack
    # The second CA validates whatever it is asked (its own DNS never sees the broker's TXT;
    # the engine still waits for the record at the first stack's DNS before answering).
    second = pebble_factory(PebbleOptions(va_always_valid=True))
    order = await stack.order()
    first = await stack.drive(stack.worker(), order.id, [State.INSTALLED, State.FAILED])
    assert first.state == State.INSTALLED.value, first.last_error_message
    assert first.certificate is not None
    first_account = first.account
    assert first_account is not None
    chain_path, _key_path = Installer(stack.workdir / "data").paths(first.peer_id)
    assert chain_path.read_text() == first.certificate.chain_pem

    # The operator restarts the node against the second CA, on the same data directory.
    ports = Ports(
        acme=AcmeAdapter(second.directory_url, ca_file=str(second.ca_file)),
        broker=BrokerAdapter(
            identity=stack.keys.get,
            addresses=lambda peer: stack.nodes[peer].listen_addresses,
            base_url=stack.broker.url,
            allow_private_addresses=True,
        ),
        dns=AuthoritativeTxtChecker(
            nameservers=[parse_nameserver("{}:{}".format(*stack.pebble.dns_address))]
        ),
        installer=Installer(
            stack.workdir / "data", trust_roots=roots_of(second.issuer_roots_pem())
        ),
        clock=stack.clock,
        settings=EngineSettings(),
        rng=random.Random(99),
    )
    stack.open_ports.append(ports)
    worker = Worker(stack.store, ports, worker_id="after-the-switch")
    await worker.prepare()  # a starting worker: the order is due now, not at its renewal
    assert (await stack.store.get_order(order.id)).next_run_at <= stack.clock.now()

    served_meanwhile: list[str] = []

    async def installed_again() -> bool:
        snap = await stack.store.get_order(order.id)
        if snap.state != State.INSTALLED.value:
            served_meanwhile.append(chain_path.read_text())
        return (
            snap.state in (State.INSTALLED.value, State.FAILED.value)
            and len(await stack.store.certificates(order_id=order.id)) == 2
        ) or snap.state == State.FAILED.value

    await run_until_idle(
        worker, advance_clock=stack.clock.set, stop_when=installed_again, max_rounds=500
    )
    snap = await stack.store.get_order(order.id)
    assert snap.state == State.INSTALLED.value, snap.last_error_message
    journal = await stack.store.journal(order.id)
    moves = [j.trigger for j in journal]
    switch = moves.index("ca_changed")
    assert moves[switch - 1] == "certificate_installed"
    # From New again, as a first order goes (the switch in the place of its creation).
    assert moves[switch:] == ["ca_changed", *HAPPY_TRIGGERS[1:]]
    assert journal[switch].from_state == State.INSTALLED.value
    assert journal[switch].to_state == State.NEW.value
    assert journal[switch].detail == {
        "from_directory": stack.pebble.directory_url,
        "to_directory": second.directory_url,
    }
    # The old certificate was served until the new one was installed.
    assert served_meanwhile and set(served_meanwhile) == {first.certificate.chain_pem}
    assert snap.certificate is not None and chain_path.read_text() == snap.certificate.chain_pem
    assert snap.certificate.serial != first.certificate.serial
    assert snap.certificate.replaces_cert_id is None
    # One account per directory: the order now uses the second CA's.
    assert snap.account is not None and snap.account.directory_url == second.directory_url
    assert snap.account.url and snap.account.url.startswith(second.directory_url.split("/dir")[0])
    accounts = await stack.store.accounts()
    assert sorted(a.directory_url for a in accounts) == sorted(
        [stack.pebble.directory_url, second.directory_url]
    )

    # And back to the first CA: its account is found again, not made twice.
    back = stack.ports()
    worker = stack.worker(back)
    await worker.prepare()

    async def three() -> bool:
        snap = await stack.store.get_order(order.id)
        return snap.state == State.FAILED.value or (
            snap.state == State.INSTALLED.value
            and len(await stack.store.certificates(order_id=order.id)) == 3
        )

    await run_until_idle(worker, advance_clock=stack.clock.set, stop_when=three, max_rounds=500)
    snap = await stack.store.get_order(order.id)
    assert snap.state == State.INSTALLED.value, snap.last_error_message
    assert snap.account is not None and snap.account.id == first_account.id
    assert snap.account.url == first_account.url
    assert len(await stack.store.accounts()) == 2


@contextlib.asynccontextmanager
async def two_fake_cas(tmp_path: Path):  # type: ignore[no-untyped-def]
    clock = ManualClock(datetime(2027, 3, 1, tzinfo=UTC))
    dns = FakeDns()

    async def published(identifier: str, expected: str) -> bool:
        return dns.records.get(f"_acme-challenge.{identifier}") == expected

    async with (
        FakeAcmeServer(now=clock.now, ari=True, validator=published) as one,
        FakeAcmeServer(now=clock.now, ari=True, validator=published) as other,
    ):
        store = await Store.open(f"sqlite:///{tmp_path / 'engine.db'}")
        try:
            yield clock, dns, one, other, store
        finally:
            await store.close()


def fake_ports(
    ca: FakeAcmeServer, clock: ManualClock, dns: FakeDns, tmp_path: Path
) -> tuple[Ports, AcmeAdapter]:
    roots = [x509.load_pem_x509_certificate(ca.root_pem.encode())]
    acme = AcmeAdapter(ca.directory_url, trust_roots=roots, clock=clock)
    ports = Ports(
        acme=acme,
        broker=FakeBroker(dns),
        dns=dns,
        installer=Installer(tmp_path / "data", trust_roots=roots, clock=clock),
        clock=clock,
        settings=EngineSettings(),
        rng=random.Random(7),
    )
    return ports, acme


async def test_a_renewal_with_replaces_sends_none_to_the_new_ca(tmp_path: Path) -> None:
    async with two_fake_cas(tmp_path) as (clock, dns, one, other, store):
        ports, acme = fake_ports(one, clock, dns, tmp_path)
        other_ports, other_acme = fake_ports(other, clock, dns, tmp_path)
        try:
            peer = new_peer()
            order = await operator.create_order(store, peer, identifier_for(peer), now=clock.now())
            worker = Worker(store, ports, worker_id="first")

            async def state_is(*states: State) -> bool:
                snap = await store.get_order(order.id)
                return snap.state in {s.value for s in states}

            await run_until_idle(
                worker,
                advance_clock=clock.set,
                stop_when=lambda: state_is(State.INSTALLED),
                max_rounds=500,
            )
            # Renewal is due at the first CA, which advertises ARI: the order is to replace
            # its certificate...
            await operator.force_renewal(store, order.id, now=clock.now(), actor="test")
            await run_until_idle(worker, stop_when=lambda: state_is(State.REGISTERED))
            snap = await store.get_order(order.id)
            assert snap.data["replaces"], "the first CA would have been told `replaces`"

            # ...when the operator switches to the other CA.
            worker = Worker(store, other_ports, worker_id="second")
            await worker.prepare()
            await run_until_idle(
                worker,
                advance_clock=clock.set,
                stop_when=lambda: state_is(State.INSTALLED, State.FAILED),
                max_rounds=500,
            )
            snap = await store.get_order(order.id)
            assert snap.state == State.INSTALLED.value, snap.last_error_message
            journal = [j.trigger for j in await store.journal(order.id)]
            assert "ca_changed" in journal and "drop_replaces" not in journal
            [new_order] = [p for e, p in other.payloads if e == "newOrder"]
            assert "replaces" not in new_order
            assert not other.problems
            assert [e for e, _ in one.payloads].count("newOrder") == 1
        finally:
            await acme.close()
            await other_acme.close()


FULL_DATA = {
    "order_url": "https://old-ca/order/1",
    "authz_url": "https://old-ca/authz/1",
    "authz_expires": "2027-03-02T00:00:00+00:00",
    "authz_status": "pending",
    "challenge_url": "https://old-ca/chall/1",
    "dns_value": "v",
    "certificate_url": "https://old-ca/cert/1",
    "chain_pem": "-----BEGIN CERTIFICATE-----",
    "replaces": "aki.serial",
    "renewal": {"renew_at": "2027-05-01T00:00:00+00:00"},
    "installed_at": "2027-03-01T00:00:00+00:00",
    "validation_failures": ["2027-03-01T00:00:00+00:00"],
    "waiting_for": "something",
}


def _snap(state: State, directory: str) -> OrderSnapshot:
    now = datetime(2027, 3, 1, tzinfo=UTC)
    return claimed_snapshot(
        state,
        now,
        data=FULL_DATA,
        attempts=2,
        account=AccountRecord(1, directory, b"k", f"{directory}/acct/1", "valid"),
        cert_key_pem=b"in-flight key",
        last_error_class="transient",
        last_error_message="x",
    )


@pytest.mark.parametrize("state", sorted(CA_BOUND_STATES, key=list(State).index))
def test_every_state_bound_to_the_old_ca_starts_over_from_new(state: State) -> None:
    now = datetime(2027, 3, 1, tzinfo=UTC)
    plan = plan_ca_changed(_snap(state, "https://old-ca/dir"), "https://new-ca/dir", now)
    assert plan is not None
    assert plan.to_state == State.NEW.value and plan.next_run_at == now
    assert plan.journal is not None and plan.journal.trigger == "ca_changed"
    assert plan.journal.detail["to_directory"] == "https://new-ca/dir"
    dropped = plan.journal.detail.get("dropped_uninstalled_certificate", False)
    assert dropped is (state is State.FINALIZED)
    # What belonged to the old CA's order and certificate is gone; the budget stays.
    assert set(plan.data) == {"installed_at", "validation_failures"}
    assert plan.cert_key_pem is None and plan.attempts == 0 and plan.last_error_class is None


@pytest.mark.parametrize("state", [State.NEW, State.FAILED])
def test_new_links_the_account_itself_and_failed_waits_for_the_operator(state: State) -> None:
    now = datetime(2027, 3, 1, tzinfo=UTC)
    assert plan_ca_changed(_snap(state, "https://old-ca/dir"), "https://new-ca/dir", now) is None


def test_the_same_directory_changes_nothing() -> None:
    now = datetime(2027, 3, 1, tzinfo=UTC)
    snap = _snap(State.INSTALLED, "https://ca/dir")
    assert plan_ca_changed(snap, "https://ca/dir", now) is None
