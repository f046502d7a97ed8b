"""Multiaddrs as AutoTLS needs them: parsing, the broker's address rules, forge names.

This module owns every decision about address *strings*:

* :class:`Multiaddr` parses and prints the string form, validating each value. It is our own
  parser because the ``multiaddr`` package (0.2.0) rejects ``*`` in ``/sni/``, and the
  listener form ``/ip4/0.0.0.0/tcp/P/tls/sni/*.libp2p.direct/ws`` is exactly what AutoTLS
  nodes use (protocol.md §5). IPv6 values and ports are printed canonically (RFC 5952
  compressed form, no leading zeros), so equal addresses print equally.
* :func:`is_publicly_dialable` / :func:`select_dialable` decide which addresses may be sent
  to the broker. The production broker does not filter (protocol.md §4), so we do, with
  go-multiaddr's ``manet.IsPublicAddr`` ranges plus NAT64, which the broker cannot reach
  through: private (RFC 1918, CGNAT 100.64/10, ULA fc00::/7), loopback, link-local,
  unspecified, documentation/benchmark/reserved ranges, multicast, NAT64, ``/p2p-circuit``
  and port 0 are never public; IPv6 must be global unicast (2000::/3). DNS names are public
  unless they are special-use (``localhost``, ``.local``, ``.test``, ``.invalid``,
  ``.example``, ``.internal``, ``.home.arpa``, ``.onion``, reverse-DNS zones), single-label
  (resolvable only through a local search path), or a forge name whose label encodes a
  non-public IP (``10-0-0-1.<peer>.libp2p.direct`` resolves to 10.0.0.1).
* :func:`ip_label` / :func:`ip_from_label` are the forge zone's IP<->label mapping
  (protocol.md §4) and :func:`forge_addresses` builds the long and short forge addresses to
  announce once the wildcard certificate is held (protocol.md §5);
  :func:`advertised_forge_addresses` picks what a node advertises to browsers.

Everything here is pure: no sockets, no DNS, no dependency on the ``multiaddr`` package.
Malformed input raises :class:`MultiaddrError`, whose message names the address and the
problem.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from autotls.fsm.errors import ConfigurationError
from autotls.peerid import PeerId, PeerIdError

__all__ = [
    "DEFAULT_ZONE",
    "ForgeForm",
    "Multiaddr",
    "MultiaddrError",
    "advertised_forge_addresses",
    "forge_addresses",
    "forge_domain",
    "ip_from_label",
    "ip_label",
    "is_publicly_dialable",
    "select_dialable",
    "wildcard_name",
]

DEFAULT_ZONE = "libp2p.direct"

ForgeForm = Literal["long", "short"]


class MultiaddrError(ConfigurationError, ValueError):
    """A multiaddr (or IP label, forge parameter) is malformed; the message says which and why.
    A ``ValueError``, as the standard library's ``ipaddress`` parse errors are."""


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_Validator = Callable[[str], str]


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _validate_ip4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"bad ip4 address {value!r}") from None


def _validate_ip6(value: str) -> str:
    if "%" in value:
        # go-multiaddr carries zones in a separate /ip6zone component; a zone inside /ip6/
        # is malformed there, and an address with a zone is never useful to the broker.
        raise ValueError(f"bad ip6 address {value!r}: zone ids are not allowed")
    try:
        return ipaddress.IPv6Address(value).compressed
    except ValueError:
        raise ValueError(f"bad ip6 address {value!r}") from None


def _validate_port(value: str) -> str:
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"bad port {value!r}: not a decimal number")
    port = int(value)
    if port > 65535:
        raise ValueError(f"bad port {value!r}: out of range 0-65535")
    return str(port)


_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


def _check_dns_name(value: str, *, allow_wildcard: bool) -> str:
    name = value[:-1] if value.endswith(".") else value
    if not name:
        raise ValueError("empty DNS name")
    if len(name) > 253:
        raise ValueError(f"DNS name {_shorten(value)!r} is longer than 253 characters")
    labels = name.split(".")
    if allow_wildcard and labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    for label in labels:
        if not _DNS_LABEL.fullmatch(label):
            raise ValueError(f"bad DNS name {_shorten(value)!r}: invalid label {label!r}")
    return value


def _validate_dns(value: str) -> str:
    return _check_dns_name(value, allow_wildcard=False)


