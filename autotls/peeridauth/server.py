"""The server side of libp2p-PeerID auth, stateless apart from its HMAC key: what to answer a
request (:meth:`PeerIdAuthServer.decide`, sans-I/O; Go's opaque and bearer blobs) and the
aiohttp integration the local broker uses (:meth:`PeerIdAuthServer.authenticate`,
:meth:`PeerIdAuthServer.protect`)."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiohttp import web

from autotls.peerid import PeerId, PeerIdError, PrivateKey, PublicKey
from autotls.peeridauth.errors import HeaderError
from autotls.peeridauth.protocol import (
    SCHEME,
    RandomBytes,
    b64decode,
    b64encode,
    check_challenge,
    client_sig_parts,
    data_to_sign,
    format_header,
    new_challenge,
    parse_header,
    public_key_param,
    server_sig_parts,
)

__all__ = ["AuthDecision", "AuthResult", "PeerIdAuthServer"]

log = logging.getLogger("autotls.peeridauth")


def _go_time(when: datetime) -> str:
    """RFC 3339 with trimmed fractional seconds, as Go's ``time.Time`` marshals to JSON."""
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond:06d}".rstrip("0")
    offset = when.utcoffset()
    if offset is None or not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{text}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _seal(key: bytes, state: Mapping[str, Any]) -> str:
    """Go's opaqueState.Marshal: HMAC-SHA256 over the JSON, then the JSON, base64url."""
    payload = json.dumps(state, separators=(",", ":")).encode()
    return b64encode(hmac.new(key, payload, hashlib.sha256).digest() + payload)


class _InvalidHmac(Exception):
    pass


def _unseal(key: bytes, blob: str, what: str) -> dict[str, Any]:
    raw = b64decode(blob, what=what)
    if len(raw) < 32:
        raise _InvalidHmac
    mac, payload = raw[:32], raw[32:]
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise _InvalidHmac
    try:
        state = json.loads(payload)
    except ValueError:
        raise HeaderError(f"{what} payload is not JSON") from None
    if not isinstance(state, dict):
        raise HeaderError(f"{what} payload is not a JSON object")
    return state


@dataclass(frozen=True)
class AuthResult:
    """An authenticated request: who the client is, and the headers the response must carry."""

    peer_id: PeerId
    public_key: PublicKey | None
    headers: dict[str, str] = field(repr=False)
    via: Literal["client-initiated", "server-initiated", "bearer"]


@dataclass(frozen=True)
class AuthDecision:
    """What the server does with a request: ``result`` when authenticated; otherwise answer
    ``status`` (401 or 400) with ``headers``. ``reason`` is for logs (no secrets)."""

    status: int | None
    headers: dict[str, str]
    reason: str
    result: AuthResult | None = None


def _utcnow() -> datetime:
    return datetime.now(UTC)


