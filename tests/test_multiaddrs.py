"""Multiaddr parsing, the broker's address rules, IP labels and forge addresses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autotls.fsm.errors import ConfigurationError, ErrorClass
from autotls.multiaddrs import (
    Multiaddr,
    MultiaddrError,
    advertised_forge_addresses,
    forge_addresses,
    forge_domain,
    ip_from_label,
    ip_label,
    is_publicly_dialable,
    select_dialable,
    wildcard_name,
)

# protocol.md §2 vectors
PEER_B58 = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
PEER_B36 = "k51qzi5uqu5dgy8qsq67hbz73jqkw87l3fgf4a91qb0d9b5173tir7n4vxk1oe"


# ------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text",
    [
        "/ip4/1.2.3.4/tcp/4001",
        "/ip4/0.0.0.0/tcp/4001/tls/sni/*.libp2p.direct/ws",
        f"/ip4/1.2.3.4/tcp/443/tls/sni/1-2-3-4.{PEER_B36}.libp2p.direct/ws",
        f"/dns4/1-2-3-4.{PEER_B36}.libp2p.direct/tcp/443/tls/ws",
        f"/dns6/2001-db8--1.{PEER_B36}.libp2p.direct/tcp/443/tls/ws/p2p/{PEER_B58}",
        "/ip6/2001:db8::1/tcp/4001/wss",
        "/ip6/::/udp/4001/quic-v1",
        "/ip4/1.2.3.4/udp/4001/quic-v1/webtransport/certhash/uEiAkH5a4DPGKUuOBjYw0CgwjvcJCJMD2K_1aluKR_tpevQ",
        "/ip4/1.2.3.4/udp/4001/webrtc-direct/certhash/uEiAkH5a4DPGKUuOBjYw0CgwjvcJCJMD2K_1aluKR_tpevQ",
        f"/ip4/1.2.3.4/tcp/4001/p2p/{PEER_B58}/p2p-circuit/p2p/{PEER_B58}",
        f"/p2p/{PEER_B36}",
        "/dnsaddr/bootstrap.libp2p.io",
        "/dns/example.com/tcp/80/http",
        "/dns/example.com/tcp/443/https",
        "/ip4/1.2.3.4/tcp/4001/noise",
        "/ip4/1.2.3.4/udp/9/quic",
        "/ip4/1.2.3.4/udp/9/webrtc",
        "/ip4/255.255.255.255/tcp/65535",
    ],
)
def test_canonical_strings_round_trip(text: str) -> None:
    assert str(Multiaddr.parse(text)) == text


def test_components_and_values() -> None:
    ma = Multiaddr.parse(f"/ip4/1.2.3.4/tcp/4001/tls/sni/*.libp2p.direct/ws/p2p/{PEER_B58}")
    assert ma.components == (
        ("ip4", "1.2.3.4"),
        ("tcp", "4001"),
        ("tls", None),
        ("sni", "*.libp2p.direct"),
        ("ws", None),
        ("p2p", PEER_B58),
    )
    assert ma.value("sni") == "*.libp2p.direct"
    assert ma.value("tcp") == "4001"
    assert ma.value("ws") is None
    assert ma.value("udp") is None
    assert ma.has("tls") and not ma.has("wss")
    assert ma.protocols == ("ip4", "tcp", "tls", "sni", "ws", "p2p")
    base, peer = ma.without_peer()
    assert peer == PEER_B58
    assert str(base) == "/ip4/1.2.3.4/tcp/4001/tls/sni/*.libp2p.direct/ws"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("/ip6/2001:0DB8:0000::0001/tcp/1", "/ip6/2001:db8::1/tcp/1"),
        ("/ip4/1.2.3.4/tcp/0004001", "/ip4/1.2.3.4/tcp/4001"),
        ("/ip4/1.2.3.4/tcp/4001/", "/ip4/1.2.3.4/tcp/4001"),
        (f"/ipfs/{PEER_B58}", f"/p2p/{PEER_B58}"),
    ],
)
def test_values_are_normalised(text: str, canonical: str) -> None:
    assert str(Multiaddr.parse(text)) == canonical


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("ip4/1.2.3.4/tcp/1", "must start with '/'"),
        ("/", "empty protocol name"),
        ("/ip4/1.2.3.4//tcp/1", "empty protocol name"),
        ("/ip4/1.2.3.999/tcp/1", "bad ip4 address '1.2.3.999'"),
        ("/ip4/01.2.3.4/tcp/1", "bad ip4 address"),
        ("/ip4/::1/tcp/1", "bad ip4 address"),
        ("/ip6/1.2.3.4/tcp/1", "bad ip6 address"),
        ("/ip6/fe80::1%eth0/tcp/1", "zone ids are not allowed"),
        ("/ip4/1.2.3.4/tcp/70000", "bad port '70000': out of range 0-65535"),
        ("/ip4/1.2.3.4/tcp/-1", "bad port '-1'"),
        ("/ip4/1.2.3.4/udp/4k", "bad port '4k'"),
        ("/ip4/1.2.3.4/tcp/٣", "bad port"),
        ("/ip4/1.2.3.4/foo/1", "unknown protocol 'foo'"),
        ("/unix/tmp/sock", "unknown protocol 'unix'"),
        ("/ip4", "protocol 'ip4' needs a value"),
        ("/ip4/1.2.3.4/tcp", "protocol 'tcp' needs a value"),
        ("/ip4/1.2.3.4/tcp/1/tls/sni", "protocol 'sni' needs a value"),
        ("/dns4/-bad.example.com/tcp/1", "invalid label '-bad'"),
        ("/dns4/a..b/tcp/1", "invalid label ''"),
        ("/dns4/*.libp2p.direct/tcp/1", "invalid label '*'"),
        ("/dns4/under_score.com/tcp/1", "invalid label 'under_score'"),
        ("/dns4/" + "a" * 64 + ".com/tcp/1", "invalid label"),
        ("/dns4/" + ".".join(["abcdefgh"] * 30) + "/tcp/1", "longer than 253"),
        ("/ip4/1.2.3.4/tcp/1/tls/sni/a.*.libp2p.direct/ws", "invalid label '*'"),
        ("/ip4/1.2.3.4/tcp/1/tls/sni/*/ws", "invalid label '*'"),
        ("/p2p/QmFoo", "bad peer id 'QmFoo'"),
        ("/p2p/notapeer", "bad peer id"),
        ("/ip4/1.2.3.4/udp/1/quic-v1/webtransport/certhash/x", "bad certhash"),
    ],
)
def test_malformed_addresses_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(MultiaddrError) as info:
        Multiaddr.parse(text)
    message = str(info.value)
    assert problem in message
    assert message.startswith(f"malformed multiaddr {text[:100]!r}"[:-1])


def test_multiaddr_error_is_a_permanent_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        Multiaddr.parse("/ip4/1.2.3.4/tcp/99999")
    assert info.value.error_class is ErrorClass.PERMANENT


def test_non_string_input_is_rejected() -> None:
    with pytest.raises(MultiaddrError, match="not a string"):
        Multiaddr.parse(b"/ip4/1.2.3.4/tcp/1")  # type: ignore[arg-type]


def test_huge_input_is_shortened_in_the_message() -> None:
    with pytest.raises(MultiaddrError) as info:
        Multiaddr.parse("/dns4/" + "a" * 5000)
    assert len(str(info.value)) < 400


# ------------------------------------------------------------------------- public addresses


@pytest.mark.parametrize(
    "text",
    [
        "/ip4/1.2.3.4/tcp/4001",
        "/ip4/8.8.8.8/udp/4001/quic-v1",
        "/ip4/1.2.3.4/tcp/4001/tls/sni/*.libp2p.direct/ws",
        f"/ip4/1.2.3.4/tcp/4001/p2p/{PEER_B58}",
        "/ip6/2606:4700::1111/tcp/4001",
        "/ip6/::ffff:1.2.3.4/tcp/4001",
        "/dns4/example.com/tcp/443/tls/ws",
        "/dnsaddr/bootstrap.libp2p.io",
        f"/dns4/1-2-3-4.{PEER_B36}.libp2p.direct/tcp/443/tls/ws",
        f"/dns6/2606-4700--1111.{PEER_B36}.libp2p.direct/tcp/443/tls/ws",
        "/ip4/100.63.255.255/tcp/1",
        "/ip4/100.128.0.0/tcp/1",
    ],
)
def test_public_addresses(text: str) -> None:
    assert is_publicly_dialable(text)
    assert is_publicly_dialable(Multiaddr.parse(text))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("/ip4/10.1.2.3/tcp/4001", "RFC 1918"),
        ("/ip4/172.16.0.1/tcp/4001", "RFC 1918"),
        ("/ip4/172.31.255.255/tcp/4001", "RFC 1918"),
        ("/ip4/192.168.1.1/tcp/4001", "RFC 1918"),
        ("/ip4/100.64.0.1/tcp/4001", "CGNAT"),
        ("/ip4/100.127.255.255/tcp/4001", "CGNAT"),
        ("/ip4/127.0.0.1/tcp/4001", "loopback"),
        ("/ip4/169.254.1.1/tcp/4001", "link-local"),
        ("/ip4/0.0.0.0/tcp/4001", "unspecified"),
        ("/ip4/192.0.2.1/tcp/4001", "documentation"),
        ("/ip4/198.51.100.1/tcp/4001", "documentation"),
        ("/ip4/203.0.113.1/tcp/4001", "documentation"),
        ("/ip4/198.18.0.1/tcp/4001", "benchmarking"),
        ("/ip4/224.0.0.1/udp/4001", "multicast"),
        ("/ip4/255.255.255.255/udp/4001", "broadcast"),
        ("/ip6/::1/tcp/4001", "loopback"),
        ("/ip6/::/tcp/4001", "unspecified"),
        ("/ip6/fc00::1/tcp/4001", "ULA"),
        ("/ip6/fd12:3456::1/tcp/4001", "ULA"),
        ("/ip6/fe80::1/tcp/4001", "link-local"),
        ("/ip6/64:ff9b::1.2.3.4/tcp/4001", "NAT64"),
        ("/ip6/64:ff9b:1::1/tcp/4001", "local NAT64"),
        ("/ip6/2001:db8::1/tcp/4001", "documentation"),
        ("/ip6/ff02::1/udp/4001", "multicast"),
        ("/ip6/::ffff:10.0.0.1/tcp/4001", "mapped private"),
        ("/ip4/1.2.3.4/tcp/0", "port 0"),
        ("/ip4/1.2.3.4/udp/0/quic-v1", "port 0"),
        ("/ip4/1.2.3.4", "no port"),
        ("/ip4/1.2.3.4/tcp/4001/p2p/" + PEER_B58 + "/p2p-circuit", "relay"),
        (f"/p2p/{PEER_B58}", "no host"),
        ("/dns4/localhost/tcp/4001", "localhost"),
        ("/dns4/foo.localhost/tcp/4001", "localhost"),
        ("/dns4/printer.local/tcp/4001", "mDNS"),
        ("/dns4/node.test/tcp/4001", "RFC 6761"),
        ("/dns4/node.invalid/tcp/4001", "RFC 6761"),
        ("/dns4/example/tcp/4001", "single label"),
        ("/dns4/nas.home.arpa/tcp/4001", "RFC 8375"),
        ("/dns4/svc.internal/tcp/4001", "private use"),
        ("/dnsaddr/foo.local", "mDNS"),
        (f"/dns4/10-0-0-1.{PEER_B36}.libp2p.direct/tcp/443/tls/ws", "forge name of a private IP"),
        (f"/dns6/0--1.{PEER_B36}.libp2p.direct/tcp/443/tls/ws", "forge name of ::1"),
    ],
)
def test_non_public_addresses(text: str, why: str) -> None:
    assert not is_publicly_dialable(text), why


def test_is_publicly_dialable_raises_on_malformed() -> None:
    with pytest.raises(MultiaddrError, match="bad ip4 address"):
        is_publicly_dialable("/ip4/1.2.3/tcp/1")


def test_select_dialable_keeps_order_drops_duplicates_and_non_public() -> None:
    addresses = [
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/1.2.3.4/tcp/4001",
        "/ip4/192.168.1.5/tcp/4001",
        "/ip6/2606:4700:0::1111/tcp/4001",
        "/ip4/1.2.3.4/tcp/4001",
        "/ip4/5.6.7.8/tcp/4002/tls/sni/*.libp2p.direct/ws",
        "/ip6/2606:4700::1111/tcp/4001",
        "/ip4/0.0.0.0/tcp/4001",
    ]
    assert select_dialable(addresses) == [
        "/ip4/1.2.3.4/tcp/4001",
        "/ip6/2606:4700::1111/tcp/4001",
        "/ip4/5.6.7.8/tcp/4002/tls/sni/*.libp2p.direct/ws",
    ]


def test_select_dialable_for_a_private_network() -> None:
    addresses = [
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/192.168.1.5/tcp/4001",
        "/ip6/::1/tcp/4001",
        "/ip6/fe80::1/tcp/4001",
        "/dns4/localhost/tcp/4001",
        "/ip4/1.2.3.4/tcp/4001",
        "/ip4/0.0.0.0/tcp/4001",
        "/ip6/::/tcp/4001",
        "/ip4/127.0.0.1/tcp/0",
        "/ip4/224.0.0.1/udp/4001",
        "/ip4/240.0.0.1/tcp/4001",
        f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER_B58}/p2p-circuit",
        "/ip4/127.0.0.1/tcp/4001",
    ]
    assert select_dialable(addresses, allow_private=True) == [
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/192.168.1.5/tcp/4001",
        "/ip6/::1/tcp/4001",
        "/ip6/fe80::1/tcp/4001",
        "/dns4/localhost/tcp/4001",
        "/ip4/1.2.3.4/tcp/4001",
    ]


def test_select_dialable_raises_naming_the_malformed_address() -> None:
    with pytest.raises(MultiaddrError, match=r"'/ip4/1\.2\.3\.4/tcp/70000'.*out of range"):
        select_dialable(["/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/70000"])


# ------------------------------------------------------------------------------- IP labels


@pytest.mark.parametrize(
    ("ip", "label"),
    [
        ("1.2.3.4", "1-2-3-4"),
        ("0.0.0.0", "0-0-0-0"),
        ("2001:db8::1", "2001-db8--1"),
        ("::1", "0--1"),
        ("::", "0--0"),
        ("1::", "1--0"),
        ("2001:DB8:0:0:1:0:0:1", "2001-db8--1-0-0-1"),
        ("2001:db8:0:1:1:1:1:1", "2001-db8-0-1-1-1-1-1"),
        ("fe80::1", "fe80--1"),
    ],
)
def test_ip_label(ip: str, label: str) -> None:
    assert ip_label(ip) == label
    assert ip_from_label(label) == str(ipaddress.ip_address(ip))


@pytest.mark.parametrize("bad", ["", "1.2.3", "1.2.3.4.5", "gg::1", "fe80::1%eth0", "1-2-3-4"])
def test_ip_label_rejects_non_ips(bad: str) -> None:
    with pytest.raises(MultiaddrError, match="bad IP address"):
        ip_label(bad)


@pytest.mark.parametrize(
    "bad", ["", "1-2-3", "zz--1", "1.2.3.4", "1-2-3-4-5", "--", "-1-2-3-4", "1--"]
)
def test_ip_from_label_rejects_non_labels(bad: str) -> None:
    with pytest.raises(MultiaddrError, match="bad forge IP label"):
        ip_from_label(bad)


_ip_addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@given(_ip_addresses)
def test_every_ip_label_is_a_dns_label_and_reversible(ip: ipaddress._BaseAddress) -> None:
    label = ip_label(str(ip))
    assert 0 < len(label) <= 63
    assert not label.startswith("-") and not label.endswith("-")
    assert set(label) <= set("0123456789abcdef-")
    assert ipaddress.ip_address(ip_from_label(label)) == ip


@given(_ip_addresses, st.integers(0, 65535), st.sampled_from(["/tls/ws", "/wss", ""]))
def test_generated_addresses_round_trip(ip: ipaddress._BaseAddress, port: int, tail: str) -> None:
    proto = "ip4" if ip.version == 4 else "ip6"
    text = f"/{proto}/{ip}/tcp/{port}{tail}"
    parsed = Multiaddr.parse(text)
    assert str(parsed) == text
    assert Multiaddr.parse(str(parsed)) == parsed


# ------------------------------------------------------------------------ forge addresses


def test_forge_domain_and_wildcard_name() -> None:
    assert forge_domain(PEER_B36) == f"{PEER_B36}.libp2p.direct"
    assert wildcard_name(PEER_B36) == f"*.{PEER_B36}.libp2p.direct"
    assert forge_domain(PEER_B36, zone="Forge.Example.") == f"{PEER_B36}.forge.example"
    assert len(wildcard_name(PEER_B36)) == 78  # protocol.md §1: longer than the 64-char CN limit


@pytest.mark.parametrize("bad", ["", PEER_B58, "K51QZI", "k" + "a" * 63, f"{PEER_B36}.x"])
def test_forge_domain_rejects_bad_peer_labels(bad: str) -> None:
    with pytest.raises(MultiaddrError, match="bad peer label"):
        forge_domain(bad)


def test_forge_domain_rejects_bad_zone() -> None:
    with pytest.raises(MultiaddrError, match="bad forge zone"):
        forge_domain(PEER_B36, zone="bad zone")


@pytest.mark.parametrize(
    ("listener", "long", "short"),
    [
        (
            "/ip4/1.2.3.4/tcp/4002/tls/sni/*.libp2p.direct/ws",
            f"/ip4/1.2.3.4/tcp/4002/tls/sni/1-2-3-4.{PEER_B36}.libp2p.direct/ws",
            f"/dns4/1-2-3-4.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
        ),
        (
            "/ip4/1.2.3.4/tcp/4002/tls/ws",
            f"/ip4/1.2.3.4/tcp/4002/tls/sni/1-2-3-4.{PEER_B36}.libp2p.direct/ws",
            f"/dns4/1-2-3-4.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
        ),
        (
            "/ip4/1.2.3.4/tcp/4002/wss",
            f"/ip4/1.2.3.4/tcp/4002/tls/sni/1-2-3-4.{PEER_B36}.libp2p.direct/ws",
            f"/dns4/1-2-3-4.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
        ),
        (
            f"/ip4/1.2.3.4/tcp/4002/tls/sni/*.{PEER_B36}.libp2p.direct/ws",
            f"/ip4/1.2.3.4/tcp/4002/tls/sni/1-2-3-4.{PEER_B36}.libp2p.direct/ws",
            f"/dns4/1-2-3-4.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
        ),
        (
            f"/ip6/2001:db8::1/tcp/443/tls/sni/*.libp2p.direct/ws/p2p/{PEER_B58}",
            f"/ip6/2001:db8::1/tcp/443/tls/sni/2001-db8--1.{PEER_B36}.libp2p.direct/ws/p2p/{PEER_B58}",
            f"/dns6/2001-db8--1.{PEER_B36}.libp2p.direct/tcp/443/tls/ws/p2p/{PEER_B58}",
        ),
        (
            "/ip6/::1/tcp/443/wss",
            f"/ip6/::1/tcp/443/tls/sni/0--1.{PEER_B36}.libp2p.direct/ws",
            f"/dns6/0--1.{PEER_B36}.libp2p.direct/tcp/443/tls/ws",
        ),
    ],
)
def test_forge_addresses_long_and_short(listener: str, long: str, short: str) -> None:
    assert forge_addresses([listener], PEER_B36) == [long, short]
    assert forge_addresses([listener], PEER_B36, forms=("short",)) == [short]
    assert forge_addresses([listener], PEER_B36, forms=("short", "long")) == [short, long]
    # a long forge address is itself a listener form: forging it again changes nothing
    assert forge_addresses([long], PEER_B36, forms=("long",)) == [long]


def test_forge_addresses_ignores_what_it_cannot_forge() -> None:
    addresses = [
        "/ip4/1.2.3.4/tcp/4001",  # plain TCP
        "/ip4/0.0.0.0/tcp/4002/tls/sni/*.libp2p.direct/ws",  # unspecified
        "/ip6/::/tcp/4002/tls/ws",  # unspecified
        "/ip4/1.2.3.4/tcp/0/tls/ws",  # port 0
        "/ip4/1.2.3.4/tcp/4003/ws",  # no TLS
        "/ip4/1.2.3.4/tcp/4004/tls/sni/example.com/ws",  # someone else's certificate
        "/ip4/1.2.3.4/tcp/4005/tls/sni/*.other.zone/ws",
        "/dns4/example.com/tcp/443/tls/ws",  # not an IP
        "/ip4/1.2.3.4/udp/4001/quic-v1",
        "/ip6/::ffff:1.2.3.4/tcp/443/tls/ws",  # v4-mapped: the forge would answer a useless AAAA
        f"/ip4/1.2.3.4/tcp/4001/p2p/{PEER_B58}/p2p-circuit/tls/ws",
    ]
    assert forge_addresses(addresses, PEER_B36) == []


def test_forge_addresses_keeps_order_and_drops_duplicates() -> None:
    addresses = [
        "/ip4/5.6.7.8/tcp/443/tls/ws",
        "/ip4/1.2.3.4/tcp/4002/wss",
        "/ip4/5.6.7.8/tcp/443/tls/sni/*.libp2p.direct/ws",
    ]
    assert forge_addresses(addresses, PEER_B36) == [
        f"/ip4/5.6.7.8/tcp/443/tls/sni/5-6-7-8.{PEER_B36}.libp2p.direct/ws",
        f"/dns4/5-6-7-8.{PEER_B36}.libp2p.direct/tcp/443/tls/ws",
        f"/ip4/1.2.3.4/tcp/4002/tls/sni/1-2-3-4.{PEER_B36}.libp2p.direct/ws",
        f"/dns4/1-2-3-4.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
    ]


def test_forge_addresses_in_another_zone() -> None:
    assert forge_addresses(
        ["/ip4/1.2.3.4/tcp/443/tls/sni/*.forge.test/ws"], PEER_B36, zone="forge.test"
    ) == [
        f"/ip4/1.2.3.4/tcp/443/tls/sni/1-2-3-4.{PEER_B36}.forge.test/ws",
        f"/dns4/1-2-3-4.{PEER_B36}.forge.test/tcp/443/tls/ws",
    ]


def test_forged_addresses_parse_and_are_public_for_public_ips() -> None:
    forged = forge_addresses(["/ip4/1.2.3.4/tcp/443/tls/ws"], PEER_B36)
    assert all(is_publicly_dialable(a) for a in forged)
    private = forge_addresses(["/ip4/192.168.1.2/tcp/443/tls/ws"], PEER_B36)
    assert private and not any(is_publicly_dialable(a) for a in private)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"forms": ("long", "medium")}, "unknown forge address form 'medium'"),
        ({"forms": "long"}, "must be a sequence"),
        ({"zone": ""}, "bad forge zone"),
    ],
)
def test_forge_addresses_rejects_bad_parameters(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(MultiaddrError, match=problem):
        forge_addresses(["/ip4/1.2.3.4/tcp/443/tls/ws"], PEER_B36, **kwargs)  # type: ignore[arg-type]


def test_forge_addresses_rejects_malformed_input() -> None:
    with pytest.raises(MultiaddrError, match="bad ip4 address"):
        forge_addresses(["/ip4/1.2.3.4.5/tcp/443/tls/ws"], PEER_B36)


def test_advertised_forge_addresses_are_short_forms_of_dialable_wss_listeners() -> None:
    addresses = [
        "/ip4/1.2.3.4/tcp/4001",  # plain TCP: nothing to forge
        "/ip4/1.2.3.4/tcp/4002/tls/sni/*.libp2p.direct/ws",
        "/ip4/192.168.1.5/tcp/4002/tls/sni/*.libp2p.direct/ws",  # private
        "/ip4/127.0.0.1/tcp/4003/wss",  # loopback
        "/ip6/2606:4700::1/tcp/4002/tls/ws",
        "/ip6/fd00::5/tcp/4002/tls/ws",  # ULA: private
        "/ip4/0.0.0.0/tcp/4002/tls/sni/*.libp2p.direct/ws",  # unspecified: nobody dials it
        "/ip4/1.2.3.4/tcp/4002/wss",  # the same listener again
    ]
    assert advertised_forge_addresses(addresses, PEER_B36) == [
        f"/dns4/1-2-3-4.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
        f"/dns6/2606-4700--1.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
    ]
    assert advertised_forge_addresses(addresses, PEER_B36, allow_private=True) == [
        f"/dns4/1-2-3-4.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
        f"/dns4/192-168-1-5.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
        f"/dns4/127-0-0-1.{PEER_B36}.libp2p.direct/tcp/4003/tls/ws",
        f"/dns6/2606-4700--1.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
        f"/dns6/fd00--5.{PEER_B36}.libp2p.direct/tcp/4002/tls/ws",
    ]
    assert advertised_forge_addresses([], PEER_B36) == []
    with pytest.raises(MultiaddrError, match="malformed multiaddr"):
        advertised_forge_addresses(["/ip4/1.2.3.4/tcp/x/tls/ws"], PEER_B36)
