"""libp2p-PeerID HTTP authentication (libp2p/specs http/peer-id-auth.md; protocol.md §3).

This package owns the scheme end to end, one room per job:

* :mod:`~autotls.peeridauth.protocol` -- the pure protocol (sans-I/O, tested with the spec's
  vectors): header building and strict parsing (:func:`format_header`, :func:`parse_header`),
  the bytes-to-sign layout (:func:`data_to_sign`), padded base64url (:func:`b64encode`,
  :func:`b64decode`), challenges and the signed ``hostname`` (:func:`request_hostname`).
* :mod:`~autotls.peeridauth.client` -- the client: the handshake state machine
  (:class:`ClientHandshake`, sans-I/O) and the transport that drives it
  (:class:`PeerIdAuthClient`, over :mod:`autotls.http`): the client-initiated flow the Go
  client uses, the fallback when the server answers server-initiated, a re-handshake from any
  later 401 (bounded), and the JSON body sent only on the leg that completes the handshake.
* :mod:`~autotls.peeridauth.server` -- the server: its decisions
  (:meth:`PeerIdAuthServer.decide`, sans-I/O) and the aiohttp integration
  (:meth:`PeerIdAuthServer.authenticate`, :meth:`PeerIdAuthServer.protect`) for the local
  broker.
* :mod:`~autotls.peeridauth.errors` -- what fails, as :class:`~autotls.fsm.errors.AutoTLSError`.

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

from typing import TYPE_CHECKING

from autotls._lazy import lazy_exports

if TYPE_CHECKING:
    from autotls.peeridauth.client import (
        CHALLENGE_LEG,
        DEFAULT_MAX_BODY,
        AuthenticatedResponse,
        ClientHandshake,
        PeerIdAuthClient,
    )
    from autotls.peeridauth.errors import (
        HandshakeRefused,
        HeaderError,
        PeerIdAuthError,
        PeerIdAuthRefused,
        PeerIdAuthUnauthorized,
        ResponseTooLarge,
        ServerAuthenticationError,
    )
    from autotls.peeridauth.protocol import (
        CHALLENGE_BYTES,
        MAX_HEADER_SIZE,
        MIN_CHALLENGE_CHARS,
        SCHEME,
        RandomBytes,
        b64decode,
        b64encode,
        client_sig_parts,
        data_to_sign,
        format_header,
        new_challenge,
        parse_header,
        request_hostname,
        server_sig_parts,
    )
    from autotls.peeridauth.server import AuthDecision, AuthResult, PeerIdAuthServer

# Each public name and its module, loaded on first use (autotls._lazy): a node needs the
# client, not the server side (aiohttp.web), which only the local broker uses.
_EXPORTS: dict[str, str] = {
    "CHALLENGE_LEG": "autotls.peeridauth.client",
    "DEFAULT_MAX_BODY": "autotls.peeridauth.client",
    "AuthenticatedResponse": "autotls.peeridauth.client",
    "ClientHandshake": "autotls.peeridauth.client",
    "PeerIdAuthClient": "autotls.peeridauth.client",
    "HandshakeRefused": "autotls.peeridauth.errors",
    "HeaderError": "autotls.peeridauth.errors",
    "PeerIdAuthError": "autotls.peeridauth.errors",
    "PeerIdAuthRefused": "autotls.peeridauth.errors",
    "PeerIdAuthUnauthorized": "autotls.peeridauth.errors",
    "ResponseTooLarge": "autotls.peeridauth.errors",
    "ServerAuthenticationError": "autotls.peeridauth.errors",
    "CHALLENGE_BYTES": "autotls.peeridauth.protocol",
    "MAX_HEADER_SIZE": "autotls.peeridauth.protocol",
    "MIN_CHALLENGE_CHARS": "autotls.peeridauth.protocol",
    "SCHEME": "autotls.peeridauth.protocol",
    "RandomBytes": "autotls.peeridauth.protocol",
    "b64decode": "autotls.peeridauth.protocol",
    "b64encode": "autotls.peeridauth.protocol",
    "client_sig_parts": "autotls.peeridauth.protocol",
    "data_to_sign": "autotls.peeridauth.protocol",
    "format_header": "autotls.peeridauth.protocol",
    "new_challenge": "autotls.peeridauth.protocol",
    "parse_header": "autotls.peeridauth.protocol",
    "request_hostname": "autotls.peeridauth.protocol",
    "server_sig_parts": "autotls.peeridauth.protocol",
    "AuthDecision": "autotls.peeridauth.server",
    "AuthResult": "autotls.peeridauth.server",
    "PeerIdAuthServer": "autotls.peeridauth.server",
}

__all__ = [
    "CHALLENGE_BYTES",
    "CHALLENGE_LEG",
    "DEFAULT_MAX_BODY",
    "MAX_HEADER_SIZE",
    "MIN_CHALLENGE_CHARS",
    "SCHEME",
    "AuthDecision",
    "AuthResult",
    "AuthenticatedResponse",
    "ClientHandshake",
    "HandshakeRefused",
    "HeaderError",
    "PeerIdAuthClient",
    "PeerIdAuthError",
    "PeerIdAuthRefused",
    "PeerIdAuthServer",
    "PeerIdAuthUnauthorized",
    "RandomBytes",
    "ResponseTooLarge",
    "ServerAuthenticationError",
    "b64decode",
    "b64encode",
    "client_sig_parts",
    "data_to_sign",
    "format_header",
    "new_challenge",
    "parse_header",
    "request_hostname",
    "server_sig_parts",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
