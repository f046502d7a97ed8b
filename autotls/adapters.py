"""The engine's ports (``autotls.fsm.ports``) implemented over the real clients.

* :class:`AcmeAdapter` -- ``AcmePort`` over :class:`autotls.acme.AcmeClient`: one client per
  account key (the store shares one account among all orders), one HTTP session for all;
  chain preference among alternates; keys and CSRs as PEM/DER bytes so the engine never
  touches ``cryptography`` objects.
* :class:`BrokerAdapter` -- ``BrokerPort`` over :class:`autotls.broker.BrokerClient`: finds the
  peer's identity key and its current addresses through callables supplied by the embedding
  application (or the py-libp2p node adapter).

The DNS port is :class:`autotls.dnscheck.AuthoritativeTxtChecker` and the installer port is
:class:`autotls.install.Installer`; both implement their protocols directly.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from autotls.acme import (
    AcmeClient,
    Authorization,
    Directory,
    ExternalAccountBinding,
    Order,
    cert_id,
    dump_account_key,
    generate_account_key,
    generate_certificate_key,
    load_account_key,
    make_csr,
)
from autotls.acme.jws import dns01_value
from autotls.acme.problems import (
    AcmeNetworkError,
    AcmeProblem,
    AcmeProtocolError,
    for_new_order,
)
from autotls.broker import DEFAULT_BROKER_URL, BrokerClient
from autotls.fsm.clock import Clock, SystemClock
from autotls.fsm.errors import ConfigurationError, ErrorClass, PermanentError
from autotls.fsm.ports import (
    AcmeAccount,
    AcmeOrderView,
    AuthorizationView,
    BrokerHealthView,
    ChainView,
    ChallengeView,
    RegisteredAccount,
    RenewalWindow,
)
from autotls.peerid import PrivateKey

log = logging.getLogger(__name__)

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


def _order_view(order: Order) -> AcmeOrderView:
    return AcmeOrderView(
        url=order.url,
        status=order.status,
        expires=order.expires,
        authorizations=tuple(order.authorizations),
        finalize=order.finalize,
        certificate=order.certificate,
        error=dict(order.error) if order.error else None,
        retry_after=order.retry_after,
    )


def _authorization_view(authz: Authorization) -> AuthorizationView:
    return AuthorizationView(
        url=authz.url,
        status=authz.status,
        identifier=authz.identifier.value,
        wildcard=authz.wildcard,
        expires=authz.expires,
        challenges=tuple(
            ChallengeView(
                c.url, c.type, c.status, c.token or "", dict(c.error) if c.error else None
            )
            for c in authz.challenges
        ),
        retry_after=authz.retry_after,
    )


def _leaf(chain_pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem.encode("ascii"))[0]


def _top_issuer(chain_pem: str) -> str:
    certs = x509.load_pem_x509_certificates(chain_pem.encode("ascii"))
    names = certs[-1].issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else certs[-1].issuer.rfc4514_string()


class AcmeAdapter:
    def __init__(
        self,
        directory_url: str,
        *,
        ca_file: str | None = None,
        eab: ExternalAccountBinding | None = None,
        contact: Sequence[str] = (),
        preferred_chain: str | None = None,
        timeout: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self.directory_url = directory_url
        # Retry-After dates and polling deadlines are read on the engine's clock.
        self.clock = clock or SystemClock()
        self.ca_file = ca_file
        self.eab = eab
        self.contact = tuple(contact)
        self.preferred_chain = preferred_chain
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._clients: dict[bytes, AcmeClient] = {}
        self._anonymous: AcmeClient | None = None
        self._retired_requests = 0
        if ca_file is not None:
            try:
                ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(f"cannot load the ACME CA file {ca_file}: {exc}") from None

    @property
    def request_count(self) -> int:
        clients = [*self._clients.values(), *([self._anonymous] if self._anonymous else [])]
        return self._retired_requests + sum(c.request_count for c in clients)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context = (
                ssl.create_default_context(cafile=self.ca_file)
                if self.ca_file
                else ssl.create_default_context()
            )
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=32), trust_env=False
            )
        return self._session

    def _client(self, account: AcmeAccount) -> AcmeClient:
        client = self._clients.get(account.key_pem)
        if client is None or (account.url is not None and client.account_url != account.url):
            if client is not None:
                self._retired_requests += client.request_count
            try:
                key = load_account_key(account.key_pem)
            except Exception as exc:
                raise PermanentError(f"the stored ACME account key is unusable: {exc}") from None
            client = AcmeClient(
                self.directory_url,
                key,
                account_url=account.url,
                session=self._http(),
                timeout=self.timeout,
                now=self.clock.now,
            )
            self._clients[account.key_pem] = client
        return client

    async def _directory_client(self) -> AcmeClient:
        if self._clients:
            return next(iter(self._clients.values()))
        if self._anonymous is None:
            # Directory and ARI requests are unsigned; any key will do for the client object.
            self._anonymous = AcmeClient(
                self.directory_url,
                generate_account_key(),
                session=self._http(),
                timeout=self.timeout,
                now=self.clock.now,
            )
        return self._anonymous

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check_directory(self) -> Directory | None:
        """Fetch the ACME directory once, before any order is touched.

        Raises a one-line :class:`ConfigurationError` when the URL is not an ACME directory:
        an HTML page, invalid JSON, a JSON array, a directory without ``newOrder``, a 404, a
        redirect. Returns None (with a warning) when the server cannot be reached now or is
        in trouble (5xx, rate limit): that passes, and the engine retries. A plaintext
        ``http://`` directory gets a warning (fine for a private test CA only)."""
        if urlsplit(self.directory_url).scheme == "http":
            log.warning(
                "ACME directory %s is plaintext http://: use it only for a private test CA",
                self.directory_url,
            )
        try:
            return await (await self._directory_client()).directory()
        except AcmeNetworkError as exc:
            log.warning("ACME directory %s not reachable now: %s", self.directory_url, exc)
            return None
        except AcmeProblem as exc:
            if exc.error_class in (ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED):
                log.warning("ACME directory %s is in trouble now: %s", self.directory_url, exc)
                return None
            reason = str(exc)
        except AcmeProtocolError as exc:
            reason = str(exc)
        raise ConfigurationError(
            f"{self.directory_url} is not an ACME directory: {' '.join(reason.split())}"
        )

    # -- AcmePort -------------------------------------------------------------------------

    async def supports_ari(self) -> bool:
        directory = await (await self._directory_client()).directory()
        return directory.renewal_info is not None

    async def profiles(self) -> Mapping[str, str]:
        directory = await (await self._directory_client()).directory()
        return directory.profiles

    async def register_account(self, account: AcmeAccount) -> RegisteredAccount:
        client = self._client(AcmeAccount(account.key_pem, None))
        created = await client.new_account(contact=self.contact, eab=self.eab)
        return RegisteredAccount(created.url, created.status)

    async def new_order(
        self, account: AcmeAccount, identifier: str, *, profile: str | None, replaces: str | None
    ) -> AcmeOrderView:
        try:
            order = await self._client(account).new_order(
                [identifier], profile=profile, replaces=replaces
            )
        except AcmeProblem as problem:
            error = for_new_order(problem, replaces=replaces)
            if error is problem:
                raise
            raise error from problem
        return _order_view(order)

    async def get_order(self, account: AcmeAccount, url: str) -> AcmeOrderView:
        return _order_view(await self._client(account).get_order(url))

    async def get_authorization(self, account: AcmeAccount, url: str) -> AuthorizationView:
        return _authorization_view(await self._client(account).get_authorization(url))

    def dns01_value(self, account: AcmeAccount, token: str) -> str:
        return dns01_value(token, self._client(account).account_key)

    async def answer_challenge(self, account: AcmeAccount, url: str) -> ChallengeView:
        c = await self._client(account).answer_challenge(url)
        return ChallengeView(
            c.url, c.type, c.status, c.token or "", dict(c.error) if c.error else None
        )

    async def finalize(
        self, account: AcmeAccount, order_url: str, finalize_url: str, csr_der: bytes
    ) -> AcmeOrderView:
        # The step has just fetched the order and seen it ready; finalize needs only its URLs
        # (on 403 orderNotReady the client re-fetches it for us).
        ready = Order(
            url=order_url, status="ready", identifiers=(), authorizations=(), finalize=finalize_url
        )
        return _order_view(await self._client(account).finalize(ready, csr_der))

    async def download_certificate(self, account: AcmeAccount, url: str) -> ChainView:
        chain = await self._client(account).download_certificate(url)
        if self.preferred_chain:
            for candidate in (chain.pem, *chain.alternates):
                if _top_issuer(candidate) == self.preferred_chain:
                    return ChainView(candidate)
        return ChainView(chain.pem)

    async def renewal_info(self, cert_pem: str) -> RenewalWindow | None:
        info = await (await self._directory_client()).renewal_info(_leaf(cert_pem))
        if info is None:
            return None
        return RenewalWindow(info.start, info.end, info.retry_after, info.explanation_url)

    def cert_id(self, cert_pem: str) -> str | None:
        try:
            return cert_id(_leaf(cert_pem))
        except Exception:  # no AKI: the CA cannot offer ARI for it anyway
            return None

    def generate_account_key(self) -> bytes:
        return dump_account_key(generate_account_key())

    def generate_certificate_key(self) -> bytes:
        key = generate_certificate_key()
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def make_csr(self, key_pem: bytes, names: Sequence[str]) -> bytes:
        key: Any = serialization.load_pem_private_key(key_pem, None)
        return make_csr(key, names)


