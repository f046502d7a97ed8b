"""An issued certificate is never thrown away: `retry` of an order holding a certificate URL
or a downloaded chain installs it and never places a new ACME order; a chain that does not
build to the trust roots waits in Finalized (class configuration, naming --trust-roots) and is
installed from the database after the fix. On real Pebble, and on the fakes for the states
Pebble cannot be steered into."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509

from autotls.fsm import operator
from autotls.fsm.errors import PermanentError
from autotls.fsm.journal import is_valid_journal
from autotls.fsm.machine import State
from autotls.install import CertificateRejected, Installer
from tests.fixtures.engine import Engine
from tests.fixtures.realstack import CountingAcme, RealStack
from tests.test_service import _unrelated_root

pytestmark = pytest.mark.usefixtures("libp2p_installed")


async def test_an_untrusted_chain_waits_and_retry_installs_it_without_a_new_order(
    real_stack: RealStack,
) -> None:
    order = await real_stack.order()
    ports = real_stack.ports()
    ports.installer = Installer(real_stack.workdir / "data", trust_roots=[_unrelated_root()])
    worker = real_stack.worker(ports)
    await real_stack.drive(worker, order.id, [State.FINALIZED])
    await worker.run_once()  # the chain is downloaded and stored in the row
    await worker.run_once()  # verification fails: a setting, not the certificate
    snap = await real_stack.store.get_order(order.id)
    assert (snap.state, snap.last_error_class) == (State.FINALIZED.value, "configuration")
    assert "--trust-roots" in (snap.last_error_message or "")
    chain = snap.data["chain_pem"]
    assert snap.cert_key_pem is not None and snap.data["certificate_url"]
    assert snap.next_run_at == real_stack.clock.now() + timedelta(minutes=1)
    # It waits on Let's Encrypt's slow schedule, never Failed, never re-ordered.
    for minutes in (10, 100):
        real_stack.clock.set(snap.next_run_at)
        await worker.run_once()
        snap = await real_stack.store.get_order(order.id)
        assert snap.state == State.FINALIZED.value
        assert snap.next_run_at == real_stack.clock.now() + timedelta(minutes=minutes)
    assert await real_stack.store.certificates() == []
    # The operator fixes the roots (a new process) and retries: installed from the row.
    fixed = real_stack.worker()
    snap = await operator.retry(
        real_stack.store, order.id, now=real_stack.clock.now(), actor="operator"
    )
    assert (snap.state, snap.next_run_at) == (State.FINALIZED.value, real_stack.clock.now())
    snap = await real_stack.drive(fixed, order.id, [State.INSTALLED, State.FAILED])
    assert snap.state == State.INSTALLED.value
    certs = await real_stack.store.certificates()
    assert len(certs) == 1 and certs[0].chain_pem == chain
    assert CountingAcme.new_orders == 1, "the issued certificate was installed, not re-ordered"
    journal = await real_stack.store.journal(order.id)
    assert [j.trigger for j in journal if j.kind == "operator"][-1] == "retry_install"
    assert is_valid_journal(journal)


async def test_retry_of_a_failed_order_holding_a_certificate_url_installs_it(
    engine: Engine,
) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.FINALIZED)
    engine.ca.fail("download_certificate", PermanentError("the CA refused the download"))
    await engine.drive()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.FAILED.value and snap.data["certificate_url"]
    assert "chain_pem" not in snap.data
    snap = await operator.retry(engine.store, order.id, now=engine.clock.now(), actor="op")
    assert snap.state == State.FINALIZED.value
    assert snap.data["certificate_url"] and snap.cert_key_pem is not None
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("new_order") == 1 and engine.ca.count("download_certificate") == 2
    triggers = [j.trigger for j in await engine.store.journal(order.id)]
    assert triggers[-3:] == ["fail", "retry_install", "certificate_installed"]


async def test_retry_of_a_failed_order_holding_its_chain_installs_it_without_the_ca(
    engine: Engine,
) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.FINALIZED)
    engine.installer.fail(PermanentError("a bug of the installer, fixed since"))
    await engine.drive()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.FAILED.value and snap.data["chain_pem"]
    calls = len(engine.ca.calls)
    await operator.retry(engine.store, order.id, now=engine.clock.now(), actor="op")
    await engine.drive_to(order.id, State.INSTALLED)
    assert len(engine.ca.calls) == calls, "installed from the stored chain: no CA request"
    leaf = x509.load_pem_x509_certificates(snap.data["chain_pem"].encode())[0]
    certs = await engine.store.certificates(order_id=order.id)
    assert [c.serial for c in certs] == [f"{leaf.serial_number:x}"]


async def test_retry_without_an_issued_certificate_still_starts_over(engine: Engine) -> None:
    order = await engine.order()
    engine.ca.fail("register_account", PermanentError("account deactivated"))
    await engine.drive()
    snap = await operator.retry(engine.store, order.id, now=engine.clock.now(), actor="op")
    assert snap.state == State.NEW.value
    await engine.drive_to(order.id, State.INSTALLED)


async def test_a_certificate_that_can_never_install_is_set_aside_and_retry_orders_anew(
    engine: Engine,
) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.FINALIZED)
    # E.g. it expired while the order waited months for a fix: no setting makes it usable.
    engine.installer.fail(CertificateRejected("the certificate expired at 2026-01-01"))
    await engine.drive()
    snap = await engine.store.get_order(order.id)
    assert (snap.state, snap.last_error_class) == (State.FAILED.value, "permanent")
    assert "certificate_url" not in snap.data and "chain_pem" not in snap.data
    assert snap.data["rejected_chain"].startswith("-----BEGIN CERTIFICATE-----")
    assert not operator.holds_issued_certificate(snap)
    snap = await operator.retry(engine.store, order.id, now=engine.clock.now(), actor="op")
    assert snap.state == State.NEW.value and "rejected_chain" not in snap.data
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("new_order") == 2
