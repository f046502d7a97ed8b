"""The AutoTLS broker client (p2p-forge ``registration.libp2p.direct``; protocol.md §3-§4).

Two calls: :meth:`BrokerClient.health` before issuing (``GET /v1/health``, 204 when healthy)
and :meth:`BrokerClient.register` (``POST /v1/_acme-challenge`` with the DNS-01 value and the
node's dialable addresses, behind libp2p-PeerID auth). Every failure becomes a typed
:class:`BrokerError` the engine can act on: a failed dial-back or a 5xx is transient, a
rejected body or a 403 is permanent, an outage is a long wait, and an answer no broker sends
(a 2xx or a redirect where the PeerID-auth challenge was due: a captive portal, a misrouted
load balancer) is a transient :class:`BrokerProtocolError`. The engine logs each failure once;
this module logs them at INFO only, so a failure is one WARNING line.

The bearer token the broker returns is never logged nor reused: the broker's backends do not
share state, so every registration runs a fresh handshake (protocol.md §3).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from autotls.acme.messages import parse_retry_after
from autotls.fsm.errors import AutoTLSError, ConfigurationError, ErrorClass
from autotls.multiaddrs import select_dialable
from autotls.peerid import PrivateKey
from autotls.peeridauth import (
    HandshakeRefused,
    PeerIdAuthClient,
    PeerIdAuthError,
    PeerIdAuthUnauthorized,
    ServerAuthenticationError,
)

__all__ = [
    "DEFAULT_BROKER_URL",
    "BrokerClient",
    "BrokerDialError",
    "BrokerError",
    "BrokerForbidden",
    "BrokerHealth",
    "BrokerNetworkError",
    "BrokerProtocolError",
    "BrokerRejected",
    "BrokerUnauthorized",
    "BrokerUnavailable",
    "InvalidChallengeValue",
    "NoDialableAddresses",
    "health_wait",
    "validate_challenge_value",
]

log = logging.getLogger(__name__)

DEFAULT_BROKER_URL = "https://registration.libp2p.direct"
HEALTH_PATH = "/v1/health"
REGISTER_PATH = "/v1/_acme-challenge"
DIAL_ERROR_MARKER = "error testing addresses"
# Go client v0.10.0: when the broker is down, wait max(1 h, min(Retry-After, 24 h)).
MIN_OUTAGE_WAIT = 3600.0
MAX_OUTAGE_WAIT = 86400.0
# Nothing public to offer: the node may learn its public address later (AutoNAT, UPnP...).
NO_ADDRESSES_RETRY = 900.0
MAX_BODY = 64 * 1024

try:
    _VERSION = metadata.version("autotls")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    _VERSION = "0"
DEFAULT_USER_AGENT = f"autotls/{_VERSION} (+python)"

_VALUE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


# ---------------------------------------------------------------------------------------------
# Errors


class BrokerError(AutoTLSError):
    """Base of broker failures. ``status`` and ``detail`` (the broker's text, trimmed) are kept
    for the journal; neither ever holds a secret."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        error_class: ErrorClass | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, error_class=error_class, retry_after=retry_after)
        self.status = status
        self.detail = detail


class BrokerDialError(BrokerError):
    """400 ``error testing addresses``: the broker could not dial the node back. Transient:
    the node may be briefly unreachable, or its addresses may change."""

    error_class = ErrorClass.TRANSIENT


class BrokerRejected(BrokerError):
    """Any other 400 (or unexpected 4xx): the request itself is wrong. Permanent."""

    error_class = ErrorClass.PERMANENT


class BrokerUnauthorized(BrokerError):
    """Still 401 after re-handshaking, or the broker failed to prove its identity. Transient."""

    error_class = ErrorClass.TRANSIENT


class BrokerForbidden(BrokerError):
    """403: denylisted IP or a rejected ``Forge-Authorization`` token. Permanent."""

    error_class = ErrorClass.PERMANENT


class BrokerUnavailable(BrokerError):
    """5xx (or 429): the broker is in trouble. Transient; ``retry_after`` from the header."""

    error_class = ErrorClass.TRANSIENT


class BrokerNetworkError(BrokerError):
    """Connection refused, reset, TLS failure or timeout. Transient."""

    error_class = ErrorClass.TRANSIENT


class BrokerProtocolError(BrokerError):
    """The answer is not one a broker gives: a 2xx where the PeerID-auth challenge (401) was
    due, or a redirect. Transient: what answers is a captive portal, a proxy or a misrouted
    load balancer in front of the broker, which is a network condition, not a verdict on our
    request."""

    error_class = ErrorClass.TRANSIENT


class NoDialableAddresses(BrokerError):
    """The node has no publicly dialable address to offer. Transient, with a long retry."""

    error_class = ErrorClass.TRANSIENT


class InvalidChallengeValue(ConfigurationError, ValueError):
    """The DNS-01 value is not 43 characters of unpadded base64url encoding 32 bytes."""


# ---------------------------------------------------------------------------------------------
# Pure helpers


@dataclass(frozen=True)
class BrokerHealth:
    healthy: bool
    wait_s: float
    detail: str


def health_wait(retry_after: float | None) -> float:
    """How long to wait before issuing when the broker is unhealthy."""
    hint = MIN_OUTAGE_WAIT if retry_after is None else retry_after
    return max(MIN_OUTAGE_WAIT, min(hint, MAX_OUTAGE_WAIT))


def validate_challenge_value(value: object) -> str:
    """The broker's rule, checked before sending: unpadded base64url of exactly 32 bytes."""
    if not isinstance(value, str) or not _VALUE_RE.match(value):
        raise InvalidChallengeValue(
            "DNS-01 value must be 43 characters of unpadded base64url "
            f"(got {len(value) if isinstance(value, str) else type(value).__name__})"
        )
    try:
        decoded = base64.urlsafe_b64decode(value + "=")
    except (binascii.Error, ValueError):  # pragma: no cover - the regex already guards this
        raise InvalidChallengeValue("DNS-01 value is not base64url") from None
    if len(decoded) != 32 or base64.urlsafe_b64encode(decoded).rstrip(b"=").decode() != value:
        raise InvalidChallengeValue("DNS-01 value does not encode exactly 32 bytes canonically")
    return value


def _detail(body: bytes, limit: int = 300) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "…"


def classify_response(status: int, body: bytes, headers: Any) -> BrokerError | None:
    """The error for a broker answer to a registration; ``None`` for success (2xx)."""
    if 200 <= status < 300:
        return None
    detail = _detail(body)
    retry_after = parse_retry_after(headers.get("Retry-After"), _now()) if headers else None
    if 300 <= status < 400:
        return _redirect(status, headers)
    if status == 400:
        if DIAL_ERROR_MARKER in detail.lower():
            return BrokerDialError(
                f"broker could not dial the node back: {detail}", status=status, detail=detail
            )
        return BrokerRejected(
            f"broker rejected the request: {detail}", status=status, detail=detail
        )
    if status == 401:
        return BrokerUnauthorized("broker refused our PeerID authentication", status=status)
    if status == 403:
        return BrokerForbidden(
            f"broker forbids this client (denylisted IP or bad Forge-Authorization): {detail}",
            status=status,
            detail=detail,
        )
    if status == 429:
        return BrokerUnavailable(
            f"broker rate-limited us: {detail}",
            status=status,
            detail=detail,
            error_class=ErrorClass.RATE_LIMITED,
            retry_after=retry_after,
        )
    if status >= 500:
        return BrokerUnavailable(
            f"broker fault {status}: {detail}",
            status=status,
            detail=detail,
            retry_after=retry_after,
        )
    return BrokerRejected(
        f"unexpected broker answer {status}: {detail}", status=status, detail=detail
    )


def _redirect(status: int, headers: Any) -> BrokerProtocolError:
    # Redirects are never followed (the PeerID-auth signature binds the Host we asked), and
    # are transient, as in the ACME client (autotls.acme.problems.error_for_response): a
    # broker that answered before and redirects now has something in front of it (a captive
    # portal, a proxy's login page), which passes. A broker URL that always redirects is a
    # configuration mistake the operator sees in every retry's one line.
    location = headers.get("Location", "") if headers else ""
    return BrokerProtocolError(
        f"broker answered a redirect ({status}" + (f" to {location}" if location else "") + ")"
        "; redirects are not followed: is a captive portal or a proxy in the way?",
        status=status,
    )


def _not_a_challenge(status: int, body: bytes, headers: Any) -> BrokerError:
    """The error for the first leg of a registration answered with something other than the
    PeerID-auth challenge."""
    error = classify_response(status, body, headers)
    if error is not None:
        return error
    kind = headers.get("Content-Type", "") if headers else ""
    return BrokerProtocolError(
        f"broker answered {status} ({kind or 'no content type'}) where the PeerID-auth "
        f"challenge (401) was due: is a captive portal or a misrouted load balancer in "
        f"the way? {_detail(body, 120)}".rstrip(),
        status=status,
        detail=_detail(body),
    )


# ---------------------------------------------------------------------------------------------
# Client


class BrokerClient:
    """Talks to one AutoTLS broker as one libp2p identity."""

    def __init__(
        self,
        identity: PrivateKey,
        *,
        base_url: str = DEFAULT_BROKER_URL,
        ca_file: str | None = None,
        session: aiohttp.ClientSession | None = None,
        forge_auth: str | None = None,
        allow_private_addresses: bool = False,
        user_agent: str = DEFAULT_USER_AGENT,
        timeout: float = 60.0,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigurationError(f"broker URL {base_url!r} is not an http(s) URL")
        self.identity = identity
        self.base_url = url
        self.forge_auth = forge_auth
        self.allow_private_addresses = allow_private_addresses
        self.user_agent = user_agent
        self.timeout = timeout
        self._ssl: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                self._ssl = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(f"cannot load broker CA file {ca_file}: {exc}") from None
        self._session = session
        self._owns_session = session is None

    def __repr__(self) -> str:
        return f"BrokerClient({str(self.base_url)!r}, peer={self.identity.peer_id})"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # unsafe=True keeps cookies on IP hosts: the load balancer's affinity cookie must
            # reach the second leg of the handshake (protocol.md §3).
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            self._owns_session = True
        return self._session

    def _url(self, path: str) -> URL:
        return self.base_url.with_path(self.base_url.path.rstrip("/") + path)

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": self.user_agent}
        if self.forge_auth:
            headers["Forge-Authorization"] = self.forge_auth
        return headers

    async def health(self) -> BrokerHealth:
        """``GET /v1/health``. Network trouble raises :class:`BrokerNetworkError` (a blip is
        retried with backoff, not answered with an hour's wait)."""
        url = self._url(HEALTH_PATH)
        try:
            async with self._get_session().get(
                url,
                headers=self._headers(),
                ssl=self._ssl,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                body = await resp.content.read(MAX_BODY)
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BrokerNetworkError(f"broker health check failed: {_describe(exc)}") from None
        if 200 <= status < 300:
            return BrokerHealth(True, 0.0, f"healthy ({status})")
        wait = health_wait(parse_retry_after(retry_after, _now()))
        detail = f"unhealthy: {status} {_detail(body, 120)}".rstrip()
        log.info("broker %s %s; waiting %.0f s before issuing", self.base_url, detail, wait)
        return BrokerHealth(False, wait, detail)

    async def register(self, value: str, addresses: Sequence[str]) -> list[str]:
        """Register the DNS-01 ``value``; returns the addresses actually sent."""
        validate_challenge_value(value)
        selected = select_dialable(addresses, allow_private=self.allow_private_addresses)
        if not selected:
            raise NoDialableAddresses(
                f"none of the {len(addresses)} addresses is "
                + ("dialable" if self.allow_private_addresses else "publicly dialable"),
                retry_after=NO_ADDRESSES_RETRY,
            )
        url = self._url(REGISTER_PATH)
        peer = self.identity.peer_id
        client = PeerIdAuthClient(
            self.identity,
            self._get_session(),
            timeout=self.timeout,
            ssl=self._ssl,
            max_body=MAX_BODY,
        )
        log.info("registering challenge for %s at %s with %s", peer, url, selected)
        try:
            resp = await client.request(
                "POST",
                url,
                json_body={"value": value, "addresses": selected},
                headers=self._headers(),
            )
        except (HandshakeRefused, PeerIdAuthUnauthorized) as exc:
            refusal = _not_a_challenge(exc.status, exc.body, exc.headers)
            log.info("broker refused %s: %s", peer, refusal)
            raise refusal from None
        except ServerAuthenticationError as exc:
            raise BrokerUnauthorized(f"broker failed to authenticate: {exc.message}") from None
        except PeerIdAuthError as exc:
            raise BrokerUnauthorized(f"PeerID auth with the broker failed: {exc.message}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BrokerNetworkError(f"broker registration failed: {_describe(exc)}") from None
        error = classify_response(resp.status, resp.body, resp.headers)
        if error is not None:
            log.info("broker (%s) refused %s: %s", resp.server_peer_id, peer, error)
            raise error
        log.info("broker %s accepted the challenge for %s", resp.server_peer_id, peer)
        return selected

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _now() -> datetime:
    return datetime.now(UTC)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
