"""The outside world as the steps see it: narrow protocols and plain views.

Steps talk only to these ports, never to aiohttp, dnspython or SQLAlchemy, so the same
steps run against the real adapters (``autotls.adapters``), against fakes in unit tests,
and against recorded replays. Every port method raises :class:`autotls.fsm.errors.AutoTLSError`
subclasses for anything that goes wrong: ACME problems keep their RFC 8555 problem document
in ``error.problem`` for the journal, and what a step must branch on arrives as a typed port
error (:class:`~autotls.fsm.errors.AccountUnknownError`,
:class:`~autotls.fsm.errors.ReplacesRefusedError`), never as a string to compare.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from autotls.fsm.clock import Clock

# -- ACME -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcmeAccount:
    """The account a request is signed with. ``url`` is the kid (None before registration)."""

    key_pem: bytes = field(repr=False)
    url: str | None


@dataclass(frozen=True)
class RegisteredAccount:
    url: str
    status: str


@dataclass(frozen=True)
class ChallengeView:
    url: str
    type: str
    status: str
    token: str
    error: Mapping[str, object] | None = None


@dataclass(frozen=True)
class AuthorizationView:
    url: str
    status: str
    identifier: str
    wildcard: bool
    expires: datetime | None
    challenges: tuple[ChallengeView, ...]
    retry_after: float | None = None

    def challenge(self, kind: str) -> ChallengeView | None:
        return next((c for c in self.challenges if c.type == kind), None)


@dataclass(frozen=True)
class AcmeOrderView:
    url: str
    status: str
    expires: datetime | None
    authorizations: tuple[str, ...]
    finalize: str
    certificate: str | None = None
    error: Mapping[str, object] | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class ChainView:
    pem: str  # the chain the installer will serve (leaf first), preferred chain already chosen


@dataclass(frozen=True)
class RenewalWindow:
    start: datetime
    end: datetime
    retry_after: float | None = None
    explanation_url: str | None = None


class AcmePort(Protocol):
    directory_url: str

    async def supports_ari(self) -> bool: ...

    async def register_account(self, account: AcmeAccount) -> RegisteredAccount:
        """newAccount; for a key the CA already knows this returns that account (no second one)."""
        ...

    async def new_order(
        self, account: AcmeAccount, identifier: str, *, profile: str | None, replaces: str | None
    ) -> AcmeOrderView: ...

    async def get_order(self, account: AcmeAccount, url: str) -> AcmeOrderView: ...

    async def get_authorization(self, account: AcmeAccount, url: str) -> AuthorizationView: ...

    def dns01_value(self, account: AcmeAccount, token: str) -> str: ...

    async def answer_challenge(self, account: AcmeAccount, url: str) -> ChallengeView: ...

    async def finalize(
        self, account: AcmeAccount, order_url: str, finalize_url: str, csr_der: bytes
    ) -> AcmeOrderView:
        """Finalize; on 403 orderNotReady return the re-fetched order instead of raising."""
        ...

    async def download_certificate(self, account: AcmeAccount, url: str) -> ChainView: ...

    async def renewal_info(self, cert_pem: str) -> RenewalWindow | None: ...

    def cert_id(self, cert_pem: str) -> str | None: ...

    def generate_account_key(self) -> bytes: ...

    def generate_certificate_key(self) -> bytes: ...

    def make_csr(self, key_pem: bytes, names: Sequence[str]) -> bytes: ...


# -- broker and DNS -----------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerHealthView:
    healthy: bool
    wait_s: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class ReachabilityView:
    """What the broker could dial back now: the addresses a registration would send
    (``dialable``; empty when none qualifies), one line saying why these or why none
    (``detail``), and since when the node has been up (``online_since``, None when unknown:
    the registration delay counts from it)."""

    dialable: tuple[str, ...]
    detail: str
    online_since: datetime | None = None


class BrokerPort(Protocol):
    async def health(self) -> BrokerHealthView: ...

    async def reachability(self, peer_id: str) -> ReachabilityView:
        """The addresses of ``peer_id`` the broker could dial, read now (no registration)."""
        ...

    async def register(self, peer_id: str, value: str) -> Sequence[str]:
        """Send the DNS-01 value with the peer's public addresses; returns the addresses sent."""
        ...


