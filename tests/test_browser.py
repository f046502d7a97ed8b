"""A browser finds the node through what the node advertises, dials it over TLS and pings it,
before and after a renewal, while the node keeps running (issue 10 §1).

Real parts only: Pebble + challtestsrv + the local broker issue the certificate, a py-libp2p
node serves it on its secure WebSocket listener, and Debian's Chromium runs a js-libp2p page
(tests/browser/page.js) that trusts nothing but Pebble's roots. The page is handed one
address that the node does not advertise (``bootstrap.<peer>.libp2p.direct``, which only
this test's resolver rules make reachable), identifies the node over it, and picks the forge
address from identify's answer; libp2p's browser defaults refuse the node's own ``/ip4``
addresses. Which certificate the browser was served is read from Chromium's own net log.

Run with ``-s`` to see the chosen address, the ping round trips and the serials.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from autotls import AutoTLS, PrivateKey
from autotls.fsm.ports import EngineSettings
from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleStack
from autotls.multiaddrs import DEFAULT_ZONE, Multiaddr, ip_label
from autotls.node import Libp2pNode
from tests.fixtures.browser import Browser, BrowserTools, Probe, certificates_received

pytestmark = [pytest.mark.libp2p, pytest.mark.usefixtures("libp2p_installed")]

FAST = EngineSettings(
    dns_poll_interval=timedelta(milliseconds=100),
    authz_poll_interval=timedelta(milliseconds=100),
    order_poll_interval=timedelta(milliseconds=100),
)
LISTEN = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws"]


async def _served_serial(port: int, server_name: str, roots_pem: list[str]) -> str:
    """The serial a fresh TLS handshake of our own gets from the node's listener."""
    context = ssl.create_default_context(cadata="".join(roots_pem))
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.transport.abort()  # the listener waits for a WebSocket upgrade
    return f"{x509.load_der_x509_certificate(der).serial_number:x}"


def _report(label: str, probe: Probe, browser_serials: list[str], served: str) -> str:
    result: dict[str, Any] = probe.result
    return (
        f"[{label}] browser chose {result.get('chosen')} from identify "
        f"(listenAddrs {result.get('listenAddrs')}, signed record seq {result.get('recordSeq')}); "
        f"connected to {result.get('remoteAddr')}; ping RTT {result.get('rtt')} ms; "
        f"browser was served serial(s) {browser_serials}; node serves {served}; "
        f"browser run {probe.seconds:.1f}s"
    )


async def test_a_browser_dials_the_advertised_forge_address_before_and_after_renewal(
    browser_tools: BrowserTools, pebble: PebbleStack, pebble_broker: LocalBroker, tmp_path: Path
) -> None:
    key = PrivateKey.generate()
    peer_b36, peer_b58 = key.peer_id.to_base36(), key.peer_id.to_base58()
    roots_pem = pebble.issuer_roots_pem()
    auto = AutoTLS(
        key,
        data_dir=tmp_path / "data",
        directory_url=pebble.directory_url,
        ca_file=str(pebble.ca_file),
        broker_url=pebble_broker.url,
        dns_servers=["{}:{}".format(*pebble.dns_address)],
        allow_private_addresses=True,  # loopback is all this machine may use
        trust_roots=[c for pem in roots_pem for c in x509.load_pem_x509_certificates(pem.encode())],
        settings=FAST,
    )
    node = Libp2pNode(key, listen=LISTEN, autotls=auto)
    browser = Browser(browser_tools, tmp_path / "browser", roots_pem)
    renewed = asyncio.Event()
    auto.on("renewed", lambda _cert: renewed.set())

    async with node, auto:
        wss_port = int(Multiaddr.parse(node.listen_addresses[1]).value("tcp") or 0)
        forge_host = f"{ip_label('127.0.0.1')}.{peer_b36}.{DEFAULT_ZONE}"
        expected = f"/dns4/{forge_host}/tcp/{wss_port}/tls/ws"
        # Not advertised, not a forge IP label: reachable only through the resolver rules.
        bootstrap_host = f"bootstrap.{peer_b36}.{DEFAULT_ZONE}"
        bootstrap = f"/dns4/{bootstrap_host}/tcp/{wss_port}/tls/ws/p2p/{peer_b58}"
        async with asyncio.timeout(60):
            first = await auto.wait_for_certificate()
        assert auto.advertised_addresses() == [expected]

        async def browse(label: str, serial: str) -> Probe:
            probe = await browser.probe(
                bootstrap=bootstrap, peer_id=peer_b58, peer_b36=peer_b36, zone=DEFAULT_ZONE
            )
            served = await _served_serial(wss_port, forge_host, roots_pem)
            seen = [
                f"{c.serial_number:x}" for c in certificates_received(probe.net_log, forge_host)
            ]
            report = _report(label, probe, seen, served)
            print(report)
            result = probe.result
            assert probe.ok, f"{report}\n{result}"
            assert result["chosen"] == expected, report
            assert any(a == expected for a in result["listenAddrs"]), report
            assert any(a.startswith(f"{expected}/p2p/") for a in result["recordAddrs"]), report
            assert not any("bootstrap." in a for a in result["listenAddrs"]), report
            assert result["remoteAddr"].startswith(expected), report
            assert expected in result["listenAddrsOverForge"], report
            assert isinstance(result["rtt"], (int, float)) and result["rtt"] >= 0, report
            assert served == serial, report
            assert seen and set(seen) == {serial}, report
            return probe

        await browse("issued", first.serial)

        # `renew --force` on a running node: the order is moved in the store, the worker
        # renews, the listener's context is reloaded; the node is never restarted.
        await auto.renew_now()
        async with asyncio.timeout(60):
            await renewed.wait()
        second = auto.certificate
        assert second is not None and second.serial != first.serial
        assert node.running
        await browse("renewed", second.serial)
