"""The client side of libp2p-PeerID auth: the handshake state machine
(:class:`ClientHandshake`, sans-I/O) and the transport that drives it over
:mod:`autotls.http` (:class:`PeerIdAuthClient`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from multidict import CIMultiDictProxy
from yarl import URL

from autotls.http import AnswerTooLarge, AnswerTruncated, HttpResponse, HttpTransport
from autotls.peerid import PeerId, PrivateKey, PublicKey
from autotls.peeridauth.errors import (
    HandshakeRefused,
    HeaderError,
    PeerIdAuthUnauthorized,
    ResponseTooLarge,
    ServerAuthenticationError,
)
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
    request_hostname,
    server_sig_parts,
)

__all__ = [
    "CHALLENGE_LEG",
    "DEFAULT_MAX_BODY",
    "AuthenticatedResponse",
    "ClientHandshake",
    "PeerIdAuthClient",
]

log = logging.getLogger("autotls.peeridauth")

DEFAULT_MAX_BODY = 1 << 20
# The transport's name for the first leg of a handshake (no body; answered 401).
CHALLENGE_LEG = "challenge_leg"


# ---------------------------------------------------------------------------------------------
# The handshake (sans-I/O)


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
        self.challenge_server = new_challenge(self._random)
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
        key = public_key_param(params, "server challenge")
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
        check_challenge(challenge_client, "challenge-client")
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
# The transport


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