@dataclass(frozen=True)
class TxtCheck:
    visible: bool  # every authoritative server answers exactly the expected value
    servers: Mapping[str, str]  # server -> "ok" | "missing" | "other: ..." | "error: ..."


class DnsPort(Protocol):
    async def check_txt(self, name: str, expected: str) -> TxtCheck: ...


# -- installation -----------------------------------------------------------------------


@dataclass(frozen=True)
class InstalledCertificate:
    chain_pem: str
    serial: str
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str
    locations: Mapping[str, str] = field(default_factory=dict)


class InstallerPort(Protocol):
    async def install(
        self, peer_id: str, identifier: str, chain_pem: str, key_pem: bytes, csr_der: bytes | None
    ) -> InstalledCertificate:
        """Verify (SAN, key matches key and CSR, chain, dates), write, and serve the cert.
        Idempotent: installing the same chain twice changes nothing the second time."""
        ...


# -- settings and the bundle ----------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    profile: str | None = None
    zone: str = "libp2p.direct"
    # Polls (TXT visibility, the order while the CA validates, the order while it is
    # processing) go at the CA's pace (autotls.fsm.schedule): a Retry-After is honoured up to
    # max_poll_interval; without one the first re-check comes first_poll_interval after the
    # wait began, and the interval doubles up to the poll's cap below (never more often than
    # the cap once there: polite to Let's Encrypt, near-instant on a fast CA).
    first_poll_interval: timedelta = timedelta(milliseconds=25)
    dns_poll_interval: timedelta = timedelta(seconds=5)  # cap of the TXT checks
    dns_deadline_cap: timedelta = timedelta(minutes=15)
    txt_resend_limit: int = 3
    authz_poll_interval: timedelta = timedelta(seconds=2)  # cap while the CA validates
    order_poll_interval: timedelta = timedelta(seconds=1)  # cap while processing (Boulder: 3 s)
    max_poll_interval: timedelta = timedelta(minutes=5)  # cap of any Retry-After
    # Let's Encrypt allows 5 failed authorizations per identifier per account per hour.
    validation_budget: int = 3
    validation_window: timedelta = timedelta(hours=1)
    transient_backoff_base: timedelta = timedelta(seconds=2)
    transient_backoff_cap: timedelta = timedelta(hours=1)
    # Let's Encrypt's retry guidance for failing issuance: 1 min, 10 min, 100 min, then daily.
    # Also the schedule of configuration and internal errors (autotls.fsm.policy).
    reorder_backoff: tuple[timedelta, ...] = (
        timedelta(minutes=1),
        timedelta(minutes=10),
        timedelta(minutes=100),
        timedelta(days=1),
    )
    rate_limit_default_wait: timedelta = timedelta(hours=1)
    # Kubo's AutoTLS.RegistrationDelay: no order before the node has been up this long
    # (since the broker port's ReachabilityView.online_since; none when it cannot tell).
    registration_delay: timedelta = timedelta(0)
    # How often a node with no address the broker could dial looks again (a local check).
    dialable_recheck: timedelta = timedelta(minutes=1)
    emergency_fraction: float = 0.1  # renew regardless of ARI with this much lifetime left
    ari_min_recheck: timedelta = timedelta(hours=1)
    ari_max_recheck: timedelta = timedelta(hours=24)


@dataclass
class Ports:
    acme: AcmePort
    broker: BrokerPort
    dns: DnsPort
    installer: InstallerPort
    clock: Clock
    settings: EngineSettings = field(default_factory=EngineSettings)
    rng: random.Random = field(default_factory=random.Random)
