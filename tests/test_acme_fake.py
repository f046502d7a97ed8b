"""AcmeClient against FakeAcmeServer, for the Let's Encrypt behaviours Pebble 2.4.0 lacks: ARI,
profiles, Retry-After on pending and processing resources, order reuse, ``replaces``, 429/503
with Retry-After and injected badNonce. Time is a fake clock shared by server and client."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from autotls.acme import (
    AccountDoesNotExist,
    AcmeClient,
    AcmeInputError,
    AcmeNetworkError,
    AlreadyReplaced,
    BadNonce,
    CertificateChain,
    InvalidProfile,
    Malformed,
    Order,
    RateLimited,
    Unauthorized,
    cert_id,
    dns01_value,
    generate_account_key,
    generate_certificate_key,
    make_csr,
)
from autotls.acme.client import DEFAULT_BAD_NONCE_RETRIES
from autotls.acme.jws import AccountKey
from autotls.fsm.errors import ErrorClass
from autotls.http import Exchange
from tests.fakes.acme_server import FakeAcmeServer
from tests.fixtures.acme import settled_authorization, settled_order

B36 = "k51qzi5uqu5dgy8qsq67hbz73jqkw87l3fgf4a91qb0d9b5173tir7n4vxk1oe"
WILDCARD = f"*.{B36}.libp2p.direct"
START = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    """One clock for server and client."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def ca(clock: FakeClock) -> AsyncIterator[FakeAcmeServer]:
    async with FakeAcmeServer(now=clock) as server:
        yield server


@pytest.fixture
async def client(ca: FakeAcmeServer, clock: FakeClock) -> AsyncIterator[AcmeClient]:
    async with AcmeClient(ca.directory_url, generate_account_key(), now=clock) as acme:
        await acme.new_account()
        yield acme


async def validate(client: AcmeClient, order: Order) -> None:
    for url in order.authorizations:
        authz = await client.get_authorization(url)
        if authz.status == "pending":
            await client.answer_challenge(authz.challenge("dns-01").url)
            assert (await settled_authorization(client, url)).status == "valid"


async def issue(client: AcmeClient, order: Order) -> CertificateChain:
    await validate(client, order)
    key = generate_certificate_key()
    csr = make_csr(key, [i.value for i in order.identifiers])
    await client.finalize(order.url, order.finalize, csr)
    order = await settled_order(client, order.url)
    assert order.status == "valid" and order.certificate is not None
    chain = await client.download_certificate(order.certificate)
    assert chain.leaf.public_key() == key.public_key()
    return chain


def verify_chain(chain: CertificateChain, root_pem: str) -> None:
    certs = [*chain.certificates(), x509.load_pem_x509_certificate(root_pem.encode())]
    for child, parent in itertools.pairwise(certs):
        child.verify_directly_issued_by(parent)


async def test_full_issuance_with_a_profile(ca: FakeAcmeServer, client: AcmeClient) -> None:
    directory = await client.directory()
    assert set(directory.profiles) == {"classic", "tlsserver", "shortlived"}
    order = await client.new_order([WILDCARD], profile="shortlived")
    assert (order.status, order.profile) == ("pending", "shortlived")
    chain = await issue(client, order)
    verify_chain(chain, ca.root_pem)
    leaf = chain.leaf
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=160, minutes=1)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [WILDCARD]
    # Every fetch was POST-as-GET with an empty payload.
    assert all(p is None for e, p in ca.payloads if e in ("order", "authz", "certificate"))


async def test_the_default_profile_lifetime_follows_the_issuance_date(
    ca: FakeAcmeServer, client: AcmeClient, clock: FakeClock
) -> None:
    """Let's Encrypt's schedule for the default profile: 90 days, 64 from 2027-02-10, 45 from
    2028-02-16 (by the moment of issuance, not of the order)."""
    lifetimes = []
    for moment in ("2027-02-09T23:59:59", "2027-02-10T00:00:00", "2028-02-16T00:00:00"):
        clock.now = datetime.fromisoformat(moment).replace(tzinfo=UTC)
        leaf = (await issue(client, await client.new_order([WILDCARD]))).leaf
        lifetimes.append(leaf.not_valid_after_utc - leaf.not_valid_before_utc)
    assert lifetimes == [timedelta(days=d, minutes=1) for d in (90, 64, 45)]


