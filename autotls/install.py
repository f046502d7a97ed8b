"""Installing a certificate: verify it, write it, serve it.

Nothing the CA sends is served unverified. :func:`verify_chain` checks that

* the leaf names exactly ``*.<peer>.libp2p.direct`` (SAN only; the 78-character name cannot
  be a CN, and Pebble's CN is ignored),
* the leaf's key is the key we generated, and the one in our CSR,
* every certificate is issued by the next one, and -- when trust roots are configured
  (Let's Encrypt: the system bundle; the local stack: Pebble's roots) -- the chain builds to
  one of them under the Web PKI server policy,
* the dates are sane (already valid, allowing clock skew; not expired).

:class:`Installer` (the engine's installer port) then writes ``fullchain.pem`` (0644) and
``privkey.pem`` (0600), atomically, under ``<data_dir>/certs/<peer>/`` (a 0700 directory; one
that others may write is refused), and reloads every registered :class:`LiveTlsContext`. A
reload is ``load_cert_chain`` on the *same* ``ssl.SSLContext`` object: handshakes that start
afterwards serve the new certificate, so a renewal reaches running listeners without a
restart. The certificate and its key are always loaded as one pair, from memory, never as two
files another process could replace one at a time.

What goes wrong is classified for the engine (:mod:`autotls.fsm.errors`): a certificate that
fails verification is :class:`CertificateRejected` (permanent); a chain that does not build to
the configured roots is :class:`ChainUntrusted` (configuration: the order keeps the
certificate and waits for ``--trust-roots``); a write the filesystem refuses is a
``LocalIOError`` naming the path (local: retried).
"""

from __future__ import annotations

import itertools
import logging
import os
import ssl
import tempfile
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from autotls._files import directory_problem, make_private_dirs, write_atomic, write_secret
from autotls.fsm.clock import Clock, SystemClock
from autotls.fsm.errors import (
    CertificateUnusableError,
    ConfigurationError,
    LocalIOError,
    MisconfiguredError,
)
from autotls.fsm.ports import InstalledCertificate

log = logging.getLogger(__name__)

MAX_CLOCK_SKEW = timedelta(minutes=10)
FULLCHAIN = "fullchain.pem"
PRIVKEY = "privkey.pem"


class CertificateRejected(CertificateUnusableError):
    """The CA's certificate fails verification; it is not installed. Permanent on purpose:
    re-ordering on our own would burn Let's Encrypt's 5-per-week duplicate limit."""


TRUST_ROOTS_HINT = (
    "if the CA is a private or test CA, give its root certificates with --trust-roots FILE "
    "(AutoTLS(trust_roots=...)), then `autotls retry` or restart: the certificate is kept"
)


class ChainUntrusted(MisconfiguredError):
    """The chain is consistent but does not build to a configured trust root. The certificate
    is kept and the order waits: the usual cause is a private CA whose root was not given."""


class UnsafeCertificateDirectory(MisconfiguredError):
    """The certificate directory is writable by others (or another user's): nothing is
    written there until its mode is fixed."""


@dataclass(frozen=True)
class VerifiedChain:
    certificates: tuple[x509.Certificate, ...]
    chain_pem: str
    serial: str
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]


PEM_END = b"-----END CERTIFICATE-----"