class PeerIdAuthServer:
    """The server side of libp2p-PeerID auth, stateless apart from its HMAC key."""

    def __init__(
        self,
        identity: PrivateKey,
        *,
        hostnames: Collection[str] | None,
        hmac_key: bytes | None = None,
        now: Callable[[], datetime] = _utcnow,
        challenge_ttl: float = 300.0,
        bearer_ttl: float = 3600.0,
        random: RandomBytes = os.urandom,
    ) -> None:
        self.identity = identity
        self.hostnames = frozenset(h.lower() for h in hostnames) if hostnames is not None else None
        self._hmac_key = hmac_key if hmac_key is not None else os.urandom(32)
        self.now = now
        self.challenge_ttl = timedelta(seconds=challenge_ttl)
        self.bearer_ttl = timedelta(seconds=bearer_ttl)
        self._random = random
        self._public_b64 = b64encode(identity.public_key.to_proto())

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    # -- pure decision -------------------------------------------------------------------------

    def _challenge(self, hostname: str, reason: str) -> AuthDecision:
        """401 with a fresh server-initiated challenge."""
        challenge = new_challenge(self._random)
        opaque = _seal(
            self._hmac_key,
            {
                "challenge-client": challenge,
                "hostname": hostname,
                "created-time": _go_time(self.now()),
            },
        )
        header = format_header(
            [("challenge-client", challenge), ("public-key", self._public_b64), ("opaque", opaque)]
        )
        return AuthDecision(401, {"WWW-Authenticate": header}, reason)

    def _bad(self, reason: str) -> AuthDecision:
        return AuthDecision(400, {}, reason)

    def _expired(self, state: Mapping[str, Any], ttl: timedelta) -> bool:
        try:
            created = datetime.fromisoformat(str(state["created-time"]))
        except (KeyError, ValueError):
            raise HeaderError("opaque state lacks a valid created-time") from None
        return self.now() > created + ttl

    def decide(self, authorization: str | None, hostname: str) -> AuthDecision:
        """Decide on one request from its ``Authorization`` header and ``Host``."""
        # aiohttp hands header bytes over as UTF-8 with surrogate escapes: bytes that are not
        # ASCII would break the strict encoding of the bytes to sign (a 500). Both headers
        # are ASCII by their grammars (a host name; base64url values and tokens), and Go's
        # server answers a malformed Host with 400 too.
        if not hostname.isascii():
            return self._bad("Host header is not ASCII")
        if authorization is not None and not authorization.isascii():
            return self._bad("Authorization header is not ASCII")
        if self.hostnames is not None and hostname.lower() not in self.hostnames:
            return self._bad(f"hostname {hostname!r} is not served here")
        if not authorization:
            return self._challenge(hostname, "no credentials: challenge the client")
        try:
            params = parse_header(authorization)
            if params is None:
                raise HeaderError(f"Authorization is not {SCHEME}")
            if "sig" in params and "opaque" in params:
                return self._verify_challenge(params, hostname)
            if "bearer" in params:
                return self._verify_bearer(params, hostname)
            if "challenge-server" in params and "public-key" in params:
                return self._sign_challenge(params, hostname)
            raise HeaderError("Authorization has no recognisable set of params")
        except _InvalidHmac:
            return self._challenge(hostname, "opaque/bearer HMAC invalid (foreign or tampered)")
        except HeaderError as exc:
            return self._bad(exc.message)

    def _sign_challenge(self, params: Mapping[str, str], hostname: str) -> AuthDecision:
        client_key = public_key_param(params, "client Authorization")
        challenge_server = check_challenge(params["challenge-server"], "challenge-server")
        challenge_client = new_challenge(self._random)
        sig = self.identity.sign(
            data_to_sign(server_sig_parts(challenge_server, client_key, hostname))
        )
        opaque = _seal(
            self._hmac_key,
            {
                "client-public-key": base64.b64encode(client_key.to_proto()).decode(),
                "challenge-client": challenge_client,
                "hostname": hostname,
                "created-time": _go_time(self.now()),
            },
        )
        header = format_header(
            [
                ("challenge-client", challenge_client),
                ("public-key", self._public_b64),
                ("sig", b64encode(sig)),
                ("opaque", opaque),
            ]
        )
        return AuthDecision(
            401, {"WWW-Authenticate": header}, f"client-initiated: signed for {client_key.peer_id}"
        )

    def _verify_challenge(self, params: Mapping[str, str], hostname: str) -> AuthDecision:
        state = _unseal(self._hmac_key, params["opaque"], "opaque")
        if self._expired(state, self.challenge_ttl):
            return self._challenge(hostname, "challenge expired")
        if state.get("is-token"):
            raise HeaderError("expected a challenge opaque, got a bearer token")
        if state.get("hostname") != hostname:
            raise HeaderError(f"hostname {hostname!r} does not match the challenge's")
        challenge_client = state.get("challenge-client")
        if not isinstance(challenge_client, str):
            raise HeaderError("opaque state lacks challenge-client")
        client_initiated = "client-public-key" in state
        if client_initiated:
            try:
                client_key = PublicKey.from_proto(base64.b64decode(state["client-public-key"]))
            except (PeerIdError, ValueError, binascii.Error):
                raise HeaderError("opaque state holds an invalid client key") from None
        else:
            client_key = public_key_param(params, "client Authorization")
        sig = b64decode(params["sig"], what="client sig")
        signed = data_to_sign(
            client_sig_parts(challenge_client, self.identity.public_key, hostname)
        )
        if not client_key.verify(sig, signed):
            raise HeaderError(f"client signature does not verify for {client_key.peer_id}")
        peer = client_key.peer_id
        bearer = _seal(
            self._hmac_key,
            {
                "is-token": True,
                "peer-id": str(peer),
                "hostname": hostname,
                "created-time": _go_time(self.now()),
            },
        )
        info: list[tuple[str, str]] = []
        if not client_initiated:
            challenge_server = check_challenge(
                params.get("challenge-server", ""), "challenge-server"
            )
            server_sig = self.identity.sign(
                data_to_sign(server_sig_parts(challenge_server, client_key, hostname))
            )
            info.append(("sig", b64encode(server_sig)))
        info.append(("bearer", bearer))
        via: Literal["client-initiated", "server-initiated"] = (
            "client-initiated" if client_initiated else "server-initiated"
        )
        result = AuthResult(peer, client_key, {"Authentication-Info": format_header(info)}, via)
        return AuthDecision(None, result.headers, f"{via}: authenticated {peer}", result)

    def _verify_bearer(self, params: Mapping[str, str], hostname: str) -> AuthDecision:
        state = _unseal(self._hmac_key, params["bearer"], "bearer")
        if not state.get("is-token"):
            raise HeaderError("expected a bearer token, got a challenge opaque")
        if self._expired(state, self.bearer_ttl):
            return self._challenge(hostname, "bearer token expired")
        if state.get("hostname") != hostname:
            return self._challenge(hostname, "bearer token minted for another hostname")
        try:
            peer = PeerId.from_string(str(state.get("peer-id", "")))
        except PeerIdError:
            raise HeaderError("bearer token holds an invalid peer-id") from None
        result = AuthResult(peer, peer.public_key(), {}, "bearer")
        return AuthDecision(None, {}, f"bearer: authenticated {peer}", result)

    # -- aiohttp integration -------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> AuthResult | web.Response:
        """Authenticate an aiohttp request: an :class:`AuthResult`, or the 401/400 response
        to send back as is."""
        decision = self.decide(request.headers.get("Authorization"), request.host)
        if decision.result is not None:
            log.debug("peerid-auth %s %s: %s", request.method, request.path, decision.reason)
            return decision.result
        log.info(
            "peerid-auth %s %s from %s: %d (%s)",
            request.method, request.path, request.remote, decision.status, decision.reason,
        )  # fmt: skip
        assert decision.status is not None
        return web.Response(status=decision.status, headers=decision.headers)

    def protect(
        self, handler: Callable[[web.Request, AuthResult], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Decorate ``handler(request, auth)`` so it runs only for authenticated requests; its
        response (or raised HTTP exception) gets the ``Authentication-Info`` header."""

        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            auth = await self.authenticate(request)
            if isinstance(auth, web.Response):
                return auth
            try:
                response = await handler(request, auth)
            except web.HTTPException as exc:
                exc.headers.update(auth.headers)
                raise
            response.headers.update(auth.headers)
            return response

        return wrapper