async def test_a_shortlived_authorization_expires_after_an_hour_as_in_boulder(
    ca: FakeAcmeServer, client: AcmeClient, clock: FakeClock
) -> None:
    order = await client.new_order([WILDCARD], profile="shortlived")
    assert order.expires == START + timedelta(hours=8)
    authz = await client.get_authorization(order.authorizations[0])
    assert authz.expires == START + timedelta(hours=1)
    clock.now = START + timedelta(hours=1)
    # Boulder: an expired authorization is inaccessible (404), and its order invalid.
    with pytest.raises(Malformed) as caught:
        await client.get_authorization(authz.url)
    assert caught.value.status == 404
    with pytest.raises(Malformed):
        await client.answer_challenge(authz.challenge("dns-01").url)
    assert (await client.get_order(order.url)).status == "invalid"


async def test_gen_y_chains_are_linked_as_alternates(clock: FakeClock) -> None:
    async with (
        FakeAcmeServer(now=clock, chains="cross-signed") as ca,
        AcmeClient(ca.directory_url, generate_account_key(), now=clock) as acme,
    ):
        await acme.new_account()
        chain = await issue(acme, await acme.new_order([WILDCARD]))
    [alternate] = chain.alternates
    verify_chain(chain, ca.root_pem)  # leaf, issuer, the cross-sign -> the old root
    verify_chain(CertificateChain(url="", pem=alternate), ca.gen_y_root_pem)
    assert len(chain.certificates()) == 3
    assert len(CertificateChain(url="", pem=alternate).certificates()) == 2


async def test_every_request_reaches_the_observer_named_by_its_class(
    ca: FakeAcmeServer, clock: FakeClock
) -> None:
    seen: list[Exchange] = []
    async with AcmeClient(
        ca.directory_url, generate_account_key(), now=clock, observer=seen.append
    ) as acme:
        await acme.new_account()
        chain = await issue(acme, await acme.new_order([WILDCARD]))
        await acme.renewal_info(chain.leaf)
    # The fake CA's directory carries a Replay-Nonce, like Boulder's: no newNonce request.
    assert [e.request_class for e in seen] == [
        "directory",
        "newAccount",
        "newOrder",
        "authz",
        "challenge",
        "authz",
        "finalize",
        "order",
        "certificate",
        "renewalInfo",
    ]
    assert all(e.status is not None and 200 <= e.status < 300 for e in seen)
    assert acme.request_count == len(seen)


async def test_unknown_profile_is_invalid_profile(client: AcmeClient) -> None:
    with pytest.raises(InvalidProfile) as caught:
        await client.new_order([WILDCARD], profile="eternal")
    assert caught.value.error_class is ErrorClass.PERMANENT
    assert caught.value.status == 400


async def test_a_pending_authorization_carries_the_retry_after(
    ca: FakeAcmeServer, client: AcmeClient
) -> None:
    ca.authz_pending_polls = 2
    ca.authz_retry_after = "7"
    order = await client.new_order([WILDCARD])
    authz = await client.get_authorization(order.authorizations[0])
    await client.answer_challenge(authz.challenge("dns-01").url)
    pending = await client.get_authorization(authz.url)
    assert (pending.status, pending.retry_after) == ("pending", 7.0)
    valid = await settled_authorization(client, authz.url)
    assert (valid.status, valid.retry_after) == ("valid", None)
    assert ca.count("authz") == 4  # before the answer, two pending, then valid