def _validate_sni(value: str) -> str:
    return _check_dns_name(value, allow_wildcard=True)


_MULTIBASE_PREFIXES = frozenset("bBcCfFkKmMuUzZ")
_MULTIBASE_BODY = re.compile(r"[A-Za-z0-9_\-+/=]+")


def _validate_certhash(value: str) -> str:
    if (
        len(value) < 2
        or value[0] not in _MULTIBASE_PREFIXES
        or not _MULTIBASE_BODY.fullmatch(value[1:])
    ):
        raise ValueError(f"bad certhash {value!r}: not a multibase string")
    return value


def _validate_peer_id(value: str) -> str:
    if value != value.strip():
        raise ValueError(f"bad peer id {_shorten(value)!r}: surrounding whitespace")
    try:
        PeerId.from_string(value)
    except PeerIdError as exc:
        raise ValueError(f"bad peer id {_shorten(value)!r}: {exc.message}") from None
    return value


# name -> validator of its value (None: the protocol takes no value)
_PROTOCOLS: dict[str, _Validator | None] = {
    "ip4": _validate_ip4,
    "ip6": _validate_ip6,
    "dns": _validate_dns,
    "dns4": _validate_dns,
    "dns6": _validate_dns,
    "dnsaddr": _validate_dns,
    "tcp": _validate_port,
    "udp": _validate_port,
    "quic": None,
    "quic-v1": None,
    "webtransport": None,
    "certhash": _validate_certhash,
    "webrtc": None,
    "webrtc-direct": None,
    "tls": None,
    "sni": _validate_sni,
    "ws": None,
    "wss": None,
    "noise": None,
    "p2p": _validate_peer_id,
    "p2p-circuit": None,
    "http": None,
    "https": None,
}

# The legacy name of /p2p/, still found in configurations; printed as /p2p/.
_ALIASES = {"ipfs": "p2p"}

Component = tuple[str, str | None]


@dataclass(frozen=True)
class Multiaddr:
    """A parsed multiaddr: a sequence of (protocol, value) pairs, value ``None`` when the
    protocol takes none. Build with :meth:`parse`; ``str()`` gives the canonical string."""

    components: tuple[Component, ...]

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        if not isinstance(text, str):
            raise MultiaddrError(f"malformed multiaddr {text!r}: not a string")
        if not text:
            raise MultiaddrError("malformed multiaddr '': empty")
        shown = _shorten(text)
        if not text.startswith("/"):
            raise MultiaddrError(f"malformed multiaddr {shown!r}: must start with '/'")
        parts = text[1:].split("/")
        if len(parts) > 1 and parts[-1] == "":
            parts.pop()  # one trailing slash is tolerated, as go-multiaddr does
        components: list[Component] = []
        index = 0
        while index < len(parts):
            name = parts[index]
            if not name:
                raise MultiaddrError(f"malformed multiaddr {shown!r}: empty protocol name")
            name = _ALIASES.get(name, name)
            if name not in _PROTOCOLS:
                raise MultiaddrError(
                    f"malformed multiaddr {shown!r}: unknown protocol {_shorten(name, 40)!r}"
                )
            validator = _PROTOCOLS[name]
            if validator is None:
                components.append((name, None))
                index += 1
                continue
            if index + 1 >= len(parts) or parts[index + 1] == "":
                raise MultiaddrError(
                    f"malformed multiaddr {shown!r}: protocol {name!r} needs a value"
                )
            try:
                value = validator(parts[index + 1])
            except ValueError as exc:
                raise MultiaddrError(f"malformed multiaddr {shown!r}: {exc}") from None
            components.append((name, value))
            index += 2
        return cls(tuple(components))

    def __str__(self) -> str:
        return "".join(
            f"/{name}" if value is None else f"/{name}/{value}" for name, value in self.components
        )

    @property
    def protocols(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.components)

    def has(self, proto: str) -> bool:
        return any(name == proto for name, _ in self.components)

    def value(self, proto: str) -> str | None:
        """The value of the first ``proto`` component; ``None`` if absent or valueless."""
        for name, value in self.components:
            if name == proto:
                return value
        return None

    def without_peer(self) -> tuple[Multiaddr, str | None]:
        """Split a trailing ``/p2p/<id>`` off: (the rest, the id or ``None``)."""
        if self.components and self.components[-1][0] == "p2p":
            return Multiaddr(self.components[:-1]), self.components[-1][1]
        return self, None


