"""Installation: nothing unverified is served; files are private and atomic; a renewal reaches a
running TLS server without a restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from autotls import install as install_module
from autotls.acme import make_csr
from autotls.fsm.clock import ManualClock
from autotls.fsm.errors import ErrorClass
from autotls.install import (
    CertificateRejected,
    ChainUntrusted,
    Installer,
    LiveTlsContext,
    UnsafeCertificateDirectory,
    placeholder_certificate,
    verify_chain,
)

PEER = "k51qzi5uqu5dgy8qsq67hbz73jqkw87l3fgf4a91qb0d9b5173tir7n4vxk1oe"
NAME = f"*.{PEER}.libp2p.direct"
NOW = datetime.now(UTC).replace(microsecond=0)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca(name: str, signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None):  # type: ignore[no-untyped-def]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = signer if signer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


@dataclass
class Chain:
    root: x509.Certificate
    pem: str
    key_pem: bytes
    csr: bytes
    leaf: x509.Certificate


def issue(
    *,
    names: tuple[str, ...] = (NAME,),
    not_before: datetime = NOW - timedelta(minutes=1),
    lifetime: timedelta = timedelta(days=90),
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> Chain:
    root, root_key = ca or _ca("Test Root")
    inter, inter_key = _ca("Test Intermediate", (root, root_key))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(inter.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(inter_key.public_key()),
            critical=False,
        )
        .sign(inter_key, hashes.SHA256())
    )
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in (leaf, inter))
    return Chain(root, pem, _pem(key), make_csr(key, [NAME]), leaf)


def test_a_good_chain_verifies_against_its_root() -> None:
    chain = issue()
    verified = verify_chain(
        chain.pem,
        identifier=NAME,
        key_pem=chain.key_pem,
        csr_der=chain.csr,
        now=NOW,
        trust_roots=[chain.root],
    )
    assert verified.serial == f"{chain.leaf.serial_number:x}"
    assert verified.not_after == chain.leaf.not_valid_after_utc


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: issue(names=(f"*.other.{PEER}.libp2p.direct",)), "instead of"),
        (lambda: issue(names=(NAME, "evil.example")), "instead of"),
        (lambda: issue(not_before=NOW - timedelta(days=100)), "expired"),
        (lambda: issue(not_before=NOW + timedelta(days=1)), "valid only from"),
    ],
    ids=["wrong-name", "extra-name", "expired", "not-yet-valid"],
)
def test_rejections_name_the_problem(make, message: str) -> None:  # type: ignore[no-untyped-def]
    chain = make()
    with pytest.raises(CertificateRejected, match=message):
        verify_chain(chain.pem, identifier=NAME, key_pem=chain.key_pem, csr_der=None, now=NOW)


def test_rejects_a_certificate_for_another_key_or_csr() -> None:
    chain, other = issue(), issue()
    with pytest.raises(CertificateRejected, match="does not carry this order's key"):
        verify_chain(chain.pem, identifier=NAME, key_pem=other.key_pem, csr_der=None, now=NOW)
    with pytest.raises(CertificateRejected, match="differs from the CSR"):
        verify_chain(chain.pem, identifier=NAME, key_pem=chain.key_pem, csr_der=other.csr, now=NOW)


def test_rejects_a_broken_or_untrusted_chain_and_garbage() -> None:
    chain, other = issue(), issue()
    leaf_only = chain.pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    foreign_intermediate = other.pem.split("-----END CERTIFICATE-----")[1].lstrip() + (
        "-----END CERTIFICATE-----\n"
    )
    with pytest.raises(CertificateRejected, match="chain broken"):
        verify_chain(
            leaf_only + foreign_intermediate,
            identifier=NAME,
            key_pem=chain.key_pem,
            csr_der=None,
            now=NOW,
        )
    with pytest.raises(ChainUntrusted, match="does not build to a trusted root") as untrusted:
        verify_chain(
            chain.pem,
            identifier=NAME,
            key_pem=chain.key_pem,
            csr_der=None,
            now=NOW,
            trust_roots=[other.root],
        )
    # Not a verdict on the certificate: a setting the operator fixes, named in the message.
    assert untrusted.value.error_class is ErrorClass.CONFIGURATION
    assert "--trust-roots" in str(untrusted.value)
    with pytest.raises(CertificateRejected, match="not PEM"):
        verify_chain("garbage", identifier=NAME, key_pem=chain.key_pem, csr_der=None, now=NOW)


@pytest.fixture
async def tls_server() -> AsyncIterator[tuple[LiveTlsContext, int]]:
    live = LiveTlsContext()
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=live.context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield live, port


async def served_leaf(port: int, roots: list[x509.Certificate]) -> x509.Certificate:
    context = ssl.create_default_context(
        cadata="".join(r.public_bytes(serialization.Encoding.PEM).decode() for r in roots)
    )
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=f"1-2-3-4.{PEER}.libp2p.direct"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.transport.abort()
    return x509.load_der_x509_certificate(der)


async def test_install_writes_private_files_and_swaps_the_live_context(
    tmp_path: Path, tls_server: tuple[LiveTlsContext, int]
) -> None:
    live, port = tls_server
    ca = _ca("Test Root")
    first, second = issue(ca=ca), issue(ca=ca)
    installer = Installer(tmp_path, trust_roots=[ca[0]], clock=ManualClock(NOW))
    seen: list[str] = []
    installer.subscribe(lambda peer, cert: seen.append(cert.serial))
    installer.serve(PEER, live)
    await installer.install(PEER, NAME, first.pem, first.key_pem, first.csr)
    chain_path, key_path = installer.paths(PEER)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(chain_path.stat().st_mode) == 0o644
    assert (await served_leaf(port, [ca[0]])).serial_number == first.leaf.serial_number
    # The renewal reaches the running server: the same SSLContext object, no restart.
    installed = await installer.install(PEER, NAME, second.pem, second.key_pem, second.csr)
    assert (await served_leaf(port, [ca[0]])).serial_number == second.leaf.serial_number
    expected = hashlib.sha256(second.leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert installed.fingerprint_sha256 == expected == live.serving
    assert seen == [f"{first.leaf.serial_number:x}", installed.serial]
    assert not list(chain_path.parent.glob(".*.tmp")), "no temp files left behind"


async def test_a_rejected_certificate_changes_nothing(tmp_path: Path) -> None:
    ca = _ca("Test Root")
    good, bad = issue(ca=ca), issue(ca=ca, names=("*.wrong.libp2p.direct",))
    installer = Installer(tmp_path, trust_roots=[ca[0]], clock=ManualClock(NOW))
    await installer.install(PEER, NAME, good.pem, good.key_pem, good.csr)
    before = installer.paths(PEER)[0].read_text()
    with pytest.raises(CertificateRejected):
        await installer.install(PEER, NAME, bad.pem, bad.key_pem, bad.csr)
    assert installer.paths(PEER)[0].read_text() == before


async def test_placeholder_lets_a_listener_start_before_issuance(
    tmp_path: Path, tls_server: tuple[LiveTlsContext, int]
) -> None:
    live, port = tls_server
    live.load_placeholder(NAME)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _r, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.transport.abort()
    cert = x509.load_der_x509_certificate(der)
    assert cert.issuer == cert.subject, "self-signed placeholder"
    cert_pem, key_pem = placeholder_certificate(NAME)
    assert b"PRIVATE KEY" in key_pem and "CERTIFICATE" in cert_pem
    assert not any(os.scandir(tmp_path)), "the placeholder is served from memory"


async def test_every_directory_it_creates_is_0700_whatever_the_umask(tmp_path: Path) -> None:
    ca = _ca("Test Root")
    chain = issue(ca=ca)
    data = tmp_path / "a" / "data"
    installer = Installer(data, trust_roots=[ca[0]], clock=ManualClock(NOW))
    old = os.umask(0)  # the worst case: everything the process creates is 0777
    try:
        await installer.install(PEER, NAME, chain.pem, chain.key_pem, chain.csr)
    finally:
        os.umask(old)
    for directory in (tmp_path / "a", data, data / "certs", installer.certificate_dir(PEER)):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    _chain, key_path = installer.paths(PEER)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
async def test_a_certificate_directory_others_may_write_is_refused(
    tmp_path: Path, mode: int
) -> None:
    ca = _ca("Test Root")
    chain = issue(ca=ca)
    installer = Installer(tmp_path / "data", trust_roots=[ca[0]], clock=ManualClock(NOW))
    directory = installer.certificate_dir(PEER)
    directory.mkdir(parents=True)
    directory.chmod(mode)
    with pytest.raises(UnsafeCertificateDirectory) as info:
        await installer.install(PEER, NAME, chain.pem, chain.key_pem, chain.csr)
    assert info.value.error_class is ErrorClass.CONFIGURATION  # the order keeps its cert
    assert str(directory) in str(info.value) and "chmod go-w" in str(info.value)
    assert list(directory.iterdir()) == [], "nothing written into it"
    directory.chmod(0o700)
    await installer.install(PEER, NAME, chain.pem, chain.key_pem, chain.csr)


async def test_cert_and_key_are_loaded_as_one_pair_whatever_the_files_hold(
    tmp_path: Path, tls_server: tuple[LiveTlsContext, int]
) -> None:
    """Another process rewriting the files between our two reads cannot mismatch the pair:
    the installer loads what it verified, from memory."""
    live, port = tls_server
    ca = _ca("Test Root")
    first, second = issue(ca=ca), issue(ca=ca)
    installer = Installer(tmp_path, trust_roots=[ca[0]], clock=ManualClock(NOW))
    installer.serve(PEER, live)
    chain_path, key_path = installer.paths(PEER)
    real_write = install_module.write_atomic

    def write_then_swap_the_key(path: str | os.PathLike[str], data: bytes, **kw: int) -> None:
        real_write(path, data, **kw)
        key_path.write_bytes(second.key_pem)  # a concurrent writer, between key and chain

    with mock.patch.object(install_module, "write_atomic", write_then_swap_the_key):
        await installer.install(PEER, NAME, first.pem, first.key_pem, first.csr)
    assert (await served_leaf(port, [ca[0]])).serial_number == first.leaf.serial_number
    # Loading by path would now be refused: the files on disk no longer match.
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(chain_path, key_path)
