"""libp2p-PeerID HTTP authentication (libp2p/specs http/peer-id-auth.md; protocol.md §3).

This module owns the scheme end to end, in three layers:

* **Pure protocol** (sans-I/O, tested with the spec's vectors): header building and strict
  parsing (:func:`format_header`, :func:`parse_header`), the bytes-to-sign layout
  (:func:`data_to_sign`), padded base64url (:func:`b64encode`, :func:`b64decode`), challenges,
  the client handshake state machine (:class:`ClientHandshake`) and the server's decisions
  (:meth:`PeerIdAuthServer.decide`).
* **Client transport** (:class:`PeerIdAuthClient`, over :mod:`autotls.http`): the
  client-initiated flow the Go client uses, the fallback when the server answers
  server-initiated, a re-handshake from any later 401 (bounded), and the JSON body sent only
  on the leg that completes the handshake.
* **Server transport** (:meth:`PeerIdAuthServer.authenticate`, :meth:`PeerIdAuthServer.protect`)
  for the local broker.

Where the spec and go-libp2p (``p2p/http/auth``, which the production broker runs) differ, this
follows Go: padded base64url only (Go rejects unpadded values with 400), ``hostname`` is the
HTTP ``Host`` (authority, with the port when the URL has a non-default one), the opaque and
bearer blobs are ``base64url(HMAC-SHA256(json) || json)`` with Go's JSON field names, and the
status codes are Go's: 401 (with a fresh server-initiated challenge) for a missing header, a
foreign/garbled HMAC or an expired challenge/token; 400 for malformed headers, bad signatures,
short challenges and hostname mismatches.

Bearer tokens are secrets: they never reach a log line or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from autotls.fsm.errors import AutoTLSError, ErrorClass
from autotls.http import AnswerTooLarge, AnswerTruncated, HttpResponse, HttpTransport
from autotls.peerid import PeerId, PeerIdError, PrivateKey, PublicKey, uvarint_encode

__all__ = [
    "CHALLENGE_BYTES",
    "MAX_HEADER_SIZE",
    "SCHEME",
    "AuthDecision",
    "AuthResult",
    "AuthenticatedResponse",
    "ClientHandshake",
    "HandshakeRefused",
    "HeaderError",
    "PeerIdAuthClient",
    "PeerIdAuthError",
    "PeerIdAuthServer",
    "PeerIdAuthUnauthorized",
    "ResponseTooLarge",
    "ServerAuthenticationError",
    "b64decode",
    "b64encode",
    "data_to_sign",
    "format_header",
    "new_challenge",
    "parse_header",
    "request_hostname",
]

log = logging.getLogger(__name__)

SCHEME = "libp2p-PeerID"
MAX_HEADER_SIZE = 2048
CHALLENGE_BYTES = 32
# A challenge is signed as its text; peers refuse ones shorter than this many characters.
MIN_CHALLENGE_CHARS = 32
DEFAULT_MAX_BODY = 1 << 20
# The transport's name for the first leg of a handshake (no body; answered 401).
CHALLENGE_LEG = "challenge_leg"

RandomBytes = Callable[[int], bytes]


# ---------------------------------------------------------------------------------------------
# Errors


class PeerIdAuthError(AutoTLSError):
    """Base of PeerID-auth failures. Transient unless a subclass says otherwise."""

    error_class = ErrorClass.TRANSIENT


class HeaderError(PeerIdAuthError):
    """A ``libp2p-PeerID`` header is malformed (bad syntax, duplicate or missing params,
    bad base64url, too long, short challenge)."""


class ServerAuthenticationError(PeerIdAuthError):
    """The server failed to prove its PeerId: bad or missing signature, or a key that does not
    match the PeerId we expected. We refuse to trust its answer."""


class HandshakeRefused(PeerIdAuthError):
    """The server answered with something other than 401 before it authenticated itself (a
    400 for our header, a 403, a 5xx...). Carries the response for the caller to classify."""

    def __init__(self, message: str, *, status: int, headers: Mapping[str, str], body: bytes):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers)
        self.body = body


class PeerIdAuthUnauthorized(PeerIdAuthError):
    """The server kept answering 401 after the bounded number of handshakes."""

    def __init__(self, message: str, *, status: int, headers: Mapping[str, str], body: bytes):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers)
        self.body = body


class ResponseTooLarge(PeerIdAuthError):
    """The response body exceeded the client's size limit."""


