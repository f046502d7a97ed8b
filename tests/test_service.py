"""The embedding API against the real local stack and a real py-libp2p node: events, the live
SSLContext behind the node's secure WebSocket listener, restart and restore, failure."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import text

from autotls import AutoTLS, IssuanceFailed, PrivateKey
from autotls.fsm.machine import State
from autotls.fsm.ports import EngineSettings
from autotls.fsm.worker import OrderEvent
from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleStack
from autotls.multiaddrs import Multiaddr, ip_label
from autotls.node import Libp2pNode

pytestmark = pytest.mark.usefixtures("libp2p_installed")

FAST = EngineSettings(
    dns_poll_interval=timedelta(milliseconds=100),
    authz_poll_interval=timedelta(milliseconds=100),
    order_poll_interval=timedelta(milliseconds=100),
)
LISTEN = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws"]


@dataclass
class Setup:
    pebble: PebbleStack
    broker: LocalBroker
    tmp: Path
    key: PrivateKey = field(default_factory=PrivateKey.generate)
    events: list[tuple[str, Any]] = field(default_factory=list)

    def pair(self, **overrides: Any) -> tuple[AutoTLS, Libp2pNode]:
        """An AutoTLS and the node serving its context; the node is created second (it needs
        the context) and AutoTLS reads its addresses lazily."""
        box: list[Libp2pNode] = []
        auto = self.autotls(lambda: box[0].listen_addresses if box else [], **overrides)
        box.append(Libp2pNode(self.key, listen=LISTEN, tls_context=auto.ssl_context))
        return auto, box[0]

    def autotls(self, addresses: Any, **overrides: Any) -> AutoTLS:
        roots = [
            c
            for pem in self.pebble.issuer_roots_pem()
            for c in x509.load_pem_x509_certificates(pem.encode())
        ]
        options: dict[str, Any] = {
            "data_dir": self.tmp / "data",
            "addresses": addresses,
            "directory_url": self.pebble.directory_url,
            "ca_file": str(self.pebble.ca_file),
            "broker_url": self.broker.url,
            "dns_servers": ["{}:{}".format(*self.pebble.dns_address)],
            "allow_private_addresses": True,
            "trust_roots": roots,
            "settings": FAST,
            **overrides,
        }
        auto = AutoTLS(self.key, **options)
        for name in ("loaded", "renewed", "failed"):
            auto.on(name, lambda payload, name=name: self.events.append((name, payload)))
        return auto


@pytest.fixture
async def setup(pebble: PebbleStack, tmp_path: Path) -> AsyncIterator[Setup]:
    broker = LocalBroker(challtestsrv_url=pebble.challtestsrv_url)
    await broker.start()
    try:
        yield Setup(pebble, broker, tmp_path)
    finally:
        await broker.stop()


async def served_fingerprint(node: Libp2pNode, peer: str, roots_pem: list[str]) -> str:
    wss = next(Multiaddr.parse(a) for a in node.listen_addresses if "/tls/" in a)
    context = ssl.create_default_context(cadata="".join(roots_pem))
    _r, writer = await asyncio.open_connection(
        "127.0.0.1",
        int(wss.value("tcp") or 0),
        ssl=context,
        server_hostname=f"{ip_label('127.0.0.1')}.{peer}.libp2p.direct",
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.transport.abort()
    return hashlib.sha256(der).hexdigest()


def leaf_fingerprint(path: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


async def test_issue_serve_and_renew_live_behind_the_nodes_listener(setup: Setup) -> None:
    auto, node = setup.pair()
    async with node, auto:
        assert auto.forge_addresses() == [], "no forge addresses before a certificate"
        async with asyncio.timeout(60):
            cert = await auto.wait_for_certificate()
        assert cert.domain == f"*.{auto.peer_id}.libp2p.direct"
        forge = auto.forge_addresses()
        assert any(a.startswith("/dns4/127-0-0-1.") and a.endswith("/tls/ws") for a in forge)
        roots = setup.pebble.issuer_roots_pem()
        assert await served_fingerprint(node, auto.peer_id, roots) == leaf_fingerprint(
            cert.chain_path
        )
        # Renewal while the node keeps running: new handshakes get the new certificate.
        renewed = asyncio.Event()
        auto.on("renewed", lambda _c: renewed.set())
        planned = asyncio.Event()  # the Installed step scheduled the next renewal

        def on_transition(event: OrderEvent) -> None:
            if event.to_state == State.INSTALLED.value and event.trigger is None:
                planned.set()
            elif event.trigger is not None:
                planned.clear()

        auto.on("transition", on_transition)
        # Right after installing, our own worker still holds the order until it commits:
        # renew_now waits for that instead of failing.
        await auto.renew_now()
        async with asyncio.timeout(60):
            await renewed.wait()
        # Another worker holds the order for a moment: renew_now waits for its lease too.
        renewed.clear()
        async with asyncio.timeout(60):
            await planned.wait()  # our worker's Installed step committed: no lease of ours
        snap = await auto.order()
        held_until = datetime.now(UTC) + timedelta(milliseconds=300)
        async with auto.store.engine.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE orders SET lease_owner = 'other', lease_until = :until WHERE id = :id"
                ),
                {"until": held_until.replace(tzinfo=None), "id": snap.id},
            )
        await auto.renew_now()
        assert datetime.now(UTC) >= held_until
        async with asyncio.timeout(60):
            await renewed.wait()
        new = auto.certificate
        assert new is not None and new.serial != cert.serial
        assert len(await auto.store.certificates()) == 3
        assert await served_fingerprint(node, auto.peer_id, roots) == leaf_fingerprint(
            new.chain_path
        )
    assert [name for name, _ in setup.events] == ["loaded", "renewed", "renewed"]


async def test_restart_restores_from_the_store_without_a_new_order(setup: Setup) -> None:
    first, node = setup.pair()
    async with node, first:
        async with asyncio.timeout(60):
            cert = await first.wait_for_certificate()
        order_id = first.order_id
    # The files are lost (a new disk, a cleaned data directory): the store still has them.
    cert.chain_path.unlink()
    cert.key_path.unlink()
    setup.events.clear()
    second, node2 = setup.pair()
    async with node2, second:
        assert second.order_id == order_id
        assert second.certificate is not None and second.certificate.serial == cert.serial
        assert cert.chain_path.exists() and cert.key_path.stat().st_mode & 0o777 == 0o600
        assert [name for name, _ in setup.events] == ["loaded"]
        roots = setup.pebble.issuer_roots_pem()
        assert await served_fingerprint(node2, second.peer_id, roots) == leaf_fingerprint(
            cert.chain_path
        )
        assert len(await second.store.certificates()) == 1


async def test_a_permanent_failure_is_reported_and_ends_the_wait(setup: Setup) -> None:
    # Trusting the wrong roots: the issued chain is rejected (permanent: never re-ordered).
    auto, node = setup.pair(trust_roots=[_unrelated_root()])
    async with node, auto:
        with pytest.raises(IssuanceFailed, match="does not build to a trusted root"):
            async with asyncio.timeout(60):
                await auto.wait_for_certificate()
        snap = await auto.order()
        assert snap.state == State.FAILED.value
    assert [name for name, _ in setup.events] == ["failed"]
    assert auto.forge_addresses() == []


async def test_renew_now_refuses_an_order_that_is_not_installed(setup: Setup) -> None:
    from autotls.persistence.errors import OrderBusyError

    auto, node = setup.pair(run_worker=False)
    async with node, auto:
        with pytest.raises(OrderBusyError, match="order 1 is New"):
            await auto.renew_now()


def _unrelated_root() -> x509.Certificate:
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Unrelated Root")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
