"""The node advertises what a browser can dial (issue 10 §1), seen the way peers see it: a
second py-libp2p host dials the node, runs identify and reads ``listenAddrs`` and the signed
peer record (signature checked). Nothing is restarted between the checks: each identify
answer is built from the certificate's state at that moment.

The AutoTLS test runs the real local stack (Pebble, challtestsrv, the local broker) with an
injected clock and drives the worker step by step, so expiry is a clock move, not a wait."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from autotls import AutoTLS, PrivateKey
from autotls.acme import AcmeClient, load_account_key
from autotls.fsm import operator
from autotls.fsm.clock import ManualClock
from autotls.fsm.machine import State
from autotls.fsm.worker import run_until_idle
from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleStack
from autotls.multiaddrs import Multiaddr, ip_label
from autotls.node import Libp2pNode
from autotls.peerid import KeyType
from tests.fixtures.libp2p import Identified, identify, server_context

pytestmark = [pytest.mark.libp2p, pytest.mark.usefixtures("libp2p_installed")]

LISTEN = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws"]


def _without_peer(addresses: list[str]) -> list[str]:
    """py-libp2p signs its peer record with ``/p2p/<id>`` on every address; identify's
    ``listenAddrs`` carry none."""
    return [str(Multiaddr.parse(a).without_peer()[0]) for a in addresses]


def _same(seen: list[str], own: list[str], *extra: str) -> bool:
    """``seen`` is the host's own addresses (py-libp2p starts listeners concurrently, so in
    any order), then ``extra`` in order."""
    return sorted(seen[: len(own)]) == sorted(own) and seen[len(own) :] == list(extra)


def _forge(peer_b36: str, wss: str) -> str:
    port = Multiaddr.parse(wss).value("tcp")
    return f"/dns4/127-0-0-1.{peer_b36}.libp2p.direct/tcp/{port}/tls/ws"


# ------------------------------------------------------------- the node's advertise hook


async def test_identify_and_the_signed_peer_record_follow_advertise_on_every_request(
    node_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    key = PrivateKey.generate(KeyType.ED25519)
    peer_b36 = key.peer_id.to_base36()
    extra: list[str] = []
    failure: list[Exception] = []

    def advertise() -> list[str]:
        if failure:
            raise failure[0]
        return list(extra)

    context = server_context(node_ca, f"*.{peer_b36}.libp2p.direct")
    async with Libp2pNode(key, listen=LISTEN, tls_context=context, advertise=advertise) as node:
        tcp, wss = node.listen_addresses
        own = node.announce_addresses
        assert own == [tcp, f"/ip4/127.0.0.1/tcp/{Multiaddr.parse(wss).value('tcp')}/wss"]

        before = await identify(tcp, key.peer_id)
        assert _same(before.listen_addrs, own)
        assert _same(_without_peer(before.record_addrs), own)
        assert all(a.endswith(f"/p2p/{key.peer_id.to_base58()}") for a in before.record_addrs)

        forge = _forge(peer_b36, wss)
        extra.append(forge)
        extra.append(tcp)  # already advertised: not repeated
        during = await identify(tcp, key.peer_id)
        assert _same(during.listen_addrs, own, forge)
        assert _same(_without_peer(during.record_addrs), own, forge)
        assert during.record_seq > before.record_seq, "a new address set is signed anew"
        assert node.advertised_addresses == [*own, forge]

        again = await identify(tcp, key.peer_id)
        assert again.record_seq == during.record_seq, "an unchanged set reuses the record"

        extra.clear()
        after = await identify(tcp, key.peer_id)
        assert _same(after.listen_addrs, own)
        assert _same(_without_peer(after.record_addrs), own)
        assert after.record_seq > during.record_seq

        # What advertise() gets wrong is logged (once) and left out; identify keeps working.
        caplog.set_level(logging.WARNING, logger="autotls.node")
        failure.append(RuntimeError("database is gone"))
        broken = await identify(tcp, key.peer_id)
        broken_again = await identify(tcp, key.peer_id)
        assert _same(broken.listen_addrs, own) and _same(broken_again.listen_addrs, own)
        failure.clear()
        extra[:] = ["/ip4/1.2.3.4/tcp/nope", forge]
        partly = await identify(tcp, key.peer_id)
        assert _same(partly.listen_addrs, own, forge)
    complaints = [r.getMessage() for r in caplog.records if r.name == "autotls.node"]
    assert len([c for c in complaints if "database is gone" in c]) == 1, complaints
    assert any("bad port" in c or "/ip4/1.2.3.4/tcp/nope" in c for c in complaints), complaints
    assert node.advertised_addresses == [], "a stopped node advertises nothing"


# ------------------------------------------------------------ AutoTLS's forge addresses


@dataclass
class Stack:
    pebble: PebbleStack
    broker: LocalBroker
    tmp: Path


@pytest.fixture
def stack(pebble: PebbleStack, pebble_broker: LocalBroker, tmp_path: Path) -> Stack:
    return Stack(pebble, pebble_broker, tmp_path)


async def _served_serial(wss: str, server_name: str, roots_pem: list[str]) -> str:
    """The serial of the certificate a fresh TLS handshake gets from the WSS listener."""
    context = ssl.create_default_context(cadata="".join(roots_pem))
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        int(Multiaddr.parse(wss).value("tcp") or 0),
        ssl=context,
        server_hostname=server_name,
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.transport.abort()  # the listener waits for a WebSocket upgrade
    return f"{x509.load_der_x509_certificate(der).serial_number:x}"


async def _revoke_at_the_ca(auto: AutoTLS, ca_file: str) -> str:
    """What ``autotls revoke`` does at the CA before it records the revocation."""
    snap = await auto.order()
    cert, account = snap.certificate, snap.account
    assert cert is not None and account is not None and account.url is not None
    leaf = x509.load_pem_x509_certificates(cert.chain_pem.encode())[0]
    async with AcmeClient(
        account.directory_url,
        load_account_key(account.key_pem),
        account_url=account.url,
        ca_file=ca_file,
    ) as client:
        await client.revoke_certificate(leaf.public_bytes(Encoding.DER))
    return cert.serial


async def test_forge_addresses_come_with_the_certificate_and_go_with_expiry_and_revocation(
    stack: Stack,
) -> None:
    key = PrivateKey.generate()
    peer_b36 = key.peer_id.to_base36()
    clock = ManualClock(datetime.now(UTC) - timedelta(seconds=1))
    roots_pem = stack.pebble.issuer_roots_pem()
    auto = AutoTLS(
        key,
        data_dir=stack.tmp / "data",
        directory_url=stack.pebble.directory_url,
        ca_file=str(stack.pebble.ca_file),
        broker_url=stack.broker.url,
        dns_servers=["{}:{}".format(*stack.pebble.dns_address)],
        allow_private_addresses=True,  # loopback is all this machine may use
        trust_roots=[c for pem in roots_pem for c in x509.load_pem_x509_certificates(pem.encode())],
        clock=clock,
        run_worker=False,
    )
    node = Libp2pNode(key, listen=LISTEN, autotls=auto)  # serves, advertises, gives addresses

    async def drive_until(state: State) -> None:
        async def reached() -> bool:
            return (await auto.order()).state == state.value

        await run_until_idle(auto.worker, advance_clock=clock.set, stop_when=reached)

    async with node, auto:
        tcp, wss = node.listen_addresses
        own = node.announce_addresses
        forge = _forge(peer_b36, wss)
        server_name = f"{ip_label('127.0.0.1')}.{peer_b36}.libp2p.direct"

        async def advertised() -> Identified:
            seen = await identify(tcp, key.peer_id)
            assert sorted(_without_peer(seen.record_addrs)) == sorted(seen.listen_addrs)
            return seen

        placeholder = await advertised()
        assert _same(placeholder.listen_addrs, own), "no forge address before a certificate"

        await drive_until(State.INSTALLED)
        first = auto.certificate
        assert first is not None
        issued = await advertised()
        assert _same(issued.listen_addrs, own, forge)
        assert auto.advertised_addresses() == [forge]

        # Renewal: the new certificate is served and the forge address stays advertised.
        snap = await auto.order()
        await operator.force_renewal(auto.store, snap.id, now=clock.now(), actor="test")
        await drive_until(State.INSTALLED)
        second = auto.certificate
        assert second is not None and second.serial != first.serial
        assert await _served_serial(wss, server_name, roots_pem) == second.serial
        assert _same((await advertised()).listen_addrs, own, forge)

        # Revocation (`autotls revoke`: revoke at the CA, then record it on the certificate's
        # row with the renewal): withdrawn as soon as the worker takes the renewal, while the
        # revoked certificate is still what the listener serves.
        revoked = await _revoke_at_the_ca(auto, str(stack.pebble.ca_file))
        assert revoked == second.serial
        snap = await auto.order()
        await operator.force_renewal(
            auto.store, snap.id, now=clock.now(), actor="test", revoked=True, reason="superseded"
        )
        recorded = (await auto.order()).certificate
        assert recorded is not None and recorded.serial == revoked
        assert (recorded.revoked_at, recorded.revocation_reason) == (clock.now(), "superseded")
        assert await auto.worker.run_once() == 1  # RenewDue -> Registered
        assert auto.certificate is None
        assert _same((await advertised()).listen_addrs, own)
        assert await _served_serial(wss, server_name, roots_pem) == revoked

        # Its replacement is advertised again, without a restart.
        await drive_until(State.INSTALLED)
        third = auto.certificate
        assert third is not None and third.serial not in (first.serial, second.serial)
        assert await _served_serial(wss, server_name, roots_pem) == third.serial
        reissued = await advertised()
        assert _same(reissued.listen_addrs, own, forge)

        # Without --allow-private-addresses a loopback listener is never advertised.
        auto.allow_private_addresses = False
        assert _same((await advertised()).listen_addrs, own)
        auto.allow_private_addresses = True
        reissued = await advertised()
        assert _same(reissued.listen_addrs, own, forge)

        # Expiry: the clock passes notAfter and the next identify no longer carries it.
        clock.set(third.not_after)
        assert auto.certificate is None
        expired = await advertised()
        assert _same(expired.listen_addrs, own)
        assert expired.record_seq > reissued.record_seq
