"""What PeerID authentication raises: every failure an
:class:`~autotls.fsm.errors.AutoTLSError` (transient unless its class says otherwise); the
broker client (:mod:`autotls.broker`) turns them into its own errors."""

from __future__ import annotations

from collections.abc import Mapping

from autotls.fsm.errors import AutoTLSError, ErrorClass

__all__ = [
    "HandshakeRefused",
    "HeaderError",
    "PeerIdAuthError",
    "PeerIdAuthRefused",
    "PeerIdAuthUnauthorized",
    "ResponseTooLarge",
    "ServerAuthenticationError",
]


class PeerIdAuthError(AutoTLSError):
    """Base of PeerID-auth failures. Transient unless a subclass says otherwise."""

    error_class = ErrorClass.TRANSIENT


class HeaderError(PeerIdAuthError):
    """A ``libp2p-PeerID`` header is malformed (bad syntax, duplicate or missing params,
    bad base64url, too long, short challenge)."""


class ServerAuthenticationError(PeerIdAuthError):
    """The server failed to prove its PeerId: bad or missing signature, or a key that does not
    match the PeerId we expected. We refuse to trust its answer."""


class PeerIdAuthRefused(PeerIdAuthError):
    """The server answered without letting the request through. Carries the response
    (``status``, ``headers``, ``body``) for the caller to classify."""

    def __init__(self, message: str, *, status: int, headers: Mapping[str, str], body: bytes):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers)
        self.body = body


class HandshakeRefused(PeerIdAuthRefused):
    """The server answered with something other than 401 before it authenticated itself (a
    400 for our header, a 403, a 5xx...)."""


class PeerIdAuthUnauthorized(PeerIdAuthRefused):
    """The server kept answering 401 after the bounded number of handshakes."""


class ResponseTooLarge(PeerIdAuthError):
    """The response body exceeded the client's size limit."""
