"""The ACME client (RFC 8555 + RFC 9773 ARI): a thin transport under the pure pieces in
:mod:`autotls.acme.jws`, :mod:`~autotls.acme.messages` and :mod:`~autotls.acme.problems`,
over the HTTP layer every autotls client shares (:mod:`autotls.http`).

What this module owns, and nothing else:

* what an ACME exchange is: its request class, ``Accept`` and ``Content-Type``, its body
  limit (certificate chains get a larger one), its count in :attr:`AcmeClient.request_count`,
  and how a failed or refused one is classified (:mod:`autotls.acme.problems`);
* the nonce pool, fed by every ``Replay-Nonce`` the server sends and never persisted;
* signing: ``kid`` once the account URL is known, ``jwk`` for newAccount and revocation by
  certificate key; POST-as-GET for every fetch of an ACME resource. The directory and ARI
  are unsigned: a client without an account key can fetch them;
* ``badNonce`` retried with the nonce from the error response, at most ``bad_nonce_retries``
  times; nothing else is retried here, and nothing is polled: the engine owns retry policy and
  polling, using ``status``, ``retry_after`` and the exceptions' ``error_class``.

Logs carry methods, URLs, statuses and problem types; never request or response bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

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
    split_pem_chain,
)
from autotls.acme.problems import (
    AcmeInputError,
    AcmeNetworkError,
    AcmeProblem,
    AcmeProtocolError,
    BadNonce,
    OrderNotReady,
    error_for_response,
)
from autotls.acme.revocation import REVOCATION_REASONS
from autotls.http import (
    AnswerTooLarge,
    HttpClient,
    HttpFailure,
    HttpResponse,
    HttpTransport,
    Observer,
    UnusableCaFile,
)

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
_T = TypeVar("_T")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _json_object(response: HttpResponse, what: str) -> Mapping[str, Any]:
    try:
        value = json.loads(response.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise AcmeProtocolError(
            f"{what} is not valid JSON (HTTP {response.status})",
            url=response.url,
            status=response.status,
        ) from None
    if not isinstance(value, Mapping):
        raise AcmeProtocolError(
            f"{what} is a JSON {type(value).__name__}, not an object",
            url=response.url,
            status=response.status,
        )
    return value


def _require_location(response: HttpResponse, what: str) -> str:
    location = response.location
    if not location:
        raise AcmeProtocolError(
            f"{what} response has no Location header", url=response.url, status=response.status
        )
    return location


class SharedCa:
    """What every client of one CA may share, whatever its account: the directory and the
    nonce pool (a nonce is the server's, not an account's). One per :class:`AcmeAdapter`, so a
    process fetches the directory once and spends every ``Replay-Nonce`` it was given.

    ``cached``: the directory came from a cache (:meth:`AcmeClient` was given one), not from
    the server in this process: an error that looks like a stale directory (404, malformed)
    then makes the client fetch it anew and try the request once more. ``on_fetch`` is told
    the raw directory whenever it is fetched (to write the cache)."""

    def __init__(
        self,
        directory: Directory | None = None,
        *,
        cached: bool = False,
        on_fetch: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.directory = directory
        self.cached = cached and directory is not None
        self.on_fetch = on_fetch
        self.nonces: deque[str] = deque(maxlen=_NONCE_POOL_SIZE)


class AcmeClient(HttpClient):
    """An ACME account's view of one CA. Usable as ``async with``; safe to share between tasks
    of one event loop. Without ``account_key`` it fetches only the directory and ARI.

    ``http`` shares one transport among clients (one per account, say); otherwise the client
    makes its own from ``ca_file``, ``session``, ``timeout``, ``user_agent`` and ``observer``."""

    def __init__(
        self,
        directory_url: str,
        account_key: AccountKey | None = None,
        *,
        account_url: str | None = None,
        http: HttpTransport | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float | None = None,
        user_agent: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        max_chain_body: int = DEFAULT_MAX_CHAIN_BODY,
        now: Callable[[], datetime] = _utcnow,
        bad_nonce_retries: int = DEFAULT_BAD_NONCE_RETRIES,
        observer: Observer | None = None,
        shared: SharedCa | None = None,
    ) -> None:
        parts = urlsplit(directory_url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise AcmeInputError(f"ACME directory URL must be http(s)://...: {directory_url!r}")
        if (timeout is not None and timeout <= 0) or max_body <= 0 or max_chain_body <= 0:
            raise AcmeInputError("timeout and body limits must be positive")
        try:
            super().__init__(
                http,
                ca_file=ca_file,
                session=session,
                timeout=timeout,
                user_agent=user_agent,
                observer=observer,
            )
        except UnusableCaFile as exc:
            raise AcmeInputError(exc.message) from None
        self.directory_url = directory_url
        self._key = check_account_key(account_key) if account_key is not None else None
        self._account_url = account_url
        self._max_body = max_body
        self._max_chain_body = max_chain_body
        self._now = now
        self._bad_nonce_retries = bad_nonce_retries
        self._shared = shared if shared is not None else SharedCa()
        self._nonces = self._shared.nonces
        self.request_count = 0

    @property
    def account_key(self) -> AccountKey:
        return self._signing_key()

    @property
    def account_url(self) -> str | None:
        return self._account_url

    def _signing_key(self) -> AccountKey:
        if self._key is None:
            raise AcmeInputError(
                "this ACME client has no account key: without one it fetches only the"
                " directory and renewal information"
            )
        return self._key

    # -- transport ------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        request_class: str,
        *,
        body: bytes | None = None,
        accept: str | None = None,
        limit: int | None = None,
    ) -> HttpResponse:
        headers = {}
        if body is not None:
            headers["Content-Type"] = JOSE_JSON
        if accept is not None:
            headers["Accept"] = accept
        self.request_count += 1
        try:
            response = await self.http.request(
                method,
                url,
                request_class=request_class,
                headers=headers,
                body=body,
                limit=limit if limit is not None else self._max_body,
            )
        except AnswerTooLarge as exc:
            raise AcmeProtocolError(str(exc), url=url, status=exc.answer.status) from None
        except HttpFailure as exc:
            log.info("%s %s failed: %s", method, url, exc.reason)
            raise AcmeNetworkError(str(exc), url=url) from exc
        log.debug("%s %s -> %d", method, url, response.status)
        nonce = response.headers.get("Replay-Nonce")
        if nonce is not None and _NONCE.fullmatch(nonce):
            self._nonces.append(nonce)
        if not 200 <= response.status < 300:
            raise self._error(response)
        return response

    def _error(self, response: HttpResponse) -> Exception:
        retry_after = response.retry_after(self._now)
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

        async def fresh(directory: Directory) -> HttpResponse:
            # _send pools a well-formed Replay-Nonce.
            return await self._send("HEAD", directory.new_nonce, "newNonce")

        await self._with_directory(fresh)
        directory = await self.directory()
        if not self._nonces:
            raise AcmeProtocolError(
                "newNonce answered without a usable Replay-Nonce header", url=directory.new_nonce
            )
        return self._nonces.pop()

    async def _post(
        self,
        url: str,
        request_class: str,
        payload: Mapping[str, Any] | None,
        *,
        signer: AccountKey | None = None,
        embed_jwk: bool = False,
        accept: str | None = None,
        limit: int | None = None,
    ) -> HttpResponse:
        """A signed POST (``payload=None``: POST-as-GET), retrying badNonce with the nonce the
        error response carried."""
        key = signer if signer is not None else self._signing_key()
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
                    "POST", url, request_class, body=json_bytes(jws), accept=accept, limit=limit
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

    # -- directory and account ------------------------------------------------------------

    async def directory(self) -> Directory:
        """The CA's directory, fetched once per client (or per :class:`SharedCa`)."""
        if self._shared.directory is None:
            await self._fetch_directory()
        assert self._shared.directory is not None
        return self._shared.directory

    async def _fetch_directory(self) -> Directory:
        response = await self._send(
            "GET", self.directory_url, "directory", accept="application/json"
        )
        raw = _json_object(response, "directory")
        directory = Directory.parse(raw, url=self.directory_url)
        self._shared.directory, self._shared.cached = directory, False
        if self._shared.on_fetch is not None:
            try:
                self._shared.on_fetch(raw)
            except Exception:  # a cache that cannot be written costs a fetch next time
                log.warning("could not cache the ACME directory", exc_info=True)
        return directory

    async def _with_directory(self, call: Callable[[Directory], Awaitable[_T]]) -> _T:
        """``call`` with the directory's URLs; with a cached directory, a refusal that looks
        like a stale one (the endpoint moved: 404, or malformed) fetches it anew, once."""
        directory = await self.directory()
        if not self._shared.cached:
            return await call(directory)
        try:
            return await call(directory)
        except (AcmeProblem, AcmeProtocolError) as exc:
            stale = exc.status == 404 or (
                isinstance(exc, AcmeProblem) and exc.type.endswith(":malformed")
            )
            if not stale:
                raise
            current = self._shared.directory
            if current is not None and current is not directory:
                return await call(current)  # fetched anew meanwhile (for a nonce, say)
            log.info("cached ACME directory looks stale (%s): fetching it again", exc)
            return await call(await self._fetch_directory())

    async def _account_request(self, payload: Mapping[str, Any]) -> Account:
        response = await self._with_directory(
            lambda directory: self._post(
                directory.new_account, "newAccount", payload, embed_jwk=True
            )
        )
        url = _require_location(response, "newAccount")
        account = Account.parse(_json_object(response, "account"), url)
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
                eab, self._signing_key(), directory.new_account
            )
        return await self._account_request(payload)

    async def lookup_account(self) -> Account:
        """The account of this key (``onlyReturnExisting``); raises AccountDoesNotExist."""
        return await self._account_request({"onlyReturnExisting": True})

    async def get_account(self) -> Account:
        kid = await self._account_kid()
        response = await self._post(kid, "account", None)
        return Account.parse(_json_object(response, "account"), kid)

    async def rollover_key(self, new_key: AccountKey) -> None:
        """Replace the account key (RFC 8555 §7.3.5); afterwards this client signs with it."""
        new_key = check_account_key(new_key)
        directory = await self.directory()
        kid = await self._account_kid()
        inner = key_change_inner(
            new_key, self._signing_key(), account_url=kid, url=directory.key_change
        )
        await self._post(directory.key_change, "keyChange", inner)
        self._key = new_key
        log.info("account key rolled over for %s", kid)

    async def deactivate_account(self) -> Account:
        kid = await self._account_kid()
        response = await self._post(kid, "account", {"status": "deactivated"})
        return Account.parse(_json_object(response, "account"), kid)

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
        response = await self._with_directory(
            lambda directory: self._post(directory.new_order, "newOrder", payload)
        )
        url = _require_location(response, "newOrder")
        return Order.parse(
            _json_object(response, "order"), url, retry_after=response.retry_after(self._now)
        )

    async def get_order(self, url: str) -> Order:
        response = await self._post(url, "order", None)
        return Order.parse(
            _json_object(response, "order"), url, retry_after=response.retry_after(self._now)
        )

    async def get_authorization(self, url: str) -> Authorization:
        response = await self._post(url, "authz", None)
        return Authorization.parse(
            _json_object(response, "authorization"),
            url,
            retry_after=response.retry_after(self._now),
        )

    async def get_challenge(self, url: str) -> Challenge:
        response = await self._post(url, "challenge", None)
        return Challenge.parse(_json_object(response, "challenge"), url=url)

    async def answer_challenge(self, url: str) -> Challenge:
        """Tell the CA the challenge is ready (POST ``{}``). Only after the TXT is visible:
        Let's Encrypt validates once, and one failure makes the order invalid."""
        response = await self._post(url, "challenge", {})
        return Challenge.parse(_json_object(response, "challenge"), url=url)

    async def finalize(self, order_url: str, finalize_url: str, csr_der: bytes) -> Order:
        """Submit the CSR to the order's ``finalize`` URL; returns the order as the CA answers
        it. A 403 orderNotReady means our view of the order is stale: the order is re-fetched
        and returned for the caller to branch on its status."""
        try:
            response = await self._post(finalize_url, "finalize", {"csr": b64url(csr_der)})
        except OrderNotReady:
            log.info("finalize of %s: order not ready, re-fetching it", order_url)
            return await self.get_order(order_url)
        return Order.parse(
            _json_object(response, "order"),
            order_url,
            retry_after=response.retry_after(self._now),
        )

    async def _download_pem(self, url: str) -> tuple[str, HttpResponse]:
        response = await self._post(
            url, "certificate", None, accept=PEM_CHAIN, limit=self._max_chain_body
        )
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
                directory.revoke_cert,
                "revokeCert",
                payload,
                signer=check_account_key(cert_key),
                embed_jwk=True,
            )
        else:
            await self._post(directory.revoke_cert, "revokeCert", payload)

    # -- ARI --------------------------------------------------------------------------------

    async def renewal_info(self, cert: x509.Certificate) -> RenewalInfo | None:
        """The CA's suggested renewal window for ``cert``, or None when the CA has no ARI.
        A plain GET, as RFC 9773 specifies (no account involved)."""
        directory = await self.directory()
        if directory.renewal_info is None:
            return None
        url = renewal_info_url(directory.renewal_info, cert_id(cert))
        response = await self._send("GET", url, "renewalInfo", accept="application/json")
        return RenewalInfo.parse(
            _json_object(response, "renewalInfo"),
            url,
            retry_after=response.retry_after(self._now),
        )