def _coerce(addr: Multiaddr | str) -> Multiaddr:
    return addr if isinstance(addr, Multiaddr) else Multiaddr.parse(addr)


# --------------------------------------------------------------------------------------------
# Which addresses the broker may be given
# --------------------------------------------------------------------------------------------

_NON_PUBLIC_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network", includes the unspecified address
        "10.0.0.0/8",
        "100.64.0.0/10",  # CGNAT shared address space
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments (go uses /26; the whole /24 is special)
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes broadcast
    )
)
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NON_PUBLIC_V6 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "2001:db8::/32",  # documentation
        "64:ff9b::/96",  # NAT64 (outside 2000::/3 anyway; listed to make the rule explicit)
        "64:ff9b:1::/48",
    )
)

# Names that never resolve to the node from the broker's side of the Internet.
_SPECIAL_USE_SUFFIXES = (
    "localhost",
    "local",
    "test",
    "invalid",
    "example",
    "internal",
    "home.arpa",
    "in-addr.arpa",
    "ip6.arpa",
    "onion",
)

_HOST_PROTOCOLS = frozenset({"ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr"})


def _ip_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _ip_is_public(ip.ipv4_mapped)
        return ip in _GLOBAL_UNICAST_V6 and not any(ip in net for net in _NON_PUBLIC_V6)
    return not any(ip in net for net in _NON_PUBLIC_V4)