async def test_an_http_date_retry_after_is_read_against_the_clock(
    ca: FakeAcmeServer, client: AcmeClient
) -> None:
    ca.authz_pending_polls = 1
    ca.authz_retry_after = "Sun, 01 Mar 2026 12:00:09 GMT"  # START + 9 s
    order = await client.new_order([WILDCARD])
    authz = await client.get_authorization(order.authorizations[0])
    await client.answer_challenge(authz.challenge("dns-01").url)
    assert (await client.get_authorization(authz.url)).retry_after == 9.0


async def test_a_processing_order_carries_the_retry_after(
    ca: FakeAcmeServer, client: AcmeClient
) -> None:
    ca.order_processing_polls = 3
    order = await client.new_order([WILDCARD])
    await validate(client, order)
    csr = make_csr(generate_certificate_key(), [WILDCARD])
    finalized = await client.finalize(order.url, order.finalize, csr)
    assert (finalized.url, finalized.status, finalized.retry_after) == (
        order.url,
        "processing",
        3.0,
    )
    processing = await client.get_order(order.url)
    assert (processing.status, processing.retry_after) == ("processing", 3.0)
    assert (await settled_order(client, order.url)).status == "valid"


async def test_failed_validation_makes_authorization_and_order_invalid(
    ca: FakeAcmeServer, client: AcmeClient
) -> None:
    checked: list[tuple[str, str]] = []

    async def wrong_txt(domain: str, expected: str) -> bool:
        checked.append((domain, expected))
        return False

    ca.validator = wrong_txt
    order = await client.new_order([WILDCARD])
    authz = await client.get_authorization(order.authorizations[0])
    await client.answer_challenge(authz.challenge("dns-01").url)
    invalid = await settled_authorization(client, authz.url)
    assert invalid.status == "invalid"
    problem = invalid.challenge("dns-01").problem()
    assert problem is not None and problem.kind == "unauthorized"
    failed = await client.get_order(order.url)
    assert failed.status == "invalid"
    assert checked == [
        (
            f"{B36}.libp2p.direct",
            dns01_value(authz.challenge("dns-01").token or "", client.account_key),
        )
    ]


async def test_order_reuse_returns_the_pending_order(client: AcmeClient) -> None:
    first = await client.new_order([WILDCARD])
    again = await client.new_order([WILDCARD])
    assert again.url == first.url
    other_profile = await client.new_order([WILDCARD], profile="tlsserver")
    assert other_profile.url != first.url


async def test_finalize_before_ready_refetches_the_order(
    ca: FakeAcmeServer, client: AcmeClient
) -> None:
    order = await client.new_order([WILDCARD])
    csr = make_csr(generate_certificate_key(), [WILDCARD])
    result = await client.finalize(order.url, order.finalize, csr)
    assert (result.url, result.status) == (order.url, "pending")
    assert ca.count("finalize") == 1 and ca.count("order") == 1


async def test_replaces(ca: FakeAcmeServer, client: AcmeClient, clock: FakeClock) -> None:
    old = await issue(client, await client.new_order([WILDCARD]))
    old_id = cert_id(old.leaf)
    renewal = await client.new_order([WILDCARD], replaces=old_id)
    assert renewal.replaces == old_id
    # The identical request again (a resumed engine replaying newOrder) is reused, not refused.
    assert (await client.new_order([WILDCARD], replaces=old_id)).url == renewal.url
    await issue(client, renewal)
    with pytest.raises(AlreadyReplaced) as caught:
        await client.new_order([WILDCARD], replaces=old_id)
    assert (caught.value.status, caught.value.error_class) == (409, ErrorClass.ORDER_INVALID)
    with pytest.raises(Malformed) as unknown:
        await client.new_order([WILDCARD], replaces="AAAA.AAAA")
    assert (unknown.value.status, unknown.value.error_class) == (404, ErrorClass.PERMANENT)


