"""This machine's IP addresses, and listen addresses expanded to them.

What this module owns, and nothing else: turning ``/ip4/0.0.0.0/...`` (``/ip6/::/...``) —
"every interface" — into the concrete addresses a broker can be told about, and where those
come from (:class:`DialBackAddresses`: the ones given, else a node's listen addresses). The
interface list comes from :func:`psutil.net_if_addrs` (``getifaddrs`` on Linux and the BSDs,
``GetAdaptersAddresses`` on Windows), not from our own ``ioctl`` calls.

IPv6 link-local addresses are left out: they need a zone id (``%eth0``), which a multiaddr
cannot carry. Loopback is kept; which addresses are worth announcing is decided later, by
:func:`autotls.multiaddrs.select_dialable`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["DialBackAddresses", "ListeningNode", "expand_unspecified", "interface_addresses"]

_UNSPECIFIED = (("ip4", "0.0.0.0"), ("ip6", "::"))  # noqa: S104 - recognising, not binding


def interface_addresses() -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) addresses of this machine's interfaces, loopback included, each once."""
    import psutil  # only `run` needs it; the operator commands stay quick to start

    v4: list[str] = []
    v6: list[str] = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ip = ipaddress.ip_address(address.address)
            except ValueError:  # pragma: no cover - the kernel hands out well-formed addresses
                continue
            if isinstance(ip, ipaddress.IPv4Address):
                v4.append(ip.compressed)
            elif not ip.is_link_local:
                # A zone only ever comes with a scoped (link-local) address; strip it anyway,
                # so nothing here can print an address a multiaddr cannot hold.
                v6.append(ip.compressed.partition("%")[0])
    return list(dict.fromkeys(v4)), list(dict.fromkeys(v6))


def expand_unspecified(
    addresses: Sequence[str],
    v4: Sequence[str] | None = None,
    v6: Sequence[str] | None = None,
) -> list[str]:
    """``/ip4/0.0.0.0/...`` once per IPv4 address in ``v4`` (``/ip6/::/...`` per ``v6``);
    other addresses unchanged. Order kept, duplicates dropped. Without ``v4`` and ``v6``,
    this machine's interface addresses (:func:`interface_addresses`), read only when an
    address needs them."""
    from autotls.multiaddrs import Multiaddr

    parsed = [Multiaddr.parse(text) for text in addresses]
    if v4 is None or v6 is None:
        if not any(ma.components[0] in _UNSPECIFIED for ma in parsed):
            return list(dict.fromkeys(str(ma) for ma in parsed))
        v4, v6 = interface_addresses()

    out: list[str] = []
    for ma in parsed:
        proto, ip = ma.components[0]
        rest = ma.components[1:]
        if proto == "ip4" and ip == "0.0.0.0":  # noqa: S104 - recognising, not binding
            out.extend(str(Multiaddr((("ip4", a), *rest))) for a in v4)
        elif proto == "ip6" and ip == "::":
            out.extend(str(Multiaddr((("ip6", a), *rest))) for a in v6)
        else:
            out.append(str(ma))
    return list(dict.fromkeys(out))


class ListeningNode(Protocol):
    """What :meth:`autotls.AutoTLS.attach` reads: the addresses a node is bound to (a
    :class:`autotls.node.Libp2pNode` is one)."""

    @property
    def listen_addresses(self) -> Sequence[str]: ...


class DialBackAddresses:
    """What the broker is told to dial back: ``given`` (a list, or a callable read at each
    call) when there is one, else the listen addresses of the attached :attr:`node` with
    ``0.0.0.0`` / ``::`` expanded to this machine's interface addresses; else nothing."""

    def __init__(self, given: Sequence[str] | Callable[[], Sequence[str]] | None) -> None:
        self.given = given
        self.node: ListeningNode | None = None

    def __call__(self) -> list[str]:
        if self.given is not None:
            return list(self.given() if callable(self.given) else self.given)
        if self.node is None:
            return []
        return expand_unspecified(list(self.node.listen_addresses))