# ---------------------------------------------------------------------------------------------
# Pure protocol pieces

_B64URL_PADDED = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'({_TCHARS})[ \t]*=[ \t]*"([^"\\]*)"')
_SCHEME_TOKEN = re.compile(rf"({_TCHARS})(?=$|[ \t,])")
_SEPARATORS = re.compile(r"[ \t,]*")
_BARE_TOKEN = re.compile(r"[^ \t,]+")
_VALUE_FORBIDDEN = re.compile(r'[\s",\\]')


def b64encode(data: bytes) -> str:
    """base64url WITH padding (the Go broker rejects unpadded values)."""
    return base64.urlsafe_b64encode(data).decode("ascii")


def b64decode(text: str | bytes, *, what: str = "value") -> bytes:
    """Strict padded base64url: URL-safe alphabet only, length a multiple of 4."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise HeaderError(f"{what} is not ASCII base64url") from None
    if len(text) % 4 or not _B64URL_PADDED.match(text):
        raise HeaderError(f"{what} is not padded base64url")
    try:
        return base64.urlsafe_b64decode(text)
    except (binascii.Error, ValueError):
        raise HeaderError(f"{what} is not padded base64url") from None


def new_challenge(random: RandomBytes = os.urandom) -> str:
    """32 random bytes as padded base64url (44 characters)."""
    return b64encode(random(CHALLENGE_BYTES))


def _check_challenge(value: str, what: str) -> str:
    if len(value) < MIN_CHALLENGE_CHARS:
        raise HeaderError(f"{what} is too short ({len(value)} < {MIN_CHALLENGE_CHARS} characters)")
    return value


def _skip_separators(value: str, pos: int) -> int:
    match = _SEPARATORS.match(value, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def format_header(params: Mapping[str, str] | list[tuple[str, str]]) -> str:
    """``libp2p-PeerID k="v", k2="v2"`` in the given order; every value quoted.

    Values may not contain whitespace, quotes, commas or backslashes (Go's parser splits on
    spaces and commas), and the whole header must fit in :data:`MAX_HEADER_SIZE` bytes.
    """
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    parts = []
    for name, value in items:
        if not re.fullmatch(_TCHARS, name):
            raise HeaderError(f"invalid parameter name {name!r}")
        if _VALUE_FORBIDDEN.search(value):
            raise HeaderError(f"parameter {name!r} has a value that cannot be sent unescaped")
        parts.append(f'{name}="{value}"')
    header = f"{SCHEME} " + ", ".join(parts)
    if len(header.encode()) > MAX_HEADER_SIZE:
        raise HeaderError(f"header is {len(header.encode())} bytes (limit {MAX_HEADER_SIZE})")
    return header


def parse_header(value: str | None) -> dict[str, str] | None:
    """The params of the ``libp2p-PeerID`` challenge/credentials in a header value.

    Returns ``None`` when the header is absent or holds no ``libp2p-PeerID`` scheme (other
    schemes around it are skipped). Raises :class:`HeaderError` for an oversized header,
    malformed or unquoted params, and duplicate params.
    """
    if value is None:
        return None
    if len(value.encode("utf-8", "surrogateescape")) > MAX_HEADER_SIZE:
        raise HeaderError(f"header exceeds {MAX_HEADER_SIZE} bytes")
    ours: dict[str, str] | None = None
    pos = _skip_separators(value, 0)
    while pos < len(value):
        scheme = _SCHEME_TOKEN.match(value, pos)
        if scheme is None:
            raise HeaderError("malformed authentication header: expected an auth scheme")
        is_ours = scheme.group(1).lower() == SCHEME.lower()
        params: dict[str, str] = {}
        pos = _skip_separators(value, scheme.end())
        while pos < len(value):
            param = _PARAM.match(value, pos)
            if param is not None:
                name = param.group(1).lower()
                if is_ours and name in params:
                    raise HeaderError(f"duplicate {SCHEME} parameter {name!r}")
                params[name] = param.group(2)
                pos = _skip_separators(value, param.end())
                continue
            token = _BARE_TOKEN.match(value, pos)
            assert token is not None
            if "=" not in token.group():
                break  # the next scheme starts here
            if is_ours:
                raise HeaderError(
                    f'malformed {SCHEME} parameter at offset {pos}: expected name="value"'
                )
            pos = _skip_separators(value, token.end())  # another scheme's token68 / param
        if is_ours:
            if ours is not None:
                raise HeaderError(f"more than one {SCHEME} challenge in the header")
            ours = params
    return ours


def data_to_sign(parts: Mapping[str, bytes | str]) -> bytes:
    """``"libp2p-PeerID"`` then, for each part sorted by name,
    ``uvarint(len(k) + 1 + len(v)) || k || "=" || v`` (strings UTF-8, keys as raw bytes)."""
    out = bytearray(SCHEME.encode())
    for name in sorted(parts):
        raw = parts[name]
        value = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
        key = name.encode("utf-8")
        out += uvarint_encode(len(key) + 1 + len(value)) + key + b"=" + value
    return bytes(out)


def client_sig_parts(
    challenge_client: str, server_public_key: PublicKey, hostname: str
) -> dict[str, bytes | str]:
    return {
        "challenge-client": challenge_client,
        "server-public-key": server_public_key.to_proto(),
        "hostname": hostname,
    }


def server_sig_parts(
    challenge_server: str, client_public_key: PublicKey, hostname: str
) -> dict[str, bytes | str]:
    return {
        "challenge-server": challenge_server,
        "client-public-key": client_public_key.to_proto(),
        "hostname": hostname,
    }


def _public_key_param(params: Mapping[str, str], what: str) -> PublicKey:
    raw = params.get("public-key")
    if raw is None:
        raise HeaderError(f"{what} lacks public-key")
    try:
        return PublicKey.from_proto(b64decode(raw, what=f"{what} public-key"))
    except PeerIdError as exc:
        raise HeaderError(f"{what} public-key is not a libp2p public key: {exc.message}") from None


def request_hostname(url: URL | str) -> str:
    """What the server sees in ``Host`` for this URL: the host (IPv6 in brackets), plus
    ``:port`` when the URL names a non-default port. This is the signed ``hostname``."""
    url = URL(url)
    host = url.raw_host
    if not host:
        raise ValueError(f"URL {url} has no host")
    if ":" in host:
        host = f"[{host}]"
    if url.explicit_port is not None and not url.is_default_port():
        host = f"{host}:{url.port}"
    return host


# ---------------------------------------------------------------------------------------------
# Client handshake (sans-I/O)


class ClientHandshake:
    """One handshake from the client's side. Feed it the server's headers; it returns the
    ``Authorization`` value for the next leg.

    Client-initiated: :meth:`start` → (401 with sig) :meth:`on_challenge` verifies the server and
    signs → (final response) :meth:`on_final` reads the bearer.
    Server-initiated (the server ignored our challenge, or we start from a bare 401):
    :meth:`on_challenge` signs the server's challenge and sends ours → :meth:`on_final` verifies
    the server's ``sig`` in ``Authentication-Info`` and reads the bearer.
    """

    def __init__(
        self,
        identity: PrivateKey,
        hostname: str,
        *,
        random: RandomBytes = os.urandom,
        expected_server: PeerId | None = None,
    ) -> None:
        self.identity = identity
        self.hostname = hostname
        self._random = random
        self.expected_server = expected_server
        self.challenge_server: str | None = None
        self.server_public_key: PublicKey | None = None
        self.flow: Literal["client-initiated", "server-initiated"] | None = None
        self.server_authenticated = False
        self.bearer: str | None = None

    @property
    def server_peer_id(self) -> PeerId | None:
        return self.server_public_key.peer_id if self.server_public_key else None

    def _new_challenge_server(self) -> str:
        self.challenge_server = b64encode(self._random(CHALLENGE_BYTES))
        return self.challenge_server

    def start(self) -> str:
        """First leg of the client-initiated flow (no body)."""
        self.flow = "client-initiated"
        return format_header(
            [
                ("challenge-server", self._new_challenge_server()),
                ("public-key", b64encode(self.identity.public_key.to_proto())),
            ]
        )

    def _set_server_key(self, params: Mapping[str, str]) -> PublicKey:
        key = _public_key_param(params, "server challenge")
        if self.expected_server is not None and key.peer_id != self.expected_server:
            raise ServerAuthenticationError(
                f"server identified as {key.peer_id}, expected {self.expected_server}"
            )
        self.server_public_key = key
        return key

    def on_challenge(self, www_authenticate: str | None) -> str:
        """Handle a 401's ``WWW-Authenticate``; returns the next ``Authorization`` value."""
        params = parse_header(www_authenticate)
        if params is None:
            raise HeaderError(f"401 without a {SCHEME} challenge")
        challenge_client = params.get("challenge-client")
        opaque = params.get("opaque")
        if challenge_client is None or opaque is None:
            raise HeaderError("server challenge lacks challenge-client or opaque")
        _check_challenge(challenge_client, "challenge-client")
        server_key = self._set_server_key(params)
        client_sig = b64encode(
            self.identity.sign(
                data_to_sign(client_sig_parts(challenge_client, server_key, self.hostname))
            )
        )
        sig = params.get("sig")
        if sig is not None and self.flow == "client-initiated" and self.challenge_server:
            self._verify_server_sig(sig)
            return format_header([("opaque", opaque), ("sig", client_sig)])
        # The server started (or fell back to) the server-initiated flow.
        self.flow = "server-initiated"
        self.server_authenticated = False
        return format_header(
            [
                ("public-key", b64encode(self.identity.public_key.to_proto())),
                ("opaque", opaque),
                ("challenge-server", self._new_challenge_server()),
                ("sig", client_sig),
            ]
        )

    def _verify_server_sig(self, sig_b64: str) -> None:
        assert self.server_public_key is not None and self.challenge_server is not None
        try:
            sig = b64decode(sig_b64, what="server sig")
        except HeaderError as exc:
            raise ServerAuthenticationError(exc.message) from None
        parts = server_sig_parts(self.challenge_server, self.identity.public_key, self.hostname)
        if not self.server_public_key.verify(sig, data_to_sign(parts)):
            raise ServerAuthenticationError(
                f"server signature does not verify for {self.server_public_key.peer_id} "
                f"and hostname {self.hostname!r}"
            )
        self.server_authenticated = True

    def on_final(self, authentication_info: str | None) -> str | None:
        """Handle the final response's ``Authentication-Info``; returns the bearer (or None)."""
        params = parse_header(authentication_info) or {}
        if self.flow == "server-initiated":
            sig = params.get("sig")
            if sig is None:
                raise ServerAuthenticationError(
                    "server-initiated handshake: Authentication-Info lacks the server's sig"
                )
            self._verify_server_sig(sig)
        self.bearer = params.get("bearer")
        return self.bearer