async def test_replaces_for_an_expired_certificate_is_404(
    ca: FakeAcmeServer, client: AcmeClient, clock: FakeClock
) -> None:
    chain = await issue(client, await client.new_order([WILDCARD]))
    clock.now = chain.leaf.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(Malformed) as caught:
        await client.new_order([WILDCARD], replaces=cert_id(chain.leaf))
    assert caught.value.status == 404


async def test_replaces_for_another_accounts_certificate(
    ca: FakeAcmeServer, client: AcmeClient, clock: FakeClock
) -> None:
    chain = await issue(client, await client.new_order([WILDCARD]))
    async with AcmeClient(ca.directory_url, generate_account_key(), now=clock) as other:
        await other.new_account()
        with pytest.raises(Unauthorized):
            await other.new_order([WILDCARD], replaces=cert_id(chain.leaf))


async def test_renewal_info(ca: FakeAcmeServer, client: AcmeClient) -> None:
    chain = await issue(client, await client.new_order([WILDCARD]))
    leaf = chain.leaf
    info = await client.renewal_info(leaf)
    assert info is not None
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert info.start == leaf.not_valid_before_utc + lifetime * 2 / 3
    assert leaf.not_valid_before_utc < info.start < info.end < leaf.not_valid_after_utc
    assert info.retry_after == 21600.0
    start, end = START + timedelta(days=1), START + timedelta(days=2)
    ca.set_renewal_window(
        cert_id(leaf), start, end, retry_after="3600", explanation_url="https://ca.test/why"
    )
    info = await client.renewal_info(leaf)
    assert info is not None
    assert (info.start, info.end, info.retry_after, info.explanation_url) == (
        start,
        end,
        3600.0,
        "https://ca.test/why",
    )
    assert ca.count("renewalInfo") == 2


async def test_directory_and_ari_need_no_account_key(
    ca: FakeAcmeServer, client: AcmeClient, clock: FakeClock
) -> None:
    chain = await issue(client, await client.new_order([WILDCARD]))
    async with AcmeClient(ca.directory_url, now=clock) as keyless:
        assert (await keyless.directory()).renewal_info is not None
        info = await keyless.renewal_info(chain.leaf)
        assert info is not None and info.retry_after == 21600.0
        with pytest.raises(AcmeInputError, match="no account key"):
            await keyless.new_order([WILDCARD])
        with pytest.raises(AcmeInputError, match="no account key"):
            _ = keyless.account_key
        assert keyless.request_count == 2  # the directory and renewalInfo: no nonce, no JWS


async def test_revoked_certificate_window_is_in_the_past(
    ca: FakeAcmeServer, client: AcmeClient, clock: FakeClock
) -> None:
    chain = await issue(client, await client.new_order([WILDCARD]))
    leaf = chain.leaf
    await client.revoke_certificate(leaf.public_bytes(serialization.Encoding.DER), reason=4)
    info = await client.renewal_info(leaf)
    assert info is not None and info.end < clock.now


async def test_renewal_info_for_an_unknown_certificate(
    ca: FakeAcmeServer, client: AcmeClient
) -> None:
    other_ca = FakeAcmeServer()
    async with other_ca, AcmeClient(other_ca.directory_url, generate_account_key()) as elsewhere:
        await elsewhere.new_account()
        chain = await issue(elsewhere, await elsewhere.new_order([WILDCARD]))
    with pytest.raises(Malformed) as caught:
        await client.renewal_info(chain.leaf)
    assert caught.value.status == 404


async def test_no_ari_means_none(clock: FakeClock) -> None:
    ca = FakeAcmeServer(now=clock, ari=False)
    async with ca, AcmeClient(ca.directory_url, generate_account_key(), now=clock) as acme:
        await acme.new_account()
        chain = await issue(acme, await acme.new_order([WILDCARD]))
        requests_before = acme.request_count
        assert await acme.renewal_info(chain.leaf) is None
        assert acme.request_count == requests_before


