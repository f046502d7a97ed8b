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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from yarl import URL

from autotls.fsm.errors import AutoTLSError, ConfigurationError, ErrorClass
from autotls.http import (
    HttpClient,
    HttpFailure,
    HttpTransport,
    IncompleteAnswer,
    Observer,
    parse_retry_after,
)
from autotls.multiaddrs import select_dialable
from autotls.peerid import PrivateKey
from autotls.peeridauth import (
    PeerIdAuthClient,
    PeerIdAuthError,
    PeerIdAuthRefused,
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
DEFAULT_TIMEOUT = 60.0

_VALUE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


def _utcnow() -> datetime:
    return datetime.now(UTC)


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


def classify_response(
    status: int, body: bytes, headers: Any, now: Callable[[], datetime] = _utcnow
) -> BrokerError | None:
    """The error for a broker answer to a registration; ``None`` for success (2xx).
    ``now``: what an HTTP-date Retry-After is measured from."""
    if 200 <= status < 300:
        return None
    detail = _detail(body)
    retry_after = parse_retry_after(headers.get("Retry-After"), now()) if headers else None
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


def _not_a_challenge(
    status: int, body: bytes, headers: Any, now: Callable[[], datetime]
) -> BrokerError:
    """The error for the first leg of a registration answered with something other than the
    PeerID-auth challenge."""
    error = classify_response(status, body, headers, now)
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


class BrokerClient(HttpClient):
    """Talks to one AutoTLS broker as one libp2p identity (``identity``; without one it only
    checks the broker's health). ``http`` shares a transport; otherwise the client makes its
    own from ``ca_file``, ``session``, ``timeout``, ``user_agent`` and ``observer``, keeping
    the load balancer's cookies on IP hosts (protocol.md §3). ``now`` is the clock an
    HTTP-date Retry-After is measured from (the engine's, when it drives the client)."""

    def __init__(
        self,
        identity: PrivateKey | None = None,
        *,
        base_url: str = DEFAULT_BROKER_URL,
        http: HttpTransport | None = None,
        ca_file: str | None = None,
        session: aiohttp.ClientSession | None = None,
        forge_auth: str | None = None,
        allow_private_addresses: bool = False,
        user_agent: str | None = None,
        timeout: float | None = None,
        observer: Observer | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigurationError(f"broker URL {base_url!r} is not an http(s) URL")
        super().__init__(
            http,
            ca_file=ca_file,
            session=session,
            user_agent=user_agent,
            timeout=timeout,
            default_timeout=DEFAULT_TIMEOUT,
            keep_ip_cookies=True,
            observer=observer,
        )
        self.identity = identity
        self.base_url = url
        self.forge_auth = forge_auth
        self.allow_private_addresses = allow_private_addresses
        self.now = now

    def __repr__(self) -> str:
        peer = self.identity.peer_id if self.identity is not None else None
        return f"BrokerClient({str(self.base_url)!r}, peer={peer})"

    def _url(self, path: str) -> URL:
        return self.base_url.with_path(self.base_url.path.rstrip("/") + path)

    def _headers(self) -> dict[str, str]:
        return {"Forge-Authorization": self.forge_auth} if self.forge_auth else {}

    async def health(self) -> BrokerHealth:
        """``GET /v1/health``. Network trouble raises :class:`BrokerNetworkError` (a blip is
        retried with backoff, not answered with an hour's wait)."""
        try:
            answer = await self.http.request(
                "GET",
                self._url(HEALTH_PATH),
                request_class="health",
                headers=self._headers(),
                limit=MAX_BODY,
            )
        except IncompleteAnswer as exc:
            answer = exc.answer  # the status decides; what arrived of the body is detail
        except HttpFailure as exc:
            raise BrokerNetworkError(f"broker health check failed: {exc.reason}") from None
        status = answer.status
        if 200 <= status < 300:
            return BrokerHealth(True, 0.0, f"healthy ({status})")
        wait = health_wait(answer.retry_after(self.now))
        detail = f"unhealthy: {status} {_detail(answer.body, 120)}".rstrip()
        log.info("broker %s %s; waiting %.0f s before issuing", self.base_url, detail, wait)
        return BrokerHealth(False, wait, detail)

    async def register(self, value: str, addresses: Sequence[str]) -> list[str]:
        """Register the DNS-01 ``value``; returns the addresses actually sent."""
        if self.identity is None:
            raise ConfigurationError(
                "this broker client has no identity key: it can check the broker's health only"
            )
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
        client = PeerIdAuthClient(self.identity, self.http, max_body=MAX_BODY)
        log.info("registering challenge for %s at %s with %s", peer, url, selected)
        try:
            resp = await client.request(
                "POST",
                url,
                json_body={"value": value, "addresses": selected},
                headers=self._headers(),
                request_class="registration_leg",
            )
        except PeerIdAuthRefused as exc:
            refusal = _not_a_challenge(exc.status, exc.body, exc.headers, self.now)
            log.info("broker refused %s: %s", peer, refusal)
            raise refusal from None
        except ServerAuthenticationError as exc:
            raise BrokerUnauthorized(f"broker failed to authenticate: {exc.message}") from None
        except PeerIdAuthError as exc:
            raise BrokerUnauthorized(f"PeerID auth with the broker failed: {exc.message}") from None
        except HttpFailure as exc:
            raise BrokerNetworkError(f"broker registration failed: {exc.reason}") from None
        error = classify_response(resp.status, resp.body, resp.headers, self.now)
        if error is not None:
            log.info("broker (%s) refused %s: %s", resp.server_peer_id, peer, error)
            raise error
        log.info("broker %s accepted the challenge for %s", resp.server_peer_id, peer)
        return selected
