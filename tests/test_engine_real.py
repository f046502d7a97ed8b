"""The engine against real parts: Pebble (20 % of nonces rejected), the local broker with a
real libp2p dial-back, challtestsrv DNS, the real installer, SQLite and PostgreSQL.

* issuance through the worker end to end, on both databases;
* resume from every state: an order stopped in each state is finished by a fresh worker
  with fresh adapters (a new process, as far as the engine can tell);
* renewal, forced and by the lifetime backstop, on a Pebble issuing 2-minute certificates.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from autotls.fsm import operator
from autotls.fsm.journal import is_valid_journal
from autotls.fsm.machine import ISSUANCE_PATH, State
from autotls.localstack.pebble import PebbleOptions, PebbleStack
from tests.fixtures.engine import HAPPY_TRIGGERS
from tests.fixtures.realstack import (
    CountingAcme,
    RealStack,
    close_real_stack,
    open_real_stack,
)

pytestmark = pytest.mark.usefixtures("libp2p_installed")

HAPPY = ISSUANCE_PATH


async def assert_installed_once(stack: RealStack, order_id: int) -> x509.Certificate:
    snap = await stack.store.get_order(order_id)
    assert snap.state == State.INSTALLED.value, (snap.state, snap.last_error_message)
    certs = await stack.store.certificates(order_id=order_id)
    assert len(certs) == 1
    assert is_valid_journal(await stack.store.journal(order_id))
    leaf = x509.load_pem_x509_certificates(certs[0].chain_pem.encode())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [snap.identifier]
    chain_file = stack.workdir / "data" / "certs" / snap.peer_id / "fullchain.pem"
    assert chain_file.read_text() == certs[0].chain_pem
    return leaf


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_issues_through_the_worker(
    backend: str, pebble: PebbleStack, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'e2e.db'}"
        if backend == "sqlite"
        else str(request.getfixturevalue("postgres_url"))
    )
    stack = await open_real_stack(pebble, tmp_path, url)
    try:
        order = await stack.order()
        snap = await stack.drive(stack.worker(), order.id, [State.INSTALLED, State.FAILED])
        await assert_installed_once(stack, snap.id)
        assert [j.trigger for j in await stack.store.journal(order.id)] == HAPPY_TRIGGERS
        assert stack.broker.counters.accepted == 1
    finally:
        await close_real_stack(stack)


@pytest.mark.parametrize("stop_at", HAPPY[:-1], ids=lambda s: s.value)
async def test_a_fresh_worker_finishes_an_order_left_in_any_state(
    stop_at: State, real_stack: RealStack
) -> None:
    order = await real_stack.order()
    first = real_stack.worker()
    snap = await real_stack.drive(first, order.id, [stop_at])
    assert snap.state == stop_at.value
    # The first "process" is gone: new adapters, new worker, nothing shared but the database.
    second = real_stack.worker()
    snap = await real_stack.drive(second, order.id, [State.INSTALLED, State.FAILED])
    await assert_installed_once(real_stack, order.id)
    assert CountingAcme.new_orders == 1, "resuming never orders again"


async def test_forced_renewal_replaces_the_served_certificate(real_stack: RealStack) -> None:
    order = await real_stack.order()
    worker = real_stack.worker()
    await real_stack.drive(worker, order.id, [State.INSTALLED])
    first = await assert_installed_once(real_stack, order.id)
    await operator.force_renewal(
        real_stack.store, order.id, now=real_stack.clock.now(), actor="test"
    )
    # Leave Installed first, then come back to it.
    await real_stack.drive(worker, order.id, [State.REGISTERED])
    await real_stack.drive(worker, order.id, [State.INSTALLED, State.FAILED])
    certs = await real_stack.store.certificates(order_id=order.id)
    assert len(certs) == 2
    assert certs[1].serial != certs[0].serial
    assert certs[1].replaces_cert_id is None, "Pebble 2.4.0 has no ARI: no replaces"
    snap = await real_stack.store.get_order(order.id)
    assert snap.certificate is not None and snap.certificate.id == certs[1].id
    chain_file = real_stack.workdir / "data" / "certs" / snap.peer_id / "fullchain.pem"
    assert chain_file.read_text() == certs[1].chain_pem
    assert f"{first.serial_number:x}" == certs[0].serial
    assert is_valid_journal(await real_stack.store.journal(order.id))


async def test_backstop_renewal_of_short_lived_certificates(
    pebble_factory, tmp_path: Path, libp2p_installed: None
) -> None:
    short = pebble_factory(PebbleOptions(certificate_validity_s=120))
    stack = await open_real_stack(short, tmp_path, f"sqlite:///{tmp_path / 'short.db'}")
    try:
        order = await stack.order()
        worker = stack.worker()
        await stack.drive(worker, order.id, [State.INSTALLED])
        await worker.run_once()  # the Installed step schedules the renewal
        snap = await stack.store.get_order(order.id)
        cert = snap.certificate
        assert cert is not None
        lifetime = cert.not_after - cert.not_before
        # Under 10 days of lifetime: renew with half of it left.
        assert snap.next_run_at == cert.not_after - lifetime / 2
        assert snap.data["renewal"]["reason"] == "backstop"
        stack.clock.set(snap.next_run_at)
        await stack.drive(worker, order.id, [State.RENEW_DUE])
        await stack.drive(worker, order.id, [State.REGISTERED])
        await stack.drive(worker, order.id, [State.INSTALLED, State.FAILED])
        certs = await stack.store.certificates(order_id=order.id)
        assert len(certs) == 2 and certs[1].not_after > certs[0].not_after - timedelta(seconds=1)
        triggers = [j.trigger for j in await stack.store.journal(order.id)]
        assert triggers.count("certificate_installed") == 2
        assert "renewal_due" in triggers and "start_renewal" in triggers
    finally:
        await close_real_stack(stack)
