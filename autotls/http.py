"""The HTTP transport every autotls client runs on: the ACME client, the broker client and its
PeerID-auth handshake, and the local stack's calls to pebble-challtestsrv.

What this module owns, and nothing else:

* the session: made on first use (TLS verified against a CA file when one is given, else
  against the system trust store; no proxy settings taken from the environment; cookies kept
  on IP hosts when asked, for the broker's load balancer) and closed by its owner; or the
  caller's session, used as it is and never closed;
* the ``User-Agent`` every request carries (RFC 8555 §6.1 asks ACME clients for one);
* the exchange: one request under a total timeout, redirects never followed, the answer read
  whole up to a size limit. An exchange that brings no whole answer raises an
  :class:`HttpFailure` (timed out, connection failed, or an :class:`IncompleteAnswer`: too
  large or cut, with the status, headers and what arrived of the body); every client turns
  them into its own classified errors, so the classification stays with its protocol;
* the observer: every exchange, answered or failed, passes through one place and is handed
  to the transport's observer as an :class:`Exchange` (method, URL, request class, status,
  headers, bodies, elapsed time). Request metrics and recordings hook in there, several at
  once through :class:`ServiceObservers`; an observer's bug is logged and never costs an
  exchange its answer;
* the pure helpers around it: :func:`ssl_context` and :func:`parse_retry_after`.

Nothing here logs request or response bodies.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Self
from urllib.parse import urljoin

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from autotls.fsm.errors import ConfigurationError

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_USER_AGENT",
    "AnswerTooLarge",
    "AnswerTruncated",
    "ConnectionFailed",
    "Exchange",
    "HttpClient",
    "HttpFailure",
    "HttpResponse",
    "HttpTransport",
    "IncompleteAnswer",
    "Observer",
    "RequestTimedOut",
    "ServiceObserver",
    "ServiceObservers",
    "UnusableCaFile",
    "parse_retry_after",
    "ssl_context",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 256 * 1024
DEFAULT_TIMEOUT = 30.0
_CHUNK = 64 * 1024


def _version() -> str:
    try:
        return metadata.version("autotls")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


DEFAULT_USER_AGENT = f"autotls/{_version()} (+python) aiohttp/{aiohttp.__version__}"


# ---------------------------------------------------------------------------------------------
# Pure helpers


class UnusableCaFile(ConfigurationError, ValueError):
    """The CA file given for a server's TLS cannot be read or holds no certificate."""


def ssl_context(ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A client context that verifies servers against ``ca_file`` when given (tests, private
    CAs), else against the system trust store."""
    try:
        if ca_file is not None:
            return ssl.create_default_context(cafile=ca_file)
        return ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise UnusableCaFile(f"CA file {os.fspath(ca_file or '')!r} is unusable: {exc}") from None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from ``now``: delay-seconds or an HTTP-date (past dates give 0).
    None when absent or unparseable (negative numbers and decimals are not Retry-After)."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit() and text.isascii():
        try:
            return float(int(text))
        except (ValueError, OverflowError):  # thousands of digits: not a delay, garbage
            return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return max(0.0, (when - now).total_seconds())
    except OverflowError:
        return None


# ---------------------------------------------------------------------------------------------
# What an exchange gives back


@dataclass(frozen=True)
class HttpResponse:
    """A whole answer (or, inside an :class:`HttpFailure`, what arrived of one)."""

    url: str
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def location(self) -> str | None:
        location = self.headers.get("Location")
        # Servers should send absolute URLs; resolving a relative one costs nothing.
        return urljoin(self.url, location) if location else None

    def retry_after(self, now: Callable[[], datetime]) -> float | None:
        """The ``Retry-After`` header in seconds from ``now()``, or None. ``now`` is the
        caller's clock (the engine's, injected): an HTTP date means nothing without one."""
        return parse_retry_after(self.headers.get("Retry-After"), now())


class HttpFailure(Exception):
    """An exchange that brought no whole answer. ``reason`` is the short why (``timed out``,
    ``ClientConnectorError: ...``) a client puts in its own message; ``str()`` is the whole
    line with method and URL."""

    def __init__(self, message: str, *, method: str, url: str, request_class: str, reason: str):
        super().__init__(message)
        self.method = method
        self.url = url
        self.request_class = request_class
        self.reason = reason


class RequestTimedOut(HttpFailure):
    """No whole answer within the timeout (connecting, the TLS handshake, or the body)."""


class ConnectionFailed(HttpFailure):
    """Connection refused or reset, TLS refused, or the connection died before the answer's
    status line and headers arrived."""


class IncompleteAnswer(HttpFailure):
    """The status line and headers arrived, the body did not arrive whole. ``answer`` holds
    them and what was read of the body."""

    def __init__(
        self,
        message: str,
        *,
        method: str,
        url: str,
        request_class: str,
        reason: str,
        answer: HttpResponse,
    ) -> None:
        super().__init__(
            message, method=method, url=url, request_class=request_class, reason=reason
        )
        self.answer = answer


class AnswerTooLarge(IncompleteAnswer):
    """The body exceeds the size limit (as announced by ``Content-Length``, or as read); the
    answer holds at most the limit's worth of it."""