def _ip_is_dialable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Could anything (even on a private network) dial this IP at all?"""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _ip_is_dialable(ip.ipv4_mapped)
    if ip.is_unspecified or ip.is_multicast:
        return False
    return not (
        isinstance(ip, ipaddress.IPv4Address) and (ip in _NON_PUBLIC_V4[0] or ip.is_reserved)
    )


def _name_is_public(name: str, zone: str = DEFAULT_ZONE) -> bool:
    lowered = name.lower().rstrip(".")
    if "." not in lowered:
        return False
    for suffix in _SPECIAL_USE_SUFFIXES:
        if lowered == suffix or lowered.endswith("." + suffix):
            return False
    zone = zone.lower()
    if lowered.endswith("." + zone):
        labels = lowered[: -len(zone) - 1].split(".")
        if len(labels) == 2:  # <ip label>.<peer>.<zone>: the answer is computed from the label
            try:
                return _ip_is_public(ipaddress.ip_address(ip_from_label(labels[0])))
            except MultiaddrError:
                return True  # not an IP label: the broker decides what it resolves to
    return True


def _dial_shape(ma: Multiaddr) -> str | None:
    """Why ``ma`` cannot be dialed by anyone, or ``None`` if its shape is dialable."""
    if not ma.components or ma.components[0][0] not in _HOST_PROTOCOLS:
        return "does not start with an IP address or DNS name"
    if ma.has("p2p-circuit"):
        return "is a relay address"
    if ma.components[0][0] == "dnsaddr":
        return None  # resolves to complete multiaddrs: no transport follows
    if len(ma.components) < 2 or ma.components[1][0] not in ("tcp", "udp"):
        return "has no tcp or udp port"
    if any(name in ("tcp", "udp") and value == "0" for name, value in ma.components):
        return "has port 0"
    return None


def is_publicly_dialable(addr: Multiaddr | str) -> bool:
    """True when the broker, from the public Internet, could dial ``addr``.

    Malformed strings raise :class:`MultiaddrError`: callers pass the node's own addresses,
    so garbage there is a bug to surface, not an address to skip quietly.
    """
    ma = _coerce(addr)
    if _dial_shape(ma) is not None:
        return False
    proto, value = ma.components[0]
    assert value is not None  # host protocols always carry a value
    if proto in ("ip4", "ip6"):
        return _ip_is_public(ipaddress.ip_address(value))
    return _name_is_public(value)


def _is_dialable_privately(ma: Multiaddr) -> bool:
    if _dial_shape(ma) is not None:
        return False
    proto, value = ma.components[0]
    assert value is not None
    if proto in ("ip4", "ip6"):
        return _ip_is_dialable(ipaddress.ip_address(value))
    return True


def select_dialable(addresses: Iterable[str], *, allow_private: bool = False) -> list[str]:
    """The addresses to send to the broker, canonical, in the given order, without duplicates.

    By default only :func:`is_publicly_dialable` ones. ``allow_private`` (a private test
    network such as the local stack) also keeps private, loopback and link-local addresses
    and any DNS name, but still drops what nobody can dial: unspecified and multicast IPs,
    port 0 and relay addresses. A malformed address raises :class:`MultiaddrError`.
    """
    selected: list[str] = []
    seen: set[str] = set()
    for text in addresses:
        ma = Multiaddr.parse(text)
        keep = _is_dialable_privately(ma) if allow_private else is_publicly_dialable(ma)
        canonical = str(ma)
        if keep and canonical not in seen:
            seen.add(canonical)
            selected.append(canonical)
    return selected


# --------------------------------------------------------------------------------------------
# The forge zone: IP labels, names and addresses
# --------------------------------------------------------------------------------------------


def ip_label(ip: str) -> str:
    """The DNS label the forge zone maps back to ``ip`` (protocol.md §4).

    IPv4: dots become dashes (``1.2.3.4`` -> ``1-2-3-4``). IPv6: the compressed form with
    colons as dashes, a leading or trailing dash padded with ``0`` so the label is valid DNS
    (``2001:db8::1`` -> ``2001-db8--1``, ``::1`` -> ``0--1``).
    """
    if not isinstance(ip, str) or "%" in ip:
        raise MultiaddrError(f"bad IP address {ip!r} for a forge label")
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        raise MultiaddrError(f"bad IP address {_shorten(ip)!r} for a forge label") from None
    if isinstance(parsed, ipaddress.IPv4Address):
        return str(parsed).replace(".", "-")
    label = parsed.compressed.replace(":", "-")
    if label.startswith("-"):
        label = "0" + label
    if label.endswith("-"):
        label += "0"
    return label


def ip_from_label(label: str) -> str:
    """The IP a forge label stands for (inverse of :func:`ip_label`), canonical form."""
    # ip_label never starts or ends with a dash (that would not be a DNS label), so neither
    # may its input; the rest is decoded as leniently as the forge's resolver does.
    if not isinstance(label, str) or not re.fullmatch(
        r"[0-9a-fA-F](?:[0-9a-fA-F-]*[0-9a-fA-F])?", label
    ):
        raise MultiaddrError(f"bad forge IP label {label!r}")
    try:
        return str(ipaddress.IPv4Address(label.replace("-", ".")))
    except ValueError:
        pass
    try:
        return ipaddress.IPv6Address(label.replace("-", ":")).compressed
    except ValueError:
        raise MultiaddrError(f"bad forge IP label {_shorten(label)!r}: not an IP") from None


def _check_peer_label(peer_b36: str) -> str:
    # A libp2p-key CIDv1 in base36 is "k" + lowercase base36; Ed25519 ones are 62 characters,
    # sha256 ones 56. It must fit one DNS label.
    if not isinstance(peer_b36, str) or not re.fullmatch(r"k[0-9a-z]{1,62}", peer_b36):
        raise MultiaddrError(
            f"bad peer label {peer_b36!r}: expected the base36 CID form 'k...' (at most 63 chars)"
        )
    return peer_b36


def _check_zone(zone: str) -> str:
    try:
        _check_dns_name(zone, allow_wildcard=False)
    except ValueError as exc:
        raise MultiaddrError(f"bad forge zone {zone!r}: {exc}") from None
    return zone.rstrip(".").lower()


def forge_domain(peer_b36: str, zone: str = DEFAULT_ZONE) -> str:
    """``<peer_b36>.<zone>``: the name under which the forge serves this peer's records."""
    return f"{_check_peer_label(peer_b36)}.{_check_zone(zone)}"


def wildcard_name(peer_b36: str, zone: str = DEFAULT_ZONE) -> str:
    """``*.<peer_b36>.<zone>``: the one identifier of this peer's certificate order."""
    return "*." + forge_domain(peer_b36, zone)


