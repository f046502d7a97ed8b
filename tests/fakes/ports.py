"""In-memory fakes of the engine's ports, for step and worker tests.

These are fakes, not the real parts: ``FakeCA`` models just enough of an ACME CA (accounts,
orders, one authorization per order, validation, finalize, issuance of real X.509
certificates from its own CA key, ARI windows, order reuse) to exercise every branch of the
steps deterministically and fast. Real Pebble, the local broker and dnspython are exercised
by the integration tests; these fakes exist so each error class can be injected at each
step without network timing.

Errors are scripted per operation: ``ca.fail("new_order", error)`` makes the next
``new_order`` raise ``error`` (queue, first in first out). ACME problems are built with the
production constructor (:func:`acme_problem`), and ``new_order`` passes them through the same
conversion the real adapter applies, so a step test meets the classes users meet.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from autotls.acme.problems import for_new_order, problem_from_document
from autotls.fsm.clock import Clock
from autotls.fsm.errors import AutoTLSError
from autotls.fsm.ports import (
    AcmeAccount,
    AcmeOrderView,
    AuthorizationView,
    BrokerHealthView,
    ChainView,
    ChallengeView,
    InstalledCertificate,
    ReachabilityView,
    RegisteredAccount,
    RenewalWindow,
    TxtCheck,
)
from autotls.install import CertificateRejected

ACME = "urn:ietf:params:acme:error:"


def acme_problem(
    kind: str, detail: str, status: int, *, retry_after: float | None = None
) -> AutoTLSError:
    """The error the real ACME client raises for this problem document: built by the
    production constructor, so the fakes inject exactly the classes users get."""
    return problem_from_document(
        {"type": ACME + kind, "detail": detail, "status": status},
        status=status,
        retry_after=retry_after,
        url="https://fake-ca.test/",
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class FakeOrder:
    url: str
    account: str
    identifier: str
    profile: str | None
    replaces: str | None
    status: str
    expires: datetime
    authz_url: str
    finalize: str
    certificate: str | None = None
    processing_polls: int = 0


@dataclass
class FakeAuthz:
    url: str
    identifier: str
    status: str
    expires: datetime
    challenge_url: str
    token: str
    challenge_status: str = "pending"
    error: dict[str, object] | None = None
    pending_polls: int = 0


class FakeCA:
    """Fake ACME port. ``validation`` decides how answered challenges end."""

    directory_url = "https://fake-ca.test/directory"

    def __init__(self, clock: Clock, *, ari: bool = False, reuse_orders: bool = False) -> None:
        self.clock = clock
        self.ari = ari
        self.reuse_orders = reuse_orders  # Let's Encrypt returns the pending order again
        self.reuse_authz = False  # the CA hands back an already valid authorization
        self.validation = "valid"  # or "invalid"
        self.pending_polls = 0  # authz polls that stay pending before the result
        self.processing_polls = 0  # order polls that stay processing after finalize
        self.retry_after: float | None = None
        self.lifetime = timedelta(days=90)
        self.authz_lifetime = timedelta(hours=8)  # of a pending authorization
        self.window: tuple[timedelta, timedelta] | None = None  # ARI, relative to not_before
        self.ari_retry_after: float | None = 6 * 3600
        self.accounts: dict[bytes, str] = {}
        self.orders: dict[str, FakeOrder] = {}
        self.authzs: dict[str, FakeAuthz] = {}
        self.certs: dict[str, str] = {}  # cert url -> chain pem
        self.serials_replaced: set[str] = set()
        self.calls: list[str] = []
        self._errors: dict[str, deque[BaseException]] = defaultdict(deque)
        self._ids = itertools.count(1)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        now = clock.now()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake CA root")])
        self.root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=3650))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )

    # -- scripting -----------------------------------------------------------------------

    def fail(self, operation: str, *errors: BaseException) -> None:
        self._errors[operation].extend(errors)

    def heal(self) -> None:
        """Drop every scripted error not raised yet."""
        self._errors.clear()

    def _enter(self, operation: str) -> None:
        self.calls.append(operation)
        queue = self._errors.get(operation)
        if queue:
            raise queue.popleft()

    def count(self, operation: str) -> int:
        return self.calls.count(operation)

    def forget_accounts(self) -> None:
        """Like a Pebble restart: every account is gone."""
        self.accounts.clear()

    def _check_account(self, account: AcmeAccount) -> None:
        if account.url is None or self.accounts.get(account.key_pem) != account.url:
            raise acme_problem("accountDoesNotExist", "no such account", 400)

    # -- the port ------------------------------------------------------------------------

    async def supports_ari(self) -> bool:
        return self.ari

    async def register_account(self, account: AcmeAccount) -> RegisteredAccount:
        self._enter("register_account")
        url = self.accounts.get(account.key_pem)
        if url is None:
            url = f"https://fake-ca.test/acct/{next(self._ids)}"
            self.accounts[account.key_pem] = url
        return RegisteredAccount(url, "valid")

    async def new_order(
        self, account: AcmeAccount, identifier: str, *, profile: str | None, replaces: str | None
    ) -> AcmeOrderView:
        try:
            self._enter("new_order")
            self._check_account(account)
            if replaces is not None and replaces in self.serials_replaced:
                raise acme_problem("alreadyReplaced", "certificate already replaced", 409)
        except AutoTLSError as error:  # what AcmeAdapter.new_order does with a problem
            raise for_new_order(error, replaces=replaces) from None
        now = self.clock.now()
        if replaces is not None:
            self.serials_replaced.add(replaces)
        if self.reuse_orders:
            for order in self.orders.values():
                if (
                    order.account == account.url
                    and order.identifier == identifier
                    and order.profile == profile
                    and order.status in ("pending", "ready")
                    and order.expires > now
                ):
                    return self._view(order)
        n = next(self._ids)
        authz = FakeAuthz(
            url=f"https://fake-ca.test/authz/{n}",
            identifier=identifier.removeprefix("*."),
            status="valid" if self.reuse_authz else "pending",
            expires=now + self.authz_lifetime,
            challenge_url=f"https://fake-ca.test/chall/{n}",
            token=base64.urlsafe_b64encode(hashlib.sha256(str(n).encode()).digest())
            .decode()
            .rstrip("="),
        )
        if self.reuse_authz:
            authz.challenge_status = "valid"
        self.authzs[authz.url] = authz
        order = FakeOrder(
            url=f"https://fake-ca.test/order/{n}",
            account=account.url or "",
            identifier=identifier,
            profile=profile,
            replaces=replaces,
            status="ready" if self.reuse_authz else "pending",
            expires=now + timedelta(days=7),
            authz_url=authz.url,
            finalize=f"https://fake-ca.test/finalize/{n}",
        )
        self.orders[order.url] = order
        return self._view(order)

    async def get_order(self, account: AcmeAccount, url: str) -> AcmeOrderView:
        self._enter("get_order")
        self._check_account(account)
        order = self.orders[url]
        authz = self.authzs[order.authz_url]
        if order.status == "pending":
            self._poll_validation(authz)  # a CA validates whether we poll the order or the authz
        if order.status == "processing":
            if order.processing_polls > 0:
                order.processing_polls -= 1
            else:
                self._issue(order)
        return self._view(order)

    async def get_authorization(self, account: AcmeAccount, url: str) -> AuthorizationView:
        self._enter("get_authorization")
        self._check_account(account)
        authz = self.authzs[url]
        self._poll_validation(authz)
        return AuthorizationView(
            url=authz.url,
            status=authz.status,
            identifier=authz.identifier,
            wildcard=True,
            expires=authz.expires,
            challenges=(
                ChallengeView(
                    authz.challenge_url, "dns-01", authz.challenge_status, authz.token, authz.error
                ),
            ),
            retry_after=self.retry_after if authz.status == "pending" else None,
        )

    def dns01_value(self, account: AcmeAccount, token: str) -> str:
        digest = hashlib.sha256(f"{token}.{account.url}".encode()).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    async def answer_challenge(self, account: AcmeAccount, url: str) -> ChallengeView:
        self._enter("answer_challenge")
        self._check_account(account)
        authz = next(a for a in self.authzs.values() if a.challenge_url == url)
        if authz.challenge_status != "pending":
            # As Pebble does (and a one-shot CA may): a challenge is answered once.
            raise acme_problem(
                "malformed",
                f"Cannot update challenge with status {authz.challenge_status}, only pending",
                400,
            )
        authz.challenge_status = "processing"
        authz.pending_polls = self.pending_polls
        return ChallengeView(url, "dns-01", authz.challenge_status, authz.token)

    def _poll_validation(self, authz: FakeAuthz) -> None:
        if authz.challenge_status == "processing":
            if authz.pending_polls > 0:
                authz.pending_polls -= 1
            else:
                self._conclude(authz)

    def _conclude(self, authz: FakeAuthz) -> None:
        if self.validation == "valid":
            authz.status = authz.challenge_status = "valid"
            for order in self.orders.values():
                if order.authz_url == authz.url and order.status == "pending":
                    order.status = "ready"
        else:
            authz.status = authz.challenge_status = "invalid"
            authz.error = {"type": ACME + "incorrectResponse", "detail": "TXT mismatch"}
            for order in self.orders.values():
                if order.authz_url == authz.url:
                    order.status = "invalid"

    async def finalize(
        self, account: AcmeAccount, order_url: str, finalize_url: str, csr_der: bytes
    ) -> AcmeOrderView:
        self._enter("finalize")
        self._check_account(account)
        order = self.orders[order_url]
        if order.status != "ready":
            return self._view(order)  # what the real port does on 403 orderNotReady
        csr = x509.load_der_x509_csr(csr_der)
        order.status = "processing"
        order.processing_polls = self.processing_polls
        self._csr_for = getattr(self, "_csr_for", {})
        self._csr_for[order.url] = csr
        if order.processing_polls == 0:
            self._issue(order)
        return self._view(order)

    def _issue(self, order: FakeOrder) -> None:
        csr = self._csr_for[order.url]
        now = self.clock.now()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + self.lifetime)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(order.identifier)]), critical=True
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        url = f"https://fake-ca.test/cert/{next(self._ids)}"
        self.certs[url] = (
            leaf.public_bytes(serialization.Encoding.PEM)
            + self.root.public_bytes(serialization.Encoding.PEM)
        ).decode()
        order.status = "valid"
        order.certificate = url

    async def download_certificate(self, account: AcmeAccount, url: str) -> ChainView:
        self._enter("download_certificate")
        return ChainView(self.certs[url])

    async def renewal_info(self, cert_pem: str) -> RenewalWindow | None:
        self._enter("renewal_info")
        if not self.ari:
            return None
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        nb = cert.not_valid_before_utc
        if self.window is None:
            lifetime = cert.not_valid_after_utc - nb
            start, end = nb + lifetime * 2 / 3, nb + lifetime * 2 / 3 + timedelta(days=2)
        else:
            start, end = nb + self.window[0], nb + self.window[1]
        return RenewalWindow(start, end, self.ari_retry_after)

    def cert_id(self, cert_pem: str) -> str | None:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        return f"fake-aki.{cert.serial_number:x}"

    def generate_account_key(self) -> bytes:
        return _pem_key(ec.generate_private_key(ec.SECP256R1()))

    def generate_certificate_key(self) -> bytes:
        return _pem_key(ec.generate_private_key(ec.SECP256R1()))

    def make_csr(self, key_pem: bytes, names: Sequence[str]) -> bytes:
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.DER)

    def _view(self, order: FakeOrder) -> AcmeOrderView:
        return AcmeOrderView(
            url=order.url,
            status=order.status,
            expires=order.expires,
            authorizations=(order.authz_url,),
            finalize=order.finalize,
            certificate=order.certificate,
            error={"type": ACME + "unauthorized", "detail": "validation failed"}
            if order.status == "invalid"
            else None,
            retry_after=self.retry_after if order.status in ("pending", "processing") else None,
        )


@dataclass
class FakeDns:
    """Fake DNS port: authoritative servers that see a record ``lag`` checks after it is set."""

    records: dict[str, str] = field(default_factory=dict)
    lag: int = 0
    never_visible: bool = False
    checks: int = 0
    _pending: dict[str, int] = field(default_factory=dict)

    def publish(self, name: str, value: str) -> None:
        self.records[name] = value
        self._pending[name] = self.lag

    async def check_txt(self, name: str, expected: str) -> TxtCheck:
        self.checks += 1
        if self._pending.get(name, 0) > 0:
            self._pending[name] -= 1
            return TxtCheck(False, {"ns1.fake": "missing"})
        seen = self.records.get(name)
        visible = seen == expected and not self.never_visible
        return TxtCheck(visible, {"ns1.fake": "ok" if visible else f"other: {seen}"})


class FakeBroker:
    """Fake broker port: stores the value into ``FakeDns`` like p2p-forge does."""

    def __init__(self, dns: FakeDns, zone: str = "libp2p.direct") -> None:
        self.dns = dns
        self.zone = zone
        self.healthy = True
        self.wait_s = 3600.0
        # What the node offers the broker (reachability); empty: nothing it could dial.
        self.addresses: tuple[str, ...] = ("/ip4/203.0.113.7/tcp/4001",)
        self.online_since: datetime | None = None
        self.health_checks = 0
        self.registrations: list[tuple[str, str]] = []
        self._errors: deque[BaseException] = deque()
        self._peer_errors: dict[str, deque[BaseException]] = defaultdict(deque)

    def fail(self, *errors: BaseException, peer: str | None = None) -> None:
        """The next registrations (of ``peer`` only, when given) raise these."""
        (self._errors if peer is None else self._peer_errors[peer]).extend(errors)

    def heal(self) -> None:
        self._errors.clear()
        self._peer_errors.clear()
        self.healthy = True

    async def health(self) -> BrokerHealthView:
        self.health_checks += 1
        if self.healthy:
            return BrokerHealthView(True)
        return BrokerHealthView(False, self.wait_s, "503 from /v1/health")

    async def reachability(self, peer_id: str) -> ReachabilityView:
        detail = f"{len(self.addresses)} public" if self.addresses else "no public address"
        return ReachabilityView(self.addresses, detail, self.online_since)

    async def register(self, peer_id: str, value: str) -> Sequence[str]:
        if self._peer_errors[peer_id]:
            raise self._peer_errors[peer_id].popleft()
        if self._errors:
            raise self._errors.popleft()
        self.registrations.append((peer_id, value))
        self.dns.publish(f"_acme-challenge.{peer_id}.{self.zone}", value)
        return list(self.addresses)


class FakeInstaller:
    """Fake installer port: checks the SAN and the key, records what would be served."""

    def __init__(self) -> None:
        self.installed: list[tuple[str, str]] = []  # (peer, serial)
        self._errors: deque[BaseException] = deque()

    def fail(self, *errors: BaseException) -> None:
        self._errors.extend(errors)

    def heal(self) -> None:
        self._errors.clear()

    async def install(
        self, peer_id: str, identifier: str, chain_pem: str, key_pem: bytes, csr_der: bytes | None
    ) -> InstalledCertificate:
        if self._errors:
            raise self._errors.popleft()
        leaf = x509.load_pem_x509_certificates(chain_pem.encode())[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if san.get_values_for_type(x509.DNSName) != [identifier]:
            raise CertificateRejected(f"certificate names {san} instead of {identifier}")
        key = serialization.load_pem_private_key(key_pem, None)
        if key.public_key() != leaf.public_key():
            raise CertificateRejected("certificate does not match the order's key")
        serial = f"{leaf.serial_number:x}"
        if (peer_id, serial) not in self.installed:
            self.installed.append((peer_id, serial))
        return InstalledCertificate(
            chain_pem=chain_pem,
            serial=serial,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            fingerprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        )
