"""This machine's addresses (:mod:`autotls.interfaces`): the real interface list, and
``0.0.0.0``/``::`` listen addresses expanded to it."""

from __future__ import annotations

import ipaddress
import socket

from autotls.interfaces import expand_unspecified, interface_addresses


def test_unspecified_listen_addresses_expand_to_interface_addresses() -> None:
    listen = [
        "/ip4/0.0.0.0/tcp/4001",
        "/ip4/0.0.0.0/tcp/4002/tls/sni/*.libp2p.direct/ws",
        "/ip6/::/tcp/4001",
        "/ip4/203.0.113.9/tcp/4003/tls/ws",
    ]
    expanded = expand_unspecified(listen, ["127.0.0.1", "192.0.2.10"], ["::1", "2001:db8::5"])
    assert expanded == [
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/192.0.2.10/tcp/4001",
        "/ip4/127.0.0.1/tcp/4002/tls/sni/*.libp2p.direct/ws",
        "/ip4/192.0.2.10/tcp/4002/tls/sni/*.libp2p.direct/ws",
        "/ip6/::1/tcp/4001",
        "/ip6/2001:db8::5/tcp/4001",
        "/ip4/203.0.113.9/tcp/4003/tls/ws",
    ]
    assert expand_unspecified(["/ip4/0.0.0.0/tcp/1"], [], ["::1"]) == []


def test_interface_addresses_of_this_machine() -> None:
    v4, v6 = interface_addresses()
    assert "127.0.0.1" in v4  # Linux always has lo
    for text in v4:
        assert ipaddress.ip_address(text).version == 4
    for text in v6:
        ip = ipaddress.ip_address(text)
        assert ip.version == 6 and not ip.is_link_local
        assert "%" not in text  # a multiaddr cannot carry a zone id
    assert len(set(v4)) == len(v4) and len(set(v6)) == len(v6)


def _route_source(family: socket.AddressFamily, probe: str) -> str | None:
    """The kernel's own choice of source address towards ``probe``: connect() on a UDP socket
    sends nothing, and the probe is a documentation address that is never contacted."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            return str(sock.getsockname()[0])
    except OSError:
        return None  # no route of that family on this machine


def test_the_default_routes_source_address_is_among_them() -> None:
    """Cross-checks the interface list against the routing table, another view of the same
    kernel state: the address this machine would send from is one of its addresses."""
    v4, v6 = interface_addresses()
    source4 = _route_source(socket.AF_INET, "198.51.100.1")
    if source4 is not None:
        assert source4 in v4
    source6 = _route_source(socket.AF_INET6, "2001:db8::1")
    if source6 is not None and not ipaddress.ip_address(source6).is_link_local:
        assert ipaddress.ip_address(source6).compressed in v6
