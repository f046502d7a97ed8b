"""The engine's ports (``autotls.fsm.ports``) implemented over the real clients.

* :class:`AcmeAdapter` -- ``AcmePort`` over :class:`autotls.acme.AcmeClient`: one client per
  account key (the store shares one account among all orders), one HTTP transport for all;
  the choice among the CA's alternate chains (never one that does not build to the trust
  roots); keys and CSRs as PEM/DER bytes so the engine never touches ``cryptography``
  objects.
* :class:`BrokerAdapter` -- ``BrokerPort`` over :class:`autotls.broker.BrokerClient`: finds the
  peer's identity key and its current addresses through callables supplied by the embedding
  application (or the py-libp2p node adapter).

Both take an optional ``observer`` (:data:`autotls.http.Observer`): every HTTP exchange their
clients make passes through it.

The DNS port is :class:`autotls.dnscheck.AuthoritativeTxtChecker` and the installer port is
:class:`autotls.install.Installer`; both implement their protocols directly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from autotls._files import write_atomic
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
from autotls.acme.client import SharedCa
from autotls.acme.jws import dns01_value
from autotls.acme.problems import (
    AcmeNetworkError,
    AcmeProblem,
    AcmeProtocolError,
    for_new_order,
)
from autotls.broker import DEFAULT_BROKER_URL, BrokerClient
from autotls.broker import DEFAULT_TIMEOUT as BROKER_TIMEOUT
from autotls.fsm.clock import Clock, SystemClock
from autotls.fsm.errors import ConfigurationError, ErrorClass, PermanentError
from autotls.fsm.ports import (
    AcmeAccount,
    AcmeOrderView,
    AuthorizationView,
    BrokerHealthView,
    ChainView,
    ChallengeView,
    ReachabilityView,
    RegisteredAccount,
    RenewalWindow,
)
from autotls.http import HttpTransport, Observer, UnusableCaFile
from autotls.install import builds_to_roots
from autotls.multiaddrs import select_dialable
from autotls.peerid import PrivateKey

log = logging.getLogger(__name__)

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
# The CA's directory as last fetched, in the data directory (AcmeAdapter's directory_cache).
DIRECTORY_CACHE_FILE = "acme-directory.json"


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
        trust_roots: Sequence[x509.Certificate] = (),
        clock: Clock | None = None,
        timeout: float = 30.0,
        observer: Observer | None = None,
        directory_cache: str | Path | None = None,
    ) -> None:
        """``preferred_chain``: the common name of the top issuer of the chain to prefer among
        the CA's alternates; ``trust_roots``: the roots the installer verifies chains against
        (a chain that does not build to them is never chosen over one that does).
        ``directory_cache``: a file to keep the CA's directory in, so that a process with a
        known account sends no directory GET (a stale one is fetched anew on a 404)."""
        self.directory_url = directory_url
        self.ca_file = ca_file
        self.eab = eab
        self.contact = tuple(contact)
        self.preferred_chain = preferred_chain
        self.trust_roots = list(trust_roots)
        self.clock = clock or SystemClock()
        self.timeout = timeout
        try:
            self._http = HttpTransport(
                ca_file=ca_file, timeout=timeout, connection_limit=32, observer=observer
            )
        except UnusableCaFile as exc:
            raise ConfigurationError(f"the ACME {exc.message}") from None
        self._clients: dict[bytes, AcmeClient] = {}
        self._unsigned: AcmeClient | None = None
        # One directory and one nonce pool for every account's client and the unsigned one.
        self._cache = Path(directory_cache) if directory_cache is not None else None
        cached = self._read_cached_directory()
        self._shared = SharedCa(
            cached, cached=True, on_fetch=self._write_cached_directory if self._cache else None
        )

    def _read_cached_directory(self) -> Directory | None:
        if self._cache is None:
            return None
        try:
            stored = json.loads(self._cache.read_bytes())
            if not isinstance(stored, dict) or stored.get("url") != self.directory_url:
                return None
            return Directory.parse(stored["directory"], url=self.directory_url)
        except FileNotFoundError:
            return None
        except Exception as exc:  # unreadable or not a directory: fetch it as if none
            log.info("ignoring the cached ACME directory %s: %s", self._cache, exc)
            return None

    def _write_cached_directory(self, raw: Mapping[str, Any]) -> None:
        assert self._cache is not None
        if self._cache.parent.is_dir():
            body = {"url": self.directory_url, "directory": raw}
            write_atomic(self._cache, json.dumps(body, sort_keys=True).encode())

    @property
    def request_count(self) -> int:
        return self._http.request_count

    def _client(self, account: AcmeAccount) -> AcmeClient:
        client = self._clients.get(account.key_pem)
        if client is None or (account.url is not None and client.account_url != account.url):
            try:
                key = load_account_key(account.key_pem)
            except Exception as exc:
                raise PermanentError(f"the stored ACME account key is unusable: {exc}") from None
            client = AcmeClient(
                self.directory_url,
                key,
                account_url=account.url,
                http=self._http,
                now=self.clock.now,  # Retry-After dates on the engine's clock
                shared=self._shared,
            )
            self._clients[account.key_pem] = client
        return client

    def _directory_client(self) -> AcmeClient:
        """A client for the unsigned requests (directory, ARI): an account's when there is
        one (it has fetched the directory already), else one without a key."""
        if self._clients:
            return next(iter(self._clients.values()))
        if self._unsigned is None:
            self._unsigned = AcmeClient(
                self.directory_url, http=self._http, now=self.clock.now, shared=self._shared
            )
        return self._unsigned

    async def close(self) -> None:
        await self._http.close()

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
            return await self._directory_client().directory()
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
        directory = await self._directory_client().directory()
        return directory.renewal_info is not None

    async def profiles(self) -> Mapping[str, str]:
        directory = await self._directory_client().directory()
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
        client = self._client(account)
        return _order_view(await client.finalize(order_url, finalize_url, csr_der))

    async def download_certificate(self, account: AcmeAccount, url: str) -> ChainView:
        chain = await self._client(account).download_certificate(url)
        return ChainView(self.choose_chain(chain.pem, chain.alternates))

    def choose_chain(self, default: str, alternates: Sequence[str]) -> str:
        """The chain to serve among the CA's: the first of the preferred chain (top issuer
        named ``preferred_chain``), the CA's default, then the alternates, that builds to the
        trust roots. A new root is missing from many stores for years (Let's Encrypt's Gen Y),
        so a preference, or a default, that no configured root completes is passed over. When
        none builds, the default (the installer then says why); without trust roots nothing
        can be checked and the preference alone decides."""
        preferred = [
            c
            for c in (default, *alternates)
            if self.preferred_chain and _top_issuer(c) == self.preferred_chain
        ]
        candidates = list(dict.fromkeys([*preferred, default, *alternates]))
        if not self.trust_roots:
            return candidates[0]
        now = self.clock.now()
        chosen = next((c for c in candidates if builds_to_roots(c, self.trust_roots, now)), None)
        if preferred and chosen != preferred[0]:
            log.warning(
                "preferred chain %r does not build to the configured trust roots; serving the "
                "chain that ends at %r",
                self.preferred_chain,
                _top_issuer(chosen or default),
            )
        elif chosen is not None and chosen != default:
            log.info(
                "the CA's default chain (ending at %r) does not build to the configured trust "
                "roots; serving its alternate ending at %r",
                _top_issuer(default),
                _top_issuer(chosen),
            )
        return chosen or default

    async def renewal_info(self, cert_pem: str) -> RenewalWindow | None:
        info = await self._directory_client().renewal_info(_leaf(cert_pem))
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
# When the node of a peer came up (the registration delay counts from it); None: unknown.
OnlineSince = Callable[[str], datetime | None]


class BrokerAdapter:
    """``BrokerPort``: one :class:`BrokerClient` per peer identity this process holds (each
    with its own session: the load balancer's affinity cookie is per handshake), and one
    client without an identity for the health check."""

    def __init__(
        self,
        *,
        identity: IdentityLookup,
        addresses: AddressLookup,
        online_since: OnlineSince | None = None,
        base_url: str = DEFAULT_BROKER_URL,
        ca_file: str | None = None,
        forge_auth: str | None = None,
        allow_private_addresses: bool = False,
        timeout: float = BROKER_TIMEOUT,
        observer: Observer | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``clock``: what Retry-After dates are measured from (the engine's)."""
        self.identity = identity
        self.addresses = addresses
        self.online_since = online_since
        self.clock = clock or SystemClock()
        self.base_url = base_url
        self.ca_file = ca_file
        self.forge_auth = forge_auth
        self.allow_private_addresses = allow_private_addresses
        self.timeout = timeout
        self.observer = observer
        self._clients: dict[str, BrokerClient] = {}
        self._health_client = self._new_client(None)

    def _new_client(self, key: PrivateKey | None) -> BrokerClient:
        try:
            return BrokerClient(
                key,
                base_url=self.base_url,
                ca_file=self.ca_file,
                forge_auth=self.forge_auth,
                allow_private_addresses=self.allow_private_addresses,
                timeout=self.timeout,
                observer=self.observer,
                now=self.clock.now,  # Retry-After dates on the engine's clock
            )
        except UnusableCaFile as exc:
            raise ConfigurationError(f"the broker {exc.message}") from None

    def _client_for(self, key: PrivateKey) -> BrokerClient:
        label = key.peer_id.to_base36()
        client = self._clients.get(label)
        if client is None:
            client = self._clients[label] = self._new_client(key)
        return client

    async def health(self) -> BrokerHealthView:
        health = await self._health_client.health()
        return BrokerHealthView(health.healthy, health.wait_s, health.detail)

    async def reachability(self, peer_id: str) -> ReachabilityView:
        """The addresses a registration would send now (what :meth:`register` sends), with
        why none qualifies when none does. Reads the addresses callable, nothing else: no
        request leaves the process.

        Reachability is judged from the addresses alone, not confirmed by AutoNAT: py-libp2p
        0.8.1's AutoNAT v1 cannot confirm anything for us (see "AutoNAT" in
        :mod:`autotls.node`), so the broker's own dial-back stays the test of reachability."""
        offered = list(self.addresses(peer_id))
        dialable = select_dialable(offered, allow_private=self.allow_private_addresses)
        since = self.online_since(peer_id) if self.online_since is not None else None
        if dialable:
            detail = f"{len(dialable)} of {len(offered)} addresses dialable: " + ", ".join(dialable)
        elif not offered:
            detail = "the node has no addresses (is it listening?)"
        else:
            kind = "dialable" if self.allow_private_addresses else "public"
            hint = (
                ""
                if self.allow_private_addresses
                else "; announce a public one, or allow private addresses on a private test network"
            )
            detail = f"none of {', '.join(offered)} is {kind}{hint}"
        return ReachabilityView(tuple(dialable), detail, since)

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
        for client in [*self._clients.values(), self._health_client]:
            await client.close()
        self._clients.clear()
