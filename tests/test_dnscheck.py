"""DNS propagation checks: against real challtestsrv, and name-server discovery against a small
authoritative server run in the test (real DNS packets over UDP on loopback)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from autotls.dnscheck import AuthoritativeTxtChecker, NameServer, parse_nameserver
from autotls.fsm.errors import ConfigurationError, TransientError
from autotls.localstack.pebble import PebbleStack

NAME = "_acme-challenge.k51qzi5uqu5dtest.libp2p.direct"


def test_parse_nameserver_forms() -> None:
    assert parse_nameserver("127.0.0.1:8053") == NameServer("127.0.0.1", 8053)
    assert parse_nameserver("9.9.9.9") == NameServer("9.9.9.9", 53)
    assert parse_nameserver("[::1]:5353") == NameServer("::1", 5353)
    assert str(NameServer("::1", 53, "ns1")) == "ns1 ([::1]:53)"
    for bad, why in [
        ("ns1.example:53", "not an IP address"),
        ("127.0.0.1:0", "bad port"),
        ("127.0.0.1:99999", "bad port"),
        ("[::1", "missing ']'"),
        ("[::1]x", "expected ':PORT'"),
    ]:
        with pytest.raises(ConfigurationError, match=why):
            parse_nameserver(bad)


async def test_txt_visibility_on_challtestsrv(pebble: PebbleStack) -> None:
    checker = AuthoritativeTxtChecker(
        nameservers=[parse_nameserver("{}:{}".format(*pebble.dns_address))]
    )
    await pebble.clear_txt(NAME)
    missing = await checker.check_txt(NAME, "value-a")
    assert not missing.visible
    await pebble.set_txt(NAME, "value-b")
    other = await checker.check_txt(NAME, "value-a")
    assert not other.visible and "other: value-b" in next(iter(other.servers.values()))
    await pebble.clear_txt(NAME)
    await pebble.set_txt(NAME, "value-a")
    seen = await checker.check_txt(NAME, "value-a")
    assert seen.visible and set(seen.servers.values()) == {"ok"}


async def test_a_server_that_does_not_answer_is_reported_not_fatal(pebble: PebbleStack) -> None:
    await pebble.clear_txt(NAME)
    await pebble.set_txt(NAME, "v")
    dead = NameServer("127.0.0.1", 9)  # discard port: nothing answers DNS there
    live = parse_nameserver("{}:{}".format(*pebble.dns_address))
    checker = AuthoritativeTxtChecker(nameservers=[live, dead], timeout=0.3)
    result = await checker.check_txt(NAME, "v")
    assert result.visible, "visible on every server that answers"
    assert result.servers[str(dead)].startswith("error")
    with pytest.raises(TransientError, match="no name server answered"):
        await AuthoritativeTxtChecker(nameservers=[dead], timeout=0.3).check_txt(NAME, "v")


class TinyAuthoritativeServer(asyncio.DatagramProtocol):
    """Serves NS and A records for a test zone, and TXT on the 'authoritative' side."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = records
        self.queries: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".")
        kind = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, kind))
        response = dns.message.make_response(query)
        values = self.records.get((name, kind))
        if values is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            response.answer.append(dns.rrset.from_text_list(question.name, 300, "IN", kind, values))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def tiny_dns() -> AsyncIterator[tuple[TinyAuthoritativeServer, int]]:
    server = TinyAuthoritativeServer({})
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield server, port
    transport.close()


async def test_discovers_the_zone_name_servers_and_asks_each(
    tiny_dns: tuple[TinyAuthoritativeServer, int],
) -> None:
    server, port = tiny_dns
    server.records.update(
        {
            ("libp2p.test", "NS"): ["ns1.libp2p.test.", "ns2.libp2p.test."],
            ("ns1.libp2p.test", "A"): ["127.0.0.1"],
            ("ns2.libp2p.test", "A"): ["127.0.0.1"],
            (NAME.replace(".direct", ".test"), "TXT"): ['"expected"'],
        }
    )
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    checker = AuthoritativeTxtChecker(zone="libp2p.test", resolver=resolver)
    servers = await checker.nameservers()
    assert [s.name for s in servers] == ["ns1.libp2p.test", "ns2.libp2p.test"]
    # The discovered servers listen on 53; point them at the test server's port.
    checker.fixed = [NameServer(s.address, port, s.name) for s in servers]
    result = await checker.check_txt(NAME.replace(".direct", ".test"), "expected")
    assert result.visible and len(result.servers) == 2
    assert ("libp2p.test", "NS") in server.queries
    # Discovery is cached: a second lookup asks nothing.
    checker.fixed = None
    before = len(server.queries)
    await checker.nameservers()
    assert len(server.queries) == before


async def test_discovery_failure_is_transient(
    tiny_dns: tuple[TinyAuthoritativeServer, int],
) -> None:
    _server, port = tiny_dns
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    checker = AuthoritativeTxtChecker(zone="nowhere.test", resolver=resolver, timeout=0.5)
    with pytest.raises(TransientError, match=r"name servers of nowhere\.test"):
        await checker.nameservers()
