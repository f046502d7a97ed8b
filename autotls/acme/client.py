"""The ACME client (RFC 8555 + RFC 9773 ARI): a thin aiohttp transport under the pure pieces in
:mod:`autotls.acme.jws`, :mod:`~autotls.acme.messages` and :mod:`~autotls.acme.problems`.

What this module owns, and nothing else:

* every HTTP exchange: under a timeout, its body read up to a size limit (certificate chains
  get a larger one), counted in :attr:`AcmeClient.request_count`;
* the nonce pool, fed by every ``Replay-Nonce`` the server sends and never persisted;
* signing: ``kid`` once the account URL is known, ``jwk`` for newAccount and revocation by
  certificate key; POST-as-GET for every fetch of an ACME resource;
* ``badNonce`` retried with the nonce from the error response, at most ``bad_nonce_retries``
  times; nothing else is retried here (the engine owns retry policy, using ``error_class`` and
  ``retry_after`` on the exceptions);
* polling of authorizations and orders, sleeping what ``Retry-After`` says (capped) through
  the injected ``sleep`` and measuring deadlines with the injected clock.

Logs carry methods, URLs, statuses and problem types; never request or response bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from types import TracebackType
from typing import Any, Self
from urllib.parse import urljoin, urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

from autotls.acme.ari import cert_id, renewal_info_url
from autotls.acme.csr import check_dns_name
from autotls.acme.jws import (
    AccountKey,
    ExternalAccountBinding,
    acme_request,
    b64url,
    check_account_key,
    external_account_binding,
    json_bytes,
    key_change_inner,
)
from autotls.acme.messages import (
    Account,
    Authorization,
    CertificateChain,
    Challenge,
    Directory,
    Order,
    RenewalInfo,
    links_with_rel,
    parse_link_header,
    parse_retry_after,
    split_pem_chain,
)
from autotls.acme.problems import (
    AcmeInputError,
    AcmeNetworkError,
    AcmeProblem,
    AcmeProtocolError,
    AuthorizationFailed,
    BadNonce,
    OrderFailed,
    OrderNotReady,
    PollTimeout,
    error_for_response,
)
from autotls.acme.revocation import REVOCATION_REASONS

log = logging.getLogger("autotls.acme")

JOSE_JSON = "application/jose+json"
PEM_CHAIN = "application/pem-certificate-chain"
DEFAULT_MAX_BODY = 256 * 1024
DEFAULT_MAX_CHAIN_BODY = 1024 * 1024
MAX_ALTERNATES = 4
# Pebble in CI rejects 20 % of good nonces: eight retries leave a 0.2**9 (5e-7) chance per request
# of surfacing badNonce, where five would fail about one test run in a hundred.
DEFAULT_BAD_NONCE_RETRIES = 8
# A server may ask for any Retry-After; an error's is passed on up to a week (Let's Encrypt's
# longest rate-limit window), beyond that it is a broken header, not a plan.
MAX_ERROR_RETRY_AFTER = 7 * 24 * 3600.0
_NONCE = re.compile(r"[A-Za-z0-9_-]+")
_NONCE_POOL_SIZE = 32


def _version() -> str:
    try:
        return metadata.version("autotls")
    except metadata.PackageNotFoundError:
        return "0"


DEFAULT_USER_AGENT = f"autotls/{_version()} aiohttp/{aiohttp.__version__}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Response:
    url: str
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def location(self) -> str | None:
        location = self.headers.get("Location")
        # RFC 8555 wants absolute URLs; resolving a relative one costs nothing.
        return urljoin(self.url, location) if location else None

    def json_object(self, what: str) -> Mapping[str, Any]:
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise AcmeProtocolError(
                f"{what} is not valid JSON (HTTP {self.status})", url=self.url, status=self.status
            ) from None
        if not isinstance(value, Mapping):
            raise AcmeProtocolError(
                f"{what} is a JSON {type(value).__name__}, not an object",
                url=self.url,
                status=self.status,
            )
        return value

    def require_location(self, what: str) -> str:
        location = self.location
        if not location:
            raise AcmeProtocolError(
                f"{what} response has no Location header", url=self.url, status=self.status
            )
        return location


class AcmeClient:
    """An ACME account's view of one CA. Usable as ``async with``; safe to share between tasks
    of one event loop."""

    def __init__(
        self,
        directory_url: str,
        account_key: AccountKey,
        *,
        account_url: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
        max_body: int = DEFAULT_MAX_BODY,
        max_chain_body: int = DEFAULT_MAX_CHAIN_BODY,
        now: Callable[[], datetime] = _utcnow,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        user_agent: str = DEFAULT_USER_AGENT,
        poll_interval: float = 1.0,
        max_poll_interval: float = 60.0,
        bad_nonce_retries: int = DEFAULT_BAD_NONCE_RETRIES,
    ) -> None:
        parts = urlsplit(directory_url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise AcmeInputError(f"ACME directory URL must be http(s)://...: {directory_url!r}")
        if timeout <= 0 or max_body <= 0 or max_chain_body <= 0 or poll_interval <= 0:
            raise AcmeInputError("timeout, body limits and poll interval must be positive")
        self.directory_url = directory_url
        self._key = check_account_key(account_key)
        self._account_url = account_url
        self._ssl = _ssl_context(ca_file) if session is None else None
        self._session = session
        self._owns_session = session is None
        self._timeout = timeout
        self._max_body = max_body
        self._max_chain_body = max_chain_body
        self._now = now
        self._sleep = sleep
        self._user_agent = user_agent
        self._poll_interval = poll_interval
        self._max_poll_interval = max(max_poll_interval, poll_interval)
        self._bad_nonce_retries = bad_nonce_retries
        self._directory: Directory | None = None
        self._nonces: deque[str] = deque(maxlen=_NONCE_POOL_SIZE)
        self.request_count = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    @property
    def account_key(self) -> AccountKey:
        return self._key

    @property
    def account_url(self) -> str | None:
        return self._account_url

    # -- transport ------------------------------------------------------------------------

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = self._ssl if self._ssl is not None else _ssl_context(None)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                trust_env=False,
            )
            self._owns_session = True
        return self._session

    async def _send(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        accept: str | None = None,
        limit: int | None = None,
    ) -> _Response:
        limit = limit if limit is not None else self._max_body
        session = await self._get_session()
        headers = {"User-Agent": self._user_agent}
        if body is not None:
            headers["Content-Type"] = JOSE_JSON
        if accept is not None:
            headers["Accept"] = accept
        self.request_count += 1
        try:
            async with asyncio.timeout(self._timeout):
                async with session.request(
                    method,
                    url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                ) as resp:
                    if resp.content_length is not None and resp.content_length > limit:
                        raise AcmeProtocolError(
                            f"{method} {url}: body of {resp.content_length} bytes exceeds the"
                            f" {limit}-byte limit",
                            url=url,
                            status=resp.status,
                        )
                    data = await _read_limited(resp, limit, method, url)
                    response = _Response(url, resp.status, CIMultiDict(resp.headers), data)
        except TimeoutError:
            log.info("%s %s timed out after %.1fs", method, url, self._timeout)
            raise AcmeNetworkError(
                f"{method} {url} timed out after {self._timeout:g}s", url=url
            ) from None
        except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
            log.info("%s %s failed: %s", method, url, type(exc).__name__)
            raise AcmeNetworkError(
                f"{method} {url} failed: {type(exc).__name__}: {exc}", url=url
            ) from exc
        log.debug("%s %s -> %d", method, url, response.status)
        nonce = response.headers.get("Replay-Nonce")
        if nonce is not None and _NONCE.fullmatch(nonce):
            self._nonces.append(nonce)
        if not 200 <= response.status < 300:
            raise self._error(response)
        return response

    def _error(self, response: _Response) -> Exception:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), self._now())
        if retry_after is not None:
            retry_after = min(retry_after, MAX_ERROR_RETRY_AFTER)
        error = error_for_response(
            response.status,
            response.headers.get("Content-Type", ""),
            response.body,
            retry_after=retry_after,
            url=response.url,
        )
        if isinstance(error, AcmeProblem):
            log.info("ACME problem %s (HTTP %d) at %s", error.type, response.status, response.url)
        return error

    async def _nonce(self) -> str:
        if self._nonces:
            return self._nonces.pop()
        directory = await self.directory()
        await self._send("HEAD", directory.new_nonce)  # _send pools a well-formed Replay-Nonce
        if not self._nonces:
            raise AcmeProtocolError(
                "newNonce answered without a usable Replay-Nonce header", url=directory.new_nonce
            )
        return self._nonces.pop()

    async def _post(
        self,
        url: str,
        payload: Mapping[str, Any] | None,
        *,
        signer: AccountKey | None = None,
        embed_jwk: bool = False,
        accept: str | None = None,
        limit: int | None = None,
    ) -> _Response:
        """A signed POST (``payload=None``: POST-as-GET), retrying badNonce with the nonce the
        error response carried."""
        key = signer if signer is not None else self._key
        kid = None if embed_jwk else await self._account_kid()
        retries = 0
        while True:
            nonce = await self._nonce()
            if isinstance(key, rsa.RSAPrivateKey):
                # RSA signing with big keys takes milliseconds: keep the event loop free.
                jws = await asyncio.to_thread(
                    acme_request, key, url=url, nonce=nonce, payload=payload, kid=kid
                )
            else:
                jws = acme_request(key, url=url, nonce=nonce, payload=payload, kid=kid)
            try:
                return await self._send(
                    "POST", url, body=json_bytes(jws), accept=accept, limit=limit
                )
            except BadNonce:
                if retries >= self._bad_nonce_retries:
                    raise
                retries += 1
                log.debug("badNonce at %s, retry %d", url, retries)

    async def _account_kid(self) -> str:
        if self._account_url is None:
            # A kid-signed request before we know the account: find it by key rather than fail.
            return (await self.lookup_account()).url
        return self._account_url

    def _retry_after(self, response: _Response) -> float | None:
        return parse_retry_after(response.headers.get("Retry-After"), self._now())

    # -- directory and account ------------------------------------------------------------

    async def directory(self) -> Directory:
        """The CA's directory, fetched once per client."""
        if self._directory is None:
            response = await self._send("GET", self.directory_url, accept="application/json")
            self._directory = Directory.parse(
                response.json_object("directory"), url=self.directory_url
            )
        return self._directory

    async def _account_request(self, payload: Mapping[str, Any]) -> Account:
        directory = await self.directory()
        response = await self._post(directory.new_account, payload, embed_jwk=True)
        url = response.require_location("newAccount")
        account = Account.parse(response.json_object("account"), url)
        self._account_url = url
        return account

    async def new_account(
        self,
        *,
        contact: Sequence[str] = (),
        terms_agreed: bool = True,
        eab: ExternalAccountBinding | None = None,
    ) -> Account:
        """Register this key (or get the account it already has: the CA answers 200 then)."""
        directory = await self.directory()
        payload: dict[str, Any] = {}
        if terms_agreed:
            payload["termsOfServiceAgreed"] = True
        if contact:
            payload["contact"] = list(contact)
        if eab is not None:
            payload["externalAccountBinding"] = external_account_binding(
                eab, self._key, directory.new_account
            )
        return await self._account_request(payload)

    async def lookup_account(self) -> Account:
        """The account of this key (``onlyReturnExisting``); raises AccountDoesNotExist."""
        return await self._account_request({"onlyReturnExisting": True})

    async def get_account(self) -> Account:
        kid = await self._account_kid()
        response = await self._post(kid, None)
        return Account.parse(response.json_object("account"), kid)

    async def rollover_key(self, new_key: AccountKey) -> None:
        """Replace the account key (RFC 8555 §7.3.5); afterwards this client signs with it."""
        new_key = check_account_key(new_key)
        directory = await self.directory()
        kid = await self._account_kid()
        inner = key_change_inner(new_key, self._key, account_url=kid, url=directory.key_change)
        await self._post(directory.key_change, inner)
        self._key = new_key
        log.info("account key rolled over for %s", kid)

    async def deactivate_account(self) -> Account:
        kid = await self._account_kid()
        response = await self._post(kid, {"status": "deactivated"})
        return Account.parse(response.json_object("account"), kid)

    # -- orders ---------------------------------------------------------------------------

    async def new_order(
        self,
        identifiers: Sequence[str],
        *,
        profile: str | None = None,
        replaces: str | None = None,
    ) -> Order:
        """newOrder for DNS identifiers. The caller persists ``order.url`` at once: Let's
        Encrypt keeps no per-account order list to find it again."""
        if isinstance(identifiers, str):
            raise AcmeInputError("new_order takes a sequence of names, not a single string")
        names = [check_dns_name(name) for name in identifiers]
        if not names:
            raise AcmeInputError("an order needs at least one identifier")
        payload: dict[str, Any] = {"identifiers": [{"type": "dns", "value": n} for n in names]}
        if profile is not None:
            payload["profile"] = profile
        if replaces is not None:
            payload["replaces"] = replaces
        directory = await self.directory()
        response = await self._post(directory.new_order, payload)
        url = response.require_location("newOrder")
        return Order.parse(
            response.json_object("order"), url, retry_after=self._retry_after(response)
        )

    async def get_order(self, url: str) -> Order:
        response = await self._post(url, None)
        return Order.parse(
            response.json_object("order"), url, retry_after=self._retry_after(response)
        )

    async def get_authorization(self, url: str) -> Authorization:
        response = await self._post(url, None)
        return Authorization.parse(
            response.json_object("authorization"), url, retry_after=self._retry_after(response)
        )

    async def get_challenge(self, url: str) -> Challenge:
        response = await self._post(url, None)
        return Challenge.parse(response.json_object("challenge"), url=url)

    async def answer_challenge(self, url: str) -> Challenge:
        """Tell the CA the challenge is ready (POST ``{}``). Only after the TXT is visible:
        Let's Encrypt validates once, and one failure makes the order invalid."""
        response = await self._post(url, {})
        return Challenge.parse(response.json_object("challenge"), url=url)

    def _poll_delay(self, retry_after: float | None) -> float:
        if retry_after is None or retry_after <= 0:
            return self._poll_interval
        return min(retry_after, self._max_poll_interval)

    async def poll_authorization(self, url: str, *, timeout: float) -> Authorization:  # noqa: ASYNC109
        """Fetch until the authorization leaves ``pending``. Returns it when ``valid``; raises
        AuthorizationFailed (order_invalid) for any other final status, PollTimeout at the
        deadline. ``timeout`` is measured on the injected clock (not an asyncio cancel scope)
        so tests can drive it; each request keeps its own network timeout."""
        started = self._now()
        deadline = started + timedelta(seconds=timeout)
        while True:
            authorization = await self.get_authorization(url)
            if authorization.status == "valid":
                return authorization
            if authorization.status != "pending":
                raise AuthorizationFailed(authorization, authorization.problem())
            remaining = (deadline - self._now()).total_seconds()
            if remaining <= 0:
                raise PollTimeout(url, authorization.status, timeout)
            await self._sleep(min(self._poll_delay(authorization.retry_after), remaining))

    async def finalize(self, order: Order, csr_der: bytes) -> Order:
        """Submit the CSR. A 403 orderNotReady means our view of the order is stale: the
        order is re-fetched and returned for the caller to branch on its status."""
        try:
            response = await self._post(order.finalize, {"csr": b64url(csr_der)})
        except OrderNotReady:
            log.info("finalize of %s: order not ready, re-fetching it", order.url)
            return await self.get_order(order.url)
        return Order.parse(
            response.json_object("order"), order.url, retry_after=self._retry_after(response)
        )

    async def poll_order(self, url: str, *, timeout: float) -> Order:  # noqa: ASYNC109
        """Fetch while the order is ``processing`` (honouring Retry-After). Raises OrderFailed
        when it turns ``invalid``, PollTimeout at the deadline (on the injected clock, as for
        :meth:`poll_authorization`); returns any other status."""
        started = self._now()
        deadline = started + timedelta(seconds=timeout)
        while True:
            order = await self.get_order(url)
            if order.status == "invalid":
                raise OrderFailed(order, order.problem())
            if order.status != "processing":
                return order
            remaining = (deadline - self._now()).total_seconds()
            if remaining <= 0:
                raise PollTimeout(url, order.status, timeout)
            await self._sleep(min(self._poll_delay(order.retry_after), remaining))

    async def _download_pem(self, url: str) -> tuple[str, _Response]:
        response = await self._post(url, None, accept=PEM_CHAIN, limit=self._max_chain_body)
        try:
            pem = response.body.decode("ascii")
        except UnicodeDecodeError:
            raise AcmeProtocolError("certificate chain is not ASCII PEM", url=url) from None
        split_pem_chain(response.body, url)
        return pem, response

    async def download_certificate(self, url: str) -> CertificateChain:
        """The chain at ``url`` and the alternate chains it links (``rel="alternate"``)."""
        pem, response = await self._download_pem(url)
        links = parse_link_header(response.headers.getall("Link", []), url)
        alternates = []
        for alternate_url in links_with_rel(links, "alternate")[:MAX_ALTERNATES]:
            alternate_pem, _ = await self._download_pem(alternate_url)
            alternates.append(alternate_pem)
        return CertificateChain(url=url, pem=pem, alternates=tuple(alternates))

    async def revoke_certificate(
        self,
        cert_der: bytes,
        *,
        reason: int | None = None,
        cert_key: AccountKey | None = None,
    ) -> None:
        """Revoke, signed by the account key (kid) or, with ``cert_key``, by the certificate's
        own key (jwk), which works without the account."""
        try:
            x509.load_der_x509_certificate(cert_der)
        except ValueError:
            raise AcmeInputError("revoke_certificate needs a DER certificate") from None
        payload: dict[str, Any] = {"certificate": b64url(cert_der)}
        if reason is not None:
            if reason not in REVOCATION_REASONS.values():
                raise AcmeInputError(f"not an RFC 5280 revocation reason code: {reason!r}")
            payload["reason"] = reason
        directory = await self.directory()
        if cert_key is not None:
            await self._post(
                directory.revoke_cert, payload, signer=check_account_key(cert_key), embed_jwk=True
            )
        else:
            await self._post(directory.revoke_cert, payload)

    # -- ARI --------------------------------------------------------------------------------

    async def renewal_info(self, cert: x509.Certificate) -> RenewalInfo | None:
        """The CA's suggested renewal window for ``cert``, or None when the CA has no ARI.
        A plain GET, as RFC 9773 specifies (no account involved)."""
        directory = await self.directory()
        if directory.renewal_info is None:
            return None
        url = renewal_info_url(directory.renewal_info, cert_id(cert))
        response = await self._send("GET", url, accept="application/json")
        return RenewalInfo.parse(
            response.json_object("renewalInfo"), url, retry_after=self._retry_after(response)
        )


def _ssl_context(ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """Verify the CA's TLS against ``ca_file`` when given (tests, private CAs), else against the
    system trust store."""
    try:
        if ca_file is not None:
            return ssl.create_default_context(cafile=ca_file)
        return ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise AcmeInputError(f"CA file {os.fspath(ca_file or '')!r} is unusable: {exc}") from None


async def _read_limited(
    response: aiohttp.ClientResponse, limit: int, method: str, url: str
) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        total += len(chunk)
        if total > limit:
            raise AcmeProtocolError(
                f"{method} {url}: body exceeds the {limit}-byte limit",
                url=url,
                status=response.status,
            )
        chunks.append(chunk)
    return b"".join(chunks)