class AnswerTruncated(IncompleteAnswer):
    """The connection died inside the body."""


@dataclass(frozen=True)
class Exchange:
    """One exchange as the observer sees it. It holds what went over the wire, secrets
    included (``Authorization`` and ``Authentication-Info`` carry PeerID-auth bearer tokens,
    ACME bodies carry JWS signatures): an observer that writes anything down sanitises it."""

    method: str
    url: str
    request_class: str
    request_headers: Mapping[str, str]
    request_body: bytes | None
    status: int | None  # None: no status line arrived (``error`` says why)
    response_headers: Mapping[str, str] | None
    response_body: bytes | None  # whole, or what arrived of it when ``error`` is set
    elapsed: float  # seconds, from sending to the whole answer (or the failure)
    error: BaseException | None = None  # an HttpFailure, or what else ended it (cancellation)

    @property
    def request_size(self) -> int:
        return len(self.request_body) if self.request_body is not None else 0

    @property
    def response_size(self) -> int:
        return len(self.response_body) if self.response_body is not None else 0


Observer = Callable[[Exchange], None]
# ``observer(service, exchange)``: which client's transport saw the exchange ("acme", "broker").
ServiceObserver = Callable[[str, Exchange], None]


def _tell(observer: Observer, exchange: Exchange) -> None:
    try:
        observer(exchange)
    except Exception:  # an observer's bug must not cost an exchange its answer
        log.exception("HTTP observer failed on %s %s", exchange.method, exchange.url)


class ServiceObservers:
    """Several :data:`ServiceObserver` behind the transports of several services: the
    :data:`Observer` :meth:`of` a service tells each of them in turn."""

    def __init__(self) -> None:
        self._observers: list[ServiceObserver] = []

    def add(self, observer: ServiceObserver) -> None:
        self._observers.append(observer)

    def of(self, service: str) -> Observer:
        def observe(exchange: Exchange) -> None:
            for observer in self._observers:
                _tell(functools.partial(observer, service), exchange)

        return observe


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The transport


