"""AcmeClient against real Pebble (PEBBLE_WFE_NONCEREJECT=20, so the badNonce path runs all the
time): registration and lookup, a *.<b36>.libp2p.direct wildcard through DNS-01 answered by
challtestsrv, alternate chains, revocation both ways, key rollover, EAB, a Pebble restart, and
finalize before the order is ready."""

from __future__ import annotations

import base64
import itertools
import secrets
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from autotls.acme import (
    AccountDoesNotExist,
    AcmeClient,
    AcmeNetworkError,
    AcmeProblem,
    AlreadyRevoked,
    BadPublicKey,
    CertificateChain,
    ExternalAccountBinding,
    ExternalAccountRequired,
    Order,
    Unauthorized,
    dns01_value,
    generate_account_key,
    generate_certificate_key,
    make_csr,
)
from autotls.acme.jws import AccountKey
from autotls.adapters import AcmeAdapter
from autotls.fsm.errors import ErrorClass
from autotls.localstack.pebble import PebbleOptions, PebbleStack
from tests.fixtures.acme import settled_authorization, settled_order
from tests.fixtures.pebble import PebbleFactory

pytestmark = pytest.mark.pebble

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def peer_label() -> str:
    """A fresh label shaped like an Ed25519 PeerID in base36 (62 chars, ``k51qzi5uqu5d``)."""
    return "k51qzi5uqu5d" + "".join(secrets.choice(_B36) for _ in range(50))


def wildcard() -> str:
    return f"*.{peer_label()}.libp2p.direct"


