"""A local AutoTLS broker that behaves like production p2p-forge (protocol.md §3-§4).

It serves ``GET /v1/health`` and ``POST /v1/_acme-challenge`` behind libp2p-PeerID auth
(:class:`autotls.peeridauth.PeerIdAuthServer`), applies the production body rules, dials the
node back with a real libp2p dial (:func:`autotls.node.dial_back`, injectable), and publishes
``_acme-challenge.<b36 peer>.<zone>.`` through pebble-challtestsrv's management API, so the
node, Pebble and our DNS checker see the same record the real zone would serve.

Body rules (p2p-forge): JSON object, keys matched case-insensitively, unknown fields -> 400;
``value`` unpadded base64url of exactly 32 bytes; every address must parse as a multiaddr. A
failed dial-back is ``400 error testing addresses: <reason>``. An outage switch makes health
answer 503 with ``Retry-After`` and registration 503, for the engine's "broker down" path.

Every decision is logged (peer, addresses, outcome); bearer tokens and HMAC keys never are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from autotls.http import HttpTransport
from autotls.localstack.challtestsrv import ChallTestSrv, ChallTestSrvError
from autotls.multiaddrs import Multiaddr, MultiaddrError
from autotls.peerid import PeerId, PrivateKey
from autotls.peeridauth import AuthResult, PeerIdAuthServer

__all__ = ["BodyError", "Dialer", "LocalBroker", "RegistrationRecord", "parse_registration"]

log = logging.getLogger(__name__)

Dialer = Callable[[PeerId, Sequence[str]], Awaitable[object]]

DEFAULT_ZONE = "libp2p.direct"
MAX_BODY = 64 * 1024
DIAL_TIMEOUT = 15.0
_B64URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class BodyError(ValueError):
    """The registration body breaks a production rule; the message is the 400 text."""


def parse_registration(body: bytes) -> tuple[str, list[str]]:
    """Apply p2p-forge's body rules; returns ``(value, addresses)`` or raises
    :class:`BodyError`."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise BodyError("body must be a JSON object")
    fields: dict[str, object] = {}
    for key, item in data.items():
        name = key.lower()
        if name not in ("value", "addresses"):
            raise BodyError(f"unknown field {key!r}")
        fields[name] = item  # Go's decoder: case-insensitive match, last one wins
    value = fields.get("value")
    if not isinstance(value, str):
        raise BodyError("value must be a string")
    if "=" in value:
        raise BodyError("value must be unpadded base64url")
    if set(value) - _B64URL_CHARS or len(value) % 4 == 1:
        raise BodyError("value is not base64url")
    try:
        decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - the checks above guard this
        raise BodyError("value is not base64url") from None
    if len(decoded) != 32:
        raise BodyError(f"value must encode 32 bytes, got {len(decoded)}")
    addresses = fields.get("addresses", [])
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise BodyError("addresses must be a list of strings")
    for address in addresses:
        try:
            Multiaddr.parse(address)
        except MultiaddrError as exc:
            raise BodyError(f"invalid multiaddr: {exc.message}") from None
    return value, list(addresses)


@dataclass(frozen=True)
class RegistrationRecord:
    peer_id: PeerId
    fqdn: str
    value: str
    addresses: tuple[str, ...]
    dialed: str | None