def load_trust_roots(path: str | Path) -> list[x509.Certificate]:
    """The certificates of a PEM bundle, one by one: a root that ``cryptography`` objects to
    (system bundles carry a few with non-positive serials, deprecated and soon refused) is
    skipped with a log line instead of failing or warning about the whole bundle."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read trust roots {path}: {exc.strerror}") from None
    roots: list[x509.Certificate] = []
    blocks = [b + PEM_END for b in data.split(PEM_END) if b"-----BEGIN CERTIFICATE-----" in b]
    if not blocks:
        raise ConfigurationError(f"trust roots {path} is not a PEM certificate bundle")
    for block in blocks:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            try:
                roots.append(x509.load_pem_x509_certificate(block))
            except (ValueError, CryptographyDeprecationWarning) as exc:
                log.debug("skipping a root in %s: %s", path, exc)
    if not roots:
        raise ConfigurationError(f"trust roots {path}: none of its certificates is usable")
    return roots


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_chain(
    chain_pem: str,
    *,
    identifier: str,
    key_pem: bytes,
    csr_der: bytes | None,
    now: datetime,
    trust_roots: Sequence[x509.Certificate] = (),
) -> VerifiedChain:
    try:
        certs = x509.load_pem_x509_certificates(chain_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise CertificateRejected("the downloaded chain is not PEM certificates") from None
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateRejected("the certificate has no subjectAltName") from None
    names = san.get_values_for_type(x509.DNSName)
    others = [n for n in san if not isinstance(n, x509.DNSName)]
    if names != [identifier] or others:
        raise CertificateRejected(f"the certificate names {names + others} instead of {identifier}")
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError):
        raise CertificateRejected("the order's certificate key is unreadable") from None
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise CertificateRejected("the certificate does not carry this order's key")
    if csr_der is not None:
        csr = x509.load_der_x509_csr(csr_der)
        if _public_der(csr.public_key()) != _public_der(leaf.public_key()):
            raise CertificateRejected("the certificate's key differs from the CSR's")
    for child, parent in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertificateRejected(
                f"chain broken: {_name(child)} is not issued by {_name(parent)} ({exc})"
            ) from None
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if not_after <= now:
        raise CertificateRejected(f"the certificate expired at {not_after.isoformat()}")
    if not_before > now + MAX_CLOCK_SKEW:
        raise CertificateRejected(f"the certificate is valid only from {not_before.isoformat()}")
    if not_after <= not_before:
        raise CertificateRejected("the certificate's validity period is empty")
    if trust_roots:
        _verify_path(certs, identifier, trust_roots, max(now, not_before))
    return VerifiedChain(
        certificates=tuple(certs),
        chain_pem="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs),
        serial=f"{leaf.serial_number:x}",
        not_before=not_before,
        not_after=not_after,
        fingerprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
    )


def _verify_path(
    certs: Sequence[x509.Certificate],
    identifier: str,
    roots: Sequence[x509.Certificate],
    at: datetime,
) -> None:
    probe = "probe." + identifier.removeprefix("*.")  # the wildcard must cover a real label
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(roots)))
        .time(at)
        .build_server_verifier(x509.DNSName(probe))
    )
    try:
        verifier.verify(certs[0], list(certs[1:]))
    except verification.VerificationError as exc:
        raise ChainUntrusted(
            f"the chain does not build to a trusted root ({exc}); {TRUST_ROOTS_HINT}"
        ) from None


def builds_to_roots(chain_pem: str, roots: Sequence[x509.Certificate], now: datetime) -> bool:
    """Whether ``chain_pem`` (leaf first) builds to one of ``roots`` under the Web PKI server
    policy: the installer's trust check, asked ahead of time to choose among a CA's chains."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem.encode("ascii"))
        san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, UnicodeEncodeError, x509.ExtensionNotFound):
        return False
    names = san.get_values_for_type(x509.DNSName)
    if not names:
        return False
    try:
        _verify_path(certs, names[0], roots, max(now, certs[0].not_valid_before_utc))
    except ChainUntrusted:
        return False
    return True


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def placeholder_certificate(identifier: str, *, now: datetime | None = None) -> tuple[str, bytes]:
    """A self-signed certificate for ``identifier``, so a TLS listener can start before the
    real one is issued (ssl contexts refuse handshakes without a certificate)."""
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "autotls placeholder")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identifier)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def load_pair(context: ssl.SSLContext, chain_pem: str, key_pem: bytes) -> None:
    """Load a certificate chain and its key into ``context`` as one unit.

    ``ssl`` loads only from files. Two files loaded by path let another process replace one
    between the two reads (OpenSSL then refuses the pair: KEY_VALUES_MISMATCH); here both go
    into one file only this process can see: an anonymous in-memory file where Linux offers
    one (``memfd_create``: the key never touches a disk), else a private temp file removed at
    once."""
    data = key_pem + b"\n" + chain_pem.encode("ascii")
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("autotls-pair", getattr(os, "MFD_CLOEXEC", 0))
        try:
            _write_all(fd, data)
            path = f"/proc/self/fd/{fd}"
            if os.path.exists(path):
                context.load_cert_chain(path)
                return
        finally:
            os.close(fd)
    fd, tmp = tempfile.mkstemp(prefix=".autotls-pair.", suffix=".pem")
    try:
        _write_all(fd, data)
        context.load_cert_chain(tmp)
    finally:
        os.close(fd)
        os.unlink(tmp)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LiveTlsContext:
    """An ``ssl.SSLContext`` that always serves the newest certificate of one peer."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context or server_context()
        self.serving: str | None = None  # fingerprint of what new handshakes get
        self.loaded = False

    def load_pem(self, chain_pem: str, key_pem: bytes, fingerprint: str | None = None) -> None:
        """Serve this chain and key from now on (loaded as one pair: :func:`load_pair`)."""
        load_pair(self.context, chain_pem, key_pem)
        self.serving = fingerprint
        self.loaded = True

    def load(self, certfile: Path, keyfile: Path, fingerprint: str | None = None) -> None:
        """Serve the chain and key in these files (read, then loaded as one pair)."""
        self.load_pem(certfile.read_text("ascii"), keyfile.read_bytes(), fingerprint)

    def load_placeholder(self, identifier: str, *, now: datetime | None = None) -> None:
        """Serve a self-signed certificate until the real one is installed (from memory:
        nothing is written, so no other process's placeholder can be mixed with ours),
        valid from ``now`` (the caller's clock)."""
        cert_pem, key_pem = placeholder_certificate(identifier, now=now)
        self.load_pem(cert_pem, key_pem, None)


InstallListener = Callable[[str, InstalledCertificate], Awaitable[None] | None]


class Installer:
    """The engine's installer port: verify, write, reload, notify."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        trust_roots: Sequence[x509.Certificate] = (),
        clock: Clock | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.trust_roots = list(trust_roots)
        self.clock = clock or SystemClock()
        self._contexts: dict[str, list[LiveTlsContext]] = {}
        self._listeners: list[InstallListener] = []

    def certificate_dir(self, peer_id: str) -> Path:
        return self.data_dir / "certs" / peer_id

    def paths(self, peer_id: str) -> tuple[Path, Path]:
        directory = self.certificate_dir(peer_id)
        return directory / FULLCHAIN, directory / PRIVKEY

    def unsafe_directory(self, peer_id: str) -> str | None:
        """Why the peer's certificate directory (or one above it that we own) is unsafe to
        write keys into, or None."""
        for directory in (self.data_dir, self.data_dir / "certs", self.certificate_dir(peer_id)):
            problem = directory_problem(directory)
            if problem is not None:
                return problem
        return None

    def serve(self, peer_id: str, context: LiveTlsContext, *, load_existing: bool = True) -> None:
        """Keep ``context`` loaded with the peer's newest certificate (now, from its files,
        if they exist and ``load_existing``)."""
        self._contexts.setdefault(peer_id, []).append(context)
        chain, key = self.paths(peer_id)
        if load_existing and chain.exists() and key.exists():
            try:
                context.load(chain, key)
            except (ssl.SSLError, OSError, ValueError) as exc:
                log.warning("stored certificate for %s not loadable yet: %s", peer_id, exc)

    def subscribe(self, listener: InstallListener) -> None:
        self._listeners.append(listener)

    async def install(
        self, peer_id: str, identifier: str, chain_pem: str, key_pem: bytes, csr_der: bytes | None
    ) -> InstalledCertificate:
        verified = verify_chain(
            chain_pem,
            identifier=identifier,
            key_pem=key_pem,
            csr_der=csr_der,
            now=self.clock.now(),
            trust_roots=self.trust_roots,
        )
        chain_path, key_path = self.paths(peer_id)
        try:
            unsafe = self.unsafe_directory(peer_id)
        except OSError as exc:
            raise LocalIOError.from_os_error(exc, "inspect", exc.filename) from None
        if unsafe is not None:
            raise UnsafeCertificateDirectory(f"not writing the certificate: {unsafe}")
        # Key first: a reader that sees the new chain must also find its key.
        for path, write, data in (
            (key_path, write_secret, key_pem),
            (chain_path, write_atomic, verified.chain_pem.encode()),
        ):
            try:
                make_private_dirs(path.parent)
                write(path, data)
            except OSError as exc:
                raise LocalIOError.from_os_error(exc, "write", path) from None
        for context in self._contexts.get(peer_id, []):
            context.load_pem(verified.chain_pem, key_pem, verified.fingerprint_sha256)
        installed = InstalledCertificate(
            chain_pem=verified.chain_pem,
            serial=verified.serial,
            not_before=verified.not_before,
            not_after=verified.not_after,
            fingerprint_sha256=verified.fingerprint_sha256,
            locations={"fullchain": str(chain_path), "privkey": str(key_path)},
        )
        log.info(
            "installed certificate %s for %s (valid until %s) at %s",
            verified.serial,
            identifier,
            verified.not_after.isoformat(),
            chain_path,
        )
        for listener in self._listeners:
            result = listener(peer_id, installed)
            if result is not None:
                await result
        return installed
