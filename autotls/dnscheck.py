"""Is the DNS-01 TXT record visible yet? Asked of the zone's authoritative servers directly.

Recursive resolvers cache negative answers for up to a day (the libp2p.direct SOA minimum,
protocol.md §4), so asking one could report "missing" long after the broker published the
value. We find the zone's NS set once (cached for its TTL), resolve each server's
addresses, and query every one of them for ``_acme-challenge.<peer>.libp2p.direct TXT``;
the record is visible when every server that answers serves the expected value (ACME
validates against any of them). Servers can be given explicitly (``host:port``), which is how
the local stack points the check at pebble-challtestsrv.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver

from autotls.fsm.clock import Clock, SystemClock
from autotls.fsm.errors import ConfigurationError, TransientError
from autotls.fsm.ports import TxtCheck

log = logging.getLogger(__name__)

DEFAULT_ZONE = "libp2p.direct"
MIN_NS_CACHE_S = 60.0


class NameserverError(ConfigurationError, ValueError):
    """A DNS server given as text is malformed (the message names it and says why)."""


@dataclass(frozen=True)
class NameServer:
    address: str  # an IP address
    port: int = 53
    name: str | None = None  # the NS host name, for messages

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        label = f"{host}:{self.port}"
        return f"{self.name} ({label})" if self.name else label


def parse_nameserver(text: str) -> NameServer:
    """``HOST:PORT``, ``HOST`` (port 53) or ``[V6]:PORT``; HOST must be an IP address."""
    spec = text.strip()
    port = 53
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep:
            raise NameserverError(f"DNS server {text!r}: missing ']'")
        if rest:
            if not rest.startswith(":"):
                raise NameserverError(f"DNS server {text!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], text)
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        port = _port(port_text, text)
    else:
        host = spec
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise NameserverError(
            f"DNS server {text!r}: {host!r} is not an IP address (give HOST:PORT with an IP)"
        ) from None
    return NameServer(address, port)


def _port(value: str, text: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise NameserverError(f"DNS server {text!r}: bad port {value!r}")
    return int(value)


class AuthoritativeTxtChecker:
    """The engine's DNS port (``autotls.fsm.ports.DnsPort``)."""

    def __init__(
        self,
        *,
        zone: str = DEFAULT_ZONE,
        nameservers: Sequence[NameServer] | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
        timeout: float = 3.0,
        clock: Clock | None = None,
    ) -> None:
        self.zone = zone.rstrip(".")
        self.fixed = list(nameservers) if nameservers else None
        self.resolver = resolver
        self.timeout = timeout
        self.clock = clock or SystemClock()  # how long the zone's NS set is cached
        self._cached: list[NameServer] | None = None
        self._cached_until = datetime.min.replace(tzinfo=UTC)

    async def nameservers(self) -> list[NameServer]:
        if self.fixed is not None:
            return self.fixed
        if self._cached is not None and self.clock.now() < self._cached_until:
            return self._cached
        servers, ttl = await self._discover()
        lasts = timedelta(seconds=max(ttl, MIN_NS_CACHE_S))
        self._cached, self._cached_until = servers, self.clock.now() + lasts
        return servers

    async def _discover(self) -> tuple[list[NameServer], float]:
        resolver = self.resolver or dns.asyncresolver.Resolver()
        try:
            answer = await resolver.resolve(self.zone, "NS", lifetime=self.timeout * 2)
        except (dns.exception.DNSException, OSError) as exc:
            raise TransientError(f"cannot find the name servers of {self.zone}: {exc}") from None
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else MIN_NS_CACHE_S
        hosts = sorted(str(rr.target).rstrip(".") for rr in answer)
        servers: list[NameServer] = []
        for host in hosts:
            for rdtype in ("A", "AAAA"):
                try:
                    addrs = await resolver.resolve(host, rdtype, lifetime=self.timeout * 2)
                except (dns.exception.DNSException, OSError):
                    continue
                servers.extend(NameServer(str(rr.address), 53, host) for rr in addrs)
        if not servers:
            raise TransientError(f"none of the name servers of {self.zone} resolved: {hosts}")
        return servers, ttl

    async def check_txt(self, name: str, expected: str) -> TxtCheck:
        servers = await self.nameservers()
        results = await asyncio.gather(*(self._ask(s, name, expected) for s in servers))
        report = {str(server): verdict for server, verdict in zip(servers, results, strict=True)}
        answered = [v for v in results if not v.startswith("error")]
        if not answered:
            raise TransientError(f"no name server answered for {name}: {report}")
        visible = all(v == "ok" for v in answered)
        log.debug("TXT %s on %d server(s): %s", name, len(servers), report)
        return TxtCheck(visible, report)

    async def _ask(self, server: NameServer, name: str, expected: str) -> str:
        query = dns.message.make_query(dns.name.from_text(name), dns.rdatatype.TXT)
        query.flags &= ~dns.flags.RD  # authoritative servers: no recursion wanted
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, server.address, port=server.port, timeout=self.timeout
            )
        except (dns.exception.DNSException, OSError) as exc:
            return f"error: {type(exc).__name__}: {exc}".rstrip(": ")
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return "missing"
        if rcode != dns.rcode.NOERROR:
            return f"error: {dns.rcode.to_text(rcode)}"
        values = txt_values(response, name)
        if expected in values:
            return "ok"
        return "missing" if not values else "other: " + ", ".join(values)[:200]


def txt_values(response: dns.message.Message, name: str) -> list[str]:
    wanted = dns.name.from_text(name)
    values: list[str] = []
    for rrset in response.answer:
        if rrset.name != wanted or rrset.rdtype != dns.rdatatype.TXT:
            continue
        for rdata in rrset:
            values.append(b"".join(rdata.strings).decode("utf-8", "replace"))
    return values