async def test_rate_limited_with_retry_after(ca: FakeAcmeServer, client: AcmeClient) -> None:
    ca.rate_limit_next("newOrder", retry_after="3600")
    with pytest.raises(RateLimited) as caught:
        await client.new_order([WILDCARD])
    assert (caught.value.status, caught.value.retry_after) == (429, 3600.0)
    assert caught.value.error_class is ErrorClass.RATE_LIMITED
    assert caught.value.problem is not None and caught.value.problem["detail"]
    assert (await client.new_order([WILDCARD])).status == "pending"


async def test_service_unavailable_with_retry_after(ca: FakeAcmeServer, client: AcmeClient) -> None:
    order = await client.new_order([WILDCARD])
    ca.unavailable_next("order", retry_after="120")
    with pytest.raises(AcmeNetworkError) as caught:
        await client.get_order(order.url)
    assert (caught.value.status, caught.value.retry_after) == (503, 120.0)
    assert caught.value.error_class is ErrorClass.TRANSIENT
    ca.fail_next("order", status=503, problem_type="serverInternal", retry_after="30")
    with pytest.raises(Exception) as typed:
        await client.get_order(order.url)
    assert getattr(typed.value, "kind", None) == "serverInternal"
    assert typed.value.retry_after == 30.0  # type: ignore[attr-defined]


async def test_bad_nonce_injection_is_retried(ca: FakeAcmeServer, client: AcmeClient) -> None:
    ca.reject_nonces(3)
    posts_before = ca.count("newOrder")
    order = await client.new_order([WILDCARD])
    assert order.status == "pending"
    assert ca.count("newOrder") - posts_before == 4
    ca.reject_nonces(100)
    with pytest.raises(BadNonce) as caught:
        await client.get_order(order.url)
    assert caught.value.error_class is ErrorClass.TRANSIENT
    assert ca.count("order") == 1 + DEFAULT_BAD_NONCE_RETRIES


async def test_accounts(ca: FakeAcmeServer, clock: FakeClock) -> None:
    key = generate_account_key()
    async with AcmeClient(ca.directory_url, key, now=clock) as acme:
        with pytest.raises(AccountDoesNotExist) as missing:
            await acme.lookup_account()
        assert missing.value.error_class is ErrorClass.PERMANENT
        created = await acme.new_account(contact=["mailto:ops@example.test"])
        assert created.contact == ("mailto:ops@example.test",)
        again = await acme.new_account()
        assert again.url == created.url
    # A client that only has the key finds its account before the first kid request.
    async with AcmeClient(ca.directory_url, key, now=clock) as resumed:
        order = await resumed.new_order([WILDCARD])
        assert resumed.account_url == created.url
        assert order.status == "pending"
        deactivated = await resumed.deactivate_account()
        assert deactivated.status == "deactivated"
        with pytest.raises(Unauthorized):
            await resumed.get_order(order.url)


async def test_key_rollover(ca: FakeAcmeServer, client: AcmeClient, clock: FakeClock) -> None:
    old_key, new_key = client.account_key, generate_account_key()
    await client.rollover_key(new_key)
    assert client.account_key is new_key
    assert (await client.new_order([WILDCARD])).status == "pending"
    async with AcmeClient(ca.directory_url, old_key, now=clock) as stale:
        with pytest.raises(AccountDoesNotExist):
            await stale.lookup_account()


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "p384"])
async def test_ed25519_rsa_and_p384_accounts_issue(
    ca: FakeAcmeServer, clock: FakeClock, kind: str
) -> None:
    # Pebble and Let's Encrypt refuse EdDSA account keys; the fake verifies EdDSA, so an
    # existing Ed25519 account of another CA is shown to be fully usable here.
    key: AccountKey
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP384R1())
    async with AcmeClient(ca.directory_url, key, now=clock) as acme:
        await acme.new_account()
        chain = await issue(acme, await acme.new_order([WILDCARD]))
    verify_chain(chain, ca.root_pem)