IdentityLookup = Callable[[str], PrivateKey | None]
AddressLookup = Callable[[str], Sequence[str]]


class BrokerAdapter:
    """``BrokerPort``: one :class:`BrokerClient` per peer identity this process holds."""

    def __init__(
        self,
        *,
        identity: IdentityLookup,
        addresses: AddressLookup,
        base_url: str = DEFAULT_BROKER_URL,
        ca_file: str | None = None,
        forge_auth: str | None = None,
        allow_private_addresses: bool = False,
        timeout: float = 60.0,
    ) -> None:
        self.identity = identity
        self.addresses = addresses
        self.base_url = base_url
        self.ca_file = ca_file
        self.forge_auth = forge_auth
        self.allow_private_addresses = allow_private_addresses
        self.timeout = timeout
        self._clients: dict[str, BrokerClient] = {}
        self._health_client: BrokerClient | None = None

    def _client_for(self, key: PrivateKey) -> BrokerClient:
        label = key.peer_id.to_base36()
        client = self._clients.get(label)
        if client is None:
            client = BrokerClient(
                key,
                base_url=self.base_url,
                ca_file=self.ca_file,
                forge_auth=self.forge_auth,
                allow_private_addresses=self.allow_private_addresses,
                timeout=self.timeout,
            )
            self._clients[label] = client
        return client

    async def health(self) -> BrokerHealthView:
        if self._health_client is None:
            self._health_client = BrokerClient(
                PrivateKey.generate(),
                base_url=self.base_url,
                ca_file=self.ca_file,
                forge_auth=self.forge_auth,
                timeout=self.timeout,
            )
        health = await self._health_client.health()
        return BrokerHealthView(health.healthy, health.wait_s, health.detail)

    async def register(self, peer_id: str, value: str) -> Sequence[str]:
        key = self.identity(peer_id)
        if key is None:
            raise PermanentError(
                f"this process holds no identity key for peer {peer_id}: it cannot "
                "authenticate to the broker for it"
            )
        if key.peer_id.to_base36() != peer_id:
            raise PermanentError(f"the identity key given for {peer_id} is another peer's")
        return await self._client_for(key).register(value, list(self.addresses(peer_id)))

    async def close(self) -> None:
        clients = list(self._clients.values())
        if self._health_client is not None:
            clients.append(self._health_client)
        for client in clients:
            await client.close()
        self._clients.clear()
        self._health_client = None