def _tls_ws_listener(
    ma: Multiaddr, peer_b36: str, zone: str
) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, str] | None:
    """(ip protocol, ip, port) when ``ma`` is a concrete TLS WebSocket listener we can forge."""
    comps = ma.components
    if len(comps) < 3 or comps[0][0] not in ("ip4", "ip6") or comps[1][0] != "tcp":
        return None
    ip_proto, ip_text = comps[0]
    port = comps[1][1]
    assert ip_text is not None and port is not None
    ip = ipaddress.ip_address(ip_text)
    if ip.is_unspecified or port == "0":
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return None  # the forge would answer an AAAA of ::ffff:a.b.c.d: useless to dialers
    tail = comps[2:]
    if tail in ((("tls", None), ("ws", None)), (("wss", None),)):
        return ip_proto, ip, port
    if len(tail) == 3 and tail[0] == ("tls", None) and tail[2] == ("ws", None):
        sni = (tail[1][1] or "").lower().rstrip(".")
        accepted = {
            f"*.{zone}",
            f"*.{peer_b36}.{zone}",
            f"{ip_label(str(ip))}.{peer_b36}.{zone}",
        }
        if sni in accepted:
            return ip_proto, ip, port
    return None


def forge_addresses(
    addresses: Iterable[str],
    peer_b36: str,
    *,
    forms: Sequence[ForgeForm] = ("long", "short"),
    zone: str = DEFAULT_ZONE,
) -> list[str]:
    """The forge addresses to announce for the node's TLS WebSocket listeners (protocol.md §5).

    For each concrete ip4/ip6 TCP address that is a TLS WebSocket listener (``/tls/ws``,
    ``/wss``, or ``/tls/sni/*.<zone>/ws``), in the given order, the requested ``forms``:

    * ``long``:  ``/ip4/<ip>/tcp/<P>/tls/sni/<label>.<peer>.<zone>/ws``
    * ``short``: ``/dns4/<label>.<peer>.<zone>/tcp/<P>/tls/ws`` (``dns6`` for IPv6)

    A trailing ``/p2p/<id>`` is kept. Other addresses (plain TCP, unspecified IPs, port 0,
    DNS, relays) are ignored; publicness is not judged here (combine with
    :func:`select_dialable`). Duplicates are dropped. Malformed input raises
    :class:`MultiaddrError`.
    """
    _check_peer_label(peer_b36)
    zone = _check_zone(zone)
    if isinstance(forms, str):
        raise MultiaddrError(f"forge forms must be a sequence of 'long'/'short', got {forms!r}")
    for form in forms:
        if form not in ("long", "short"):
            raise MultiaddrError(f"unknown forge address form {form!r}: use 'long' or 'short'")
    result: list[str] = []
    seen: set[str] = set()
    for text in addresses:
        base, peer = Multiaddr.parse(text).without_peer()
        listener = _tls_ws_listener(base, peer_b36, zone)
        if listener is None:
            continue
        ip_proto, ip, port = listener
        host = f"{ip_label(str(ip))}.{peer_b36}.{zone}"
        suffix = f"/p2p/{peer}" if peer is not None else ""
        for form in forms:
            if form == "long":
                forged = f"/{ip_proto}/{ip.compressed}/tcp/{port}/tls/sni/{host}/ws{suffix}"
            else:
                dns = "dns4" if ip_proto == "ip4" else "dns6"
                forged = f"/{dns}/{host}/tcp/{port}/tls/ws{suffix}"
            if forged not in seen:
                seen.add(forged)
                result.append(forged)
    return result


def advertised_forge_addresses(
    addresses: Iterable[str],
    peer_b36: str,
    *,
    allow_private: bool = False,
    zone: str = DEFAULT_ZONE,
) -> list[str]:
    """What a node advertises (identify, peer records) once it holds the certificate: the
    short form ``/dns4|dns6/<label>.<peer>.<zone>/tcp/<P>/tls/ws`` of every secure WebSocket
    address in ``addresses`` that :func:`select_dialable` keeps -- public ones, and private
    ones too with ``allow_private``.

    Only the short form: browsers (js-libp2p) refuse to dial ``/ip4`` addresses that are
    private, and build ``wss://<name>:<P>`` from a ``/dns4`` one, so that is what they can use;
    the long ``/ip4/…/tls/sni/…/ws`` form adds nothing a browser would dial.
    """
    dialable = select_dialable(addresses, allow_private=allow_private)
    return forge_addresses(dialable, peer_b36, forms=("short",), zone=zone)