class HttpTransport:
    """One HTTP session and the rules every exchange on it follows. Usable as ``async with``;
    safe to share between clients and tasks of one event loop.

    ``session``: use the caller's session (never closed here); otherwise one is made on first
    use with ``connection_limit`` connections, and, with ``keep_ip_cookies``, a cookie jar
    that keeps cookies on IP hosts. ``ca_file`` verifies TLS against that CA in either case.
    """

    def __init__(
        self,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        session: aiohttp.ClientSession | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        timeout: float = DEFAULT_TIMEOUT,
        max_body: int = DEFAULT_MAX_BODY,
        keep_ip_cookies: bool = False,
        connection_limit: int = 100,
        observer: Observer | None = None,
    ) -> None:
        if timeout <= 0 or max_body <= 0:
            raise ConfigurationError("HTTP timeout and body limit must be positive")
        # Checked here, before any exchange: an unusable CA file is the operator's to fix.
        self._ssl: ssl.SSLContext | bool = ssl_context(ca_file) if ca_file is not None else True
        self._session = session
        self._owns_session = session is None
        self.user_agent = user_agent
        self.timeout = timeout
        self.max_body = max_body
        self._keep_ip_cookies = keep_ip_cookies
        self._connection_limit = connection_limit
        self.observer = observer
        self.request_count = 0

    def _session_now(self) -> aiohttp.ClientSession:
        if self._owns_session and (self._session is None or self._session.closed):
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connection_limit),
                # Load balancers pin the legs of a PeerID-auth handshake to one backend with
                # a cookie, also when the broker is addressed by IP (protocol.md §3).
                cookie_jar=aiohttp.CookieJar(unsafe=True) if self._keep_ip_cookies else None,
                trust_env=False,
            )
        assert self._session is not None
        return self._session

    async def close(self) -> None:
        """Close the session if this transport made it; a borrowed one is left open."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        request_class: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        limit: int | None = None,
    ) -> HttpResponse:
        """Send one request and read its whole answer, whatever its status, up to ``limit``
        bytes (default: the transport's). ``request_class`` names what the request is for
        (``newOrder``, ``health``...) for the observer."""
        limit = limit if limit is not None else self.max_body
        sent = {"User-Agent": self.user_agent, **(headers or {})}
        where = str(url)
        self.request_count += 1
        started = time.monotonic()
        answer: HttpResponse | None = None
        error: BaseException | None = None
        try:
            answer = await self._exchange(method, url, request_class, sent, body, limit)
            return answer
        except BaseException as exc:  # observed, then re-raised: a cancellation included
            error = exc
            answer = exc.answer if isinstance(exc, IncompleteAnswer) else None
            raise
        finally:
            if self.observer is not None:
                self._observe(
                    Exchange(
                        method=method,
                        url=where,
                        request_class=request_class,
                        request_headers=sent,
                        request_body=body,
                        status=answer.status if answer is not None else None,
                        response_headers=answer.headers if answer is not None else None,
                        response_body=answer.body if answer is not None else None,
                        elapsed=time.monotonic() - started,
                        error=error,
                    )
                )

    def _observe(self, exchange: Exchange) -> None:
        assert self.observer is not None
        _tell(self.observer, exchange)

    async def _exchange(
        self,
        method: str,
        url: str | URL,
        request_class: str,
        headers: Mapping[str, str],
        body: bytes | None,
        limit: int,
    ) -> HttpResponse:
        where = str(url)
        timeout = self.timeout
        names = {"method": method, "url": where, "request_class": request_class}
        session = self._session_now()
        head: HttpResponse | None = None
        chunks: list[bytes] = []
        try:
            # asyncio's timeout also bounds a TLS handshake that never completes.
            async with asyncio.timeout(timeout):
                async with session.request(
                    method,
                    url,
                    data=body,
                    headers=headers,
                    ssl=self._ssl,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as resp:
                    head = HttpResponse(where, resp.status, resp.headers, b"")
                    declared = resp.content_length
                    if declared is not None and declared > limit:
                        message = f"{method} {where}: body of {declared} bytes exceeds the"
                        message += f" {limit}-byte limit"
                        raise AnswerTooLarge(message, reason=message, answer=head, **names)
                    total = 0
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        total += len(chunk)
                        if total > limit:
                            chunks.append(chunk[: len(chunk) - (total - limit)])
                            message = f"{method} {where}: body exceeds the {limit}-byte limit"
                            raise AnswerTooLarge(
                                message, reason=message, answer=_joined(head, chunks), **names
                            )
                        chunks.append(chunk)
                    return _joined(head, chunks)
        except TimeoutError:
            raise RequestTimedOut(
                f"{method} {where} timed out after {timeout:g}s", reason="timed out", **names
            ) from None
        except (aiohttp.ClientError, OSError) as exc:  # ssl.SSLError is an OSError
            reason = _describe(exc)
            message = f"{method} {where} failed: {reason}"
            if head is None:
                raise ConnectionFailed(message, reason=reason, **names) from exc
            raise AnswerTruncated(
                message, reason=reason, answer=_joined(head, chunks), **names
            ) from exc


def _joined(head: HttpResponse, chunks: list[bytes]) -> HttpResponse:
    return HttpResponse(head.url, head.status, head.headers, b"".join(chunks))


# ---------------------------------------------------------------------------------------------
# The clients' common ground


class HttpClient:
    """Base of a client that talks over an :class:`HttpTransport`: it uses the transport it is
    given (shared with other clients, never closed here), or makes its own from the options
    and closes it with :meth:`close` (and at the end of ``async with``)."""

    def __init__(
        self,
        http: HttpTransport | None,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        session: aiohttp.ClientSession | None = None,
        user_agent: str | None = None,
        timeout: float | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        keep_ip_cookies: bool = False,
        observer: Observer | None = None,
    ) -> None:
        if http is not None:
            options = {
                "ca_file": ca_file,
                "session": session,
                "user_agent": user_agent,
                "timeout": timeout,
                "observer": observer,
            }
            given = [name for name, value in options.items() if value is not None]
            if given:
                raise ConfigurationError(
                    f"{type(self).__name__}: {', '.join(given)} belong to the HTTP transport"
                    " it was given, not to the client"
                )
            self.http = http
        else:
            self.http = HttpTransport(
                ca_file=ca_file,
                session=session,
                user_agent=user_agent or DEFAULT_USER_AGENT,
                timeout=timeout if timeout is not None else default_timeout,
                keep_ip_cookies=keep_ip_cookies,
                observer=observer,
            )
        self._owns_http = http is None

    async def close(self) -> None:
        if self._owns_http:
            await self.http.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