@dataclass
class _Counters:
    accepted: int = 0
    refused: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        self.refused += 1
        self.refused_by_reason[reason] = self.refused_by_reason.get(reason, 0) + 1


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LocalBroker:
    """The local broker: an aiohttp app on loopback. ``async with`` starts and stops it."""

    def __init__(
        self,
        *,
        challtestsrv_url: str,
        identity: PrivateKey | None = None,
        dialer: Dialer | None = None,
        zone: str = DEFAULT_ZONE,
        hostnames: Collection[str] | None = None,
        now: Callable[[], datetime] = _utcnow,
        dial_timeout: float = DIAL_TIMEOUT,
        dial_tls_context: ssl.SSLContext | None = None,
        hmac_key: bytes | None = None,
    ) -> None:
        self.identity = identity or PrivateKey.generate()
        self.challtestsrv_url = challtestsrv_url.rstrip("/")
        self.zone = zone.strip(".").lower()
        self.dial_timeout = dial_timeout
        self.dial_tls_context = dial_tls_context
        self._dialer = dialer or self._dial_back
        self.auth = PeerIdAuthServer(self.identity, hostnames=hostnames, hmac_key=hmac_key, now=now)
        self.counters = _Counters()
        self.records: dict[str, RegistrationRecord] = {}
        self.outage = False
        self.outage_retry_after = 3600
        self._runner: web.AppRunner | None = None
        self._http: HttpTransport | None = None  # to challtestsrv, while started
        self._url: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("local broker is not started")
        return self._url

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/v1/health", self._health)
        app.router.add_post("/v1/_acme-challenge", self._register)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self._runner is not None:
            raise RuntimeError("local broker already started")
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self._runner = runner
        self._http = HttpTransport()
        self._url = f"http://{shown}:{bound[1]}"
        log.info("local broker %s listening on %s (zone %s)", self.peer_id, self._url, self.zone)
        return self._url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        http, self._http = self._http, None
        self._url = None
        if http is not None:
            await http.close()
        if runner is not None:
            await runner.cleanup()
            from autotls.dialback import dial_backs_closed

            await dial_backs_closed()  # its dial-backs' hosts close after their verdicts
            log.info("local broker %s stopped", self.peer_id)

    async def __aenter__(self) -> LocalBroker:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def set_outage(self, down: bool, *, retry_after: int = 3600) -> None:
        """Simulate the broker being down (health 503 + Retry-After, registration 503)."""
        self.outage = down
        self.outage_retry_after = retry_after
        log.warning("local broker outage %s", "ON" if down else "OFF")

    def fqdn_for(self, peer_id: PeerId) -> str:
        return f"_acme-challenge.{peer_id.to_base36()}.{self.zone}."

    # -- handlers ------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if self.outage:
            return web.Response(
                status=503, headers={"Retry-After": str(self.outage_retry_after)}, text="down"
            )
        return web.Response(status=204)

    def _refuse(self, status: int, reason: str, text: str) -> web.Response:
        self.counters.refuse(reason)
        return web.Response(status=status, text=text)

    async def _register(self, request: web.Request) -> web.StreamResponse:
        if self.outage:
            self.counters.refuse("outage")
            return web.Response(
                status=503, headers={"Retry-After": str(self.outage_retry_after)}, text="down"
            )
        auth = await self.auth.authenticate(request)
        if isinstance(auth, web.Response):
            if auth.status == 400:
                self.counters.refuse("auth")
            return auth
        response = await self._registered(request, auth)
        response.headers.update(auth.headers)
        return response

    async def _registered(self, request: web.Request, auth: AuthResult) -> web.Response:
        peer = auth.peer_id
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(400, "body", "body too large")
        try:
            value, addresses = parse_registration(body)
        except BodyError as exc:
            log.info("local broker: %s refused: %s", peer, exc)
            return self._refuse(400, "body", str(exc))
        log.info("local broker: %s asks for a dial-back at %s", peer, addresses)
        try:
            dialed = await asyncio.wait_for(self._dialer(peer, addresses), self.dial_timeout + 5)
        except Exception as exc:  # any dial failure is the client's problem, reported as 400
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                reason = f"timeout after {self.dial_timeout:g}s"
            log.info("local broker: dial-back to %s failed: %s", peer, reason)
            return self._refuse(400, "dial", f"error testing addresses: {reason}")
        fqdn = self.fqdn_for(peer)
        try:
            await self._publish(fqdn, value)
        except ChallTestSrvError as exc:
            log.error("local broker: publishing %s failed: %s", fqdn, exc)
            return self._refuse(500, "dns", "failed to publish the TXT record")
        self.records[peer.to_base36()] = RegistrationRecord(
            peer, fqdn, value, tuple(addresses), dialed if isinstance(dialed, str) else None
        )
        self.counters.accepted += 1
        log.info("local broker: %s dialed back (%s); TXT %s set", peer, dialed, fqdn)
        return web.Response(status=200)

    async def _publish(self, fqdn: str, value: str) -> None:
        """One TXT value per peer, last write wins."""
        if self._http is None:
            raise RuntimeError("local broker is not started")
        await ChallTestSrv(self.challtestsrv_url, http=self._http).replace_txt(fqdn, value)

    async def _dial_back(self, peer: PeerId, addresses: Sequence[str]) -> object:
        from autotls.node import dial_back

        return await dial_back(
            peer, addresses, timeout=self.dial_timeout, tls_client_context=self.dial_tls_context
        )