# ---------------------------------------------------------------------------------------------
# Client transport


@dataclass(frozen=True)
class AuthenticatedResponse:
    status: int
    headers: CIMultiDictProxy[str] = field(repr=False)  # Authentication-Info holds the bearer
    body: bytes
    server_peer_id: PeerId
    bearer: str | None = field(repr=False)


class PeerIdAuthClient:
    """Makes PeerID-authenticated requests over an :class:`autotls.http.HttpTransport`.

    The transport should keep cookies on IP hosts (``keep_ip_cookies=True``): load balancers
    pin the handshake legs to one backend with a cookie, and the opaque state only verifies
    on the backend that minted it.
    """

    def __init__(
        self,
        identity: PrivateKey,
        http: HttpTransport,
        *,
        max_handshakes: int = 3,
        max_body: int = DEFAULT_MAX_BODY,
        random: RandomBytes = os.urandom,
        expected_server: PeerId | None = None,
    ) -> None:
        self.identity = identity
        self.http = http
        self.max_handshakes = max_handshakes
        self.max_body = max_body
        self._random = random
        self.expected_server = expected_server

    async def _send(
        self,
        method: str,
        url: URL,
        hostname: str,
        authorization: str,
        headers: Mapping[str, str] | None,
        body: bytes | None,
        request_class: str,
    ) -> HttpResponse:
        sent = dict(headers or {})
        sent["Host"] = hostname
        sent["Authorization"] = authorization
        if body is not None:
            sent["Content-Type"] = "application/json"
        try:
            return await self.http.request(
                method,
                url,
                request_class=request_class,
                headers=sent,
                body=body,
                limit=self.max_body,
            )
        except AnswerTooLarge:
            raise ResponseTooLarge(
                f"response body from {url.host} exceeds {self.max_body} bytes"
            ) from None
        except AnswerTruncated as exc:
            # Status and headers arrived whole. The challenge leg's body and a 401's are
            # never read (a refusal's is detail for the error); the answer we hand back as
            # the response must be whole.
            if body is None or exc.answer.status == 401:
                return exc.answer
            raise

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        json_body: object | None = None,
        headers: Mapping[str, str] | None = None,
        request_class: str = "authenticated_leg",
    ) -> AuthenticatedResponse:
        """One authenticated request: the challenge leg (no body; the server must answer
        401), then the leg that carries ``json_body`` (``request_class`` names it for the
        transport's observer), again after any later 401, at most ``max_handshakes`` times."""
        url = URL(url)
        hostname = request_hostname(url)
        body = json.dumps(json_body).encode() if json_body is not None else None
        hs = ClientHandshake(
            self.identity, hostname, random=self._random, expected_server=self.expected_server
        )
        resp = await self._send(method, url, hostname, hs.start(), headers, None, CHALLENGE_LEG)
        if resp.status != 401:
            raise HandshakeRefused(
                f"{method} {url} answered {resp.status} to the PeerID-auth challenge",
                status=resp.status,
                headers=resp.headers,
                body=resp.body,
            )
        for attempt in range(1, self.max_handshakes + 1):
            authorization = hs.on_challenge(resp.headers.get("WWW-Authenticate"))
            log.debug(
                "peerid-auth %s %s: %s handshake with %s (attempt %d)",
                method, url, hs.flow, hs.server_peer_id, attempt,
            )  # fmt: skip
            resp = await self._send(
                method, url, hostname, authorization, headers, body, request_class
            )
            if resp.status != 401:
                bearer = hs.on_final(resp.headers.get("Authentication-Info"))
                server = hs.server_peer_id
                assert server is not None
                return AuthenticatedResponse(
                    status=resp.status,
                    headers=resp.headers,
                    body=resp.body,
                    server_peer_id=server,
                    bearer=bearer,
                )
            # Any later 401: start again from this response's challenge (server-initiated).
            hs = ClientHandshake(
                self.identity, hostname, random=self._random, expected_server=self.expected_server
            )
            hs.flow = "server-initiated"
            if parse_header(resp.headers.get("WWW-Authenticate")) is None:
                break
        raise PeerIdAuthUnauthorized(
            f"{method} {url}: still 401 after {self.max_handshakes} PeerID-auth handshakes",
            status=resp.status,
            headers=resp.headers,
            body=resp.body,
        )


# ---------------------------------------------------------------------------------------------
# Server


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
        challenge = b64encode(self._random(CHALLENGE_BYTES))
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
        client_key = _public_key_param(params, "client Authorization")
        challenge_server = _check_challenge(params["challenge-server"], "challenge-server")
        challenge_client = b64encode(self._random(CHALLENGE_BYTES))
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
            client_key = _public_key_param(params, "client Authorization")
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
            challenge_server = _check_challenge(
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