def acme_client(stack: PebbleStack, key: AccountKey | None = None, **kwargs: object) -> AcmeClient:
    return AcmeClient(
        stack.directory_url,
        key if key is not None else generate_account_key(),
        ca_file=stack.ca_file,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
async def client(pebble: PebbleStack) -> AsyncIterator[AcmeClient]:
    async with acme_client(pebble) as acme:
        await acme.new_account(contact=["mailto:ops@example.test"])
        yield acme


async def validate(stack: PebbleStack, client: AcmeClient, order: Order) -> None:
    for url in order.authorizations:
        authz = await client.get_authorization(url)
        if authz.status != "pending":
            continue
        challenge = authz.challenge("dns-01")
        assert challenge.token is not None
        fqdn = f"_acme-challenge.{authz.identifier.value}"
        await stack.set_txt(fqdn, dns01_value(challenge.token, client.account_key))
        try:
            await client.answer_challenge(challenge.url)
            assert (await settled_authorization(client, url)).status == "valid"
        finally:
            await stack.clear_txt(fqdn)


async def issue(
    stack: PebbleStack, client: AcmeClient, name: str
) -> tuple[CertificateChain, ec.EllipticCurvePrivateKey]:
    order = await client.new_order([name])
    await validate(stack, client, order)
    key = generate_certificate_key()
    await client.finalize(order.url, order.finalize, make_csr(key, [name]))
    order = await settled_order(client, order.url)
    assert order.status == "valid" and order.certificate is not None
    return await client.download_certificate(order.certificate), key


def chains_to(chain_pem: str, roots_pem: list[str]) -> bool:
    """Signature path from the leaf through every chain certificate to one of ``roots_pem``."""
    certs = CertificateChain(url="", pem=chain_pem).certificates()
    for child, parent in itertools.pairwise(certs):
        child.verify_directly_issued_by(parent)
    for root_pem in roots_pem:
        root = x509.load_pem_x509_certificate(root_pem.encode())
        try:
            certs[-1].verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


async def test_register_and_look_up_by_key(pebble: PebbleStack) -> None:
    key = generate_account_key()
    async with acme_client(pebble, key) as first:
        with pytest.raises(AccountDoesNotExist):
            await first.lookup_account()
        created = await first.new_account(contact=["mailto:ops@example.test"])
        assert created.status == "valid"
        assert created.contact == ("mailto:ops@example.test",)
        assert (await first.new_account()).url == created.url
    async with acme_client(pebble, key) as second:
        found = await second.lookup_account()
    assert found.url == created.url
    assert second.account_url == created.url


async def test_issue_a_libp2p_direct_wildcard(pebble: PebbleStack, client: AcmeClient) -> None:
    name = wildcard()
    assert len(name) == 78
    chain, key = await issue(pebble, client, name)
    leaf = chain.leaf
    assert dns_names(leaf) == [name]
    assert leaf.public_key() == key.public_key()
    assert chains_to(chain.pem, pebble.issuer_roots_pem())
    assert chain.alternates == ()


async def test_rsa_accounts_work_and_ed25519_is_refused_by_pebble(pebble: PebbleStack) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with acme_client(pebble, rsa_key) as acme:
        await acme.new_account()
        chain, _ = await issue(pebble, acme, wildcard())
        assert chains_to(chain.pem, pebble.issuer_roots_pem())
    # Pebble, like Boulder, accepts no EdDSA account keys: the refusal is typed and permanent.
    async with acme_client(pebble, ed25519.Ed25519PrivateKey.generate()) as acme:
        with pytest.raises(BadPublicKey) as caught:
            await acme.new_account()
    assert caught.value.error_class is ErrorClass.PERMANENT


async def test_finalize_before_ready_refetches_the_order(
    pebble: PebbleStack, client: AcmeClient
) -> None:
    name = wildcard()
    order = await client.new_order([name])
    result = await client.finalize(
        order.url, order.finalize, make_csr(generate_certificate_key(), [name])
    )
    assert (result.url, result.status) == (order.url, "pending")
    # The order is still usable: validate and finalize for real.
    await validate(pebble, client, result)
    finalized = await client.finalize(
        order.url, order.finalize, make_csr(generate_certificate_key(), [name])
    )
    assert finalized.status in ("processing", "valid")


async def test_revoke_with_the_account_key(pebble: PebbleStack, client: AcmeClient) -> None:
    chain, _ = await issue(pebble, client, wildcard())
    der = chain.leaf.public_bytes(serialization.Encoding.DER)
    assert pebble.certificate_status(chain.leaf.serial_number)["Status"] == "Valid"
    await client.revoke_certificate(der, reason=4)
    status = pebble.certificate_status(chain.leaf.serial_number)
    assert (status["Status"], status["Reason"]) == ("Revoked", 4)
    with pytest.raises(AlreadyRevoked):
        await client.revoke_certificate(der)


async def test_revoke_with_the_certificate_key(pebble: PebbleStack, client: AcmeClient) -> None:
    chain, cert_key = await issue(pebble, client, wildcard())
    # A client with no account at all: the certificate key alone authorises revocation.
    async with acme_client(pebble) as stranger:
        await stranger.revoke_certificate(
            chain.leaf.public_bytes(serialization.Encoding.DER), cert_key=cert_key
        )
        assert stranger.account_url is None
    assert pebble.certificate_status(chain.leaf.serial_number)["Status"] == "Revoked"


async def test_key_rollover_then_issue_with_the_new_key(
    pebble: PebbleStack, client: AcmeClient
) -> None:
    old_key, new_key = client.account_key, generate_account_key()
    account_url = client.account_url
    await client.rollover_key(new_key)
    assert client.account_key is new_key
    chain, _ = await issue(pebble, client, wildcard())
    assert chains_to(chain.pem, pebble.issuer_roots_pem())
    async with acme_client(pebble, new_key) as by_new_key:
        assert (await by_new_key.lookup_account()).url == account_url
    async with acme_client(pebble, old_key) as by_old_key:
        with pytest.raises(AccountDoesNotExist):
            await by_old_key.lookup_account()
    async with acme_client(pebble, old_key, account_url=account_url) as stale:
        with pytest.raises(AcmeProblem) as caught:
            await stale.new_order([wildcard()])
    assert caught.value.error_class is ErrorClass.PERMANENT


async def test_the_ca_file_is_required_to_talk_to_pebble(pebble: PebbleStack) -> None:
    # Without our CA file the default trust store (whatever SSL_CERT_FILE says) must refuse.
    async with AcmeClient(pebble.directory_url, generate_account_key()) as acme:
        with pytest.raises(AcmeNetworkError, match=r"[Cc]ertificate"):
            await acme.directory()


async def test_alternate_chains(pebble_factory: PebbleFactory) -> None:
    stack = pebble_factory(PebbleOptions(nonce_reject_percent=20, alternate_roots=1))
    async with acme_client(stack) as acme:
        await acme.new_account()
        chain, _ = await issue(stack, acme, wildcard())
    roots = stack.issuer_roots_pem()
    assert len(roots) == 2 and roots[0] != roots[1]
    assert len(chain.alternates) == 1
    alternate = CertificateChain(url="", pem=chain.alternates[0])
    assert alternate.leaf == chain.leaf
    assert chains_to(chain.pem, roots[:1]) and not chains_to(chain.pem, roots[1:])
    assert chains_to(chain.alternates[0], roots[1:]) and not chains_to(
        chain.alternates[0], roots[:1]
    )


async def test_a_preferred_chain_that_does_not_build_to_the_trust_roots_is_passed_over(
    pebble_factory: PebbleFactory,
) -> None:
    """--preferred-chain names the alternate's root; a store without that root (Let's
    Encrypt's Gen Y roots are not everywhere yet) gets the default chain, one with it gets the
    preferred chain, and no store at all leaves the preference alone."""
    stack = pebble_factory(PebbleOptions(nonce_reject_percent=20, alternate_roots=1))
    async with acme_client(stack) as acme:
        await acme.new_account()
        chain, _ = await issue(stack, acme, wildcard())
    roots = [x509.load_pem_x509_certificate(pem.encode()) for pem in stack.issuer_roots_pem()]
    [alternate] = chain.alternates
    top = CertificateChain(url="", pem=alternate).certificates()[-1]
    preferred = str(top.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)

    def choice(trusted: list[x509.Certificate]) -> str:
        adapter = AcmeAdapter(
            stack.directory_url,
            ca_file=stack.ca_file,
            preferred_chain=preferred,
            trust_roots=trusted,
        )
        return adapter.choose_chain(chain.pem, chain.alternates)

    assert choice(roots[:1]) == chain.pem
    assert choice(roots) == alternate
    assert choice([]) == alternate


async def test_external_account_binding(pebble_factory: PebbleFactory) -> None:
    hmac_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    stack = pebble_factory(PebbleOptions(nonce_reject_percent=20, eab_keys={"kid-1": hmac_key}))
    async with acme_client(stack) as acme:
        assert (await acme.directory()).external_account_required
        with pytest.raises(ExternalAccountRequired) as missing:
            await acme.new_account()
        assert missing.value.error_class is ErrorClass.PERMANENT
        wrong = ExternalAccountBinding(kid="kid-1", hmac_key=secrets.token_bytes(32))
        with pytest.raises(Unauthorized):
            await acme.new_account(eab=wrong)
        unknown = ExternalAccountBinding.from_base64url("kid-2", hmac_key)
        with pytest.raises(Unauthorized):
            await acme.new_account(eab=unknown)
        account = await acme.new_account(
            eab=ExternalAccountBinding.from_base64url("kid-1", hmac_key)
        )
        assert account.status == "valid"
        chain, _ = await issue(stack, acme, wildcard())
        assert chains_to(chain.pem, stack.issuer_roots_pem())


async def test_account_does_not_exist_after_pebble_restarts(pebble_factory: PebbleFactory) -> None:
    stack = pebble_factory(PebbleOptions(nonce_reject_percent=20, certificate_validity_s=3600))
    key = generate_account_key()
    async with acme_client(stack, key) as acme:
        before = await acme.new_account()
    stack.restart_pebble()
    # What a resumed engine holds: the key and the stored account URL (kid).
    async with acme_client(stack, key, account_url=before.url) as resumed:
        with pytest.raises(AccountDoesNotExist) as gone:
            await resumed.new_order([wildcard()])
        assert gone.value.error_class is ErrorClass.PERMANENT
        with pytest.raises(AccountDoesNotExist):
            await resumed.lookup_account()
        after = await resumed.new_account()
        assert resumed.account_url == after.url
        chain, _ = await issue(stack, resumed, wildcard())
    leaf = chain.leaf
    assert chains_to(chain.pem, stack.issuer_roots_pem())
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 3590 <= lifetime.total_seconds() <= 3601
