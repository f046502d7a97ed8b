"""Certificate keys and the CSR we finalize with.

The subject is empty and the names travel only in the SAN extension: the 78-character AutoTLS
name ``*.<b36peerid>.libp2p.direct`` exceeds the 64-character limit of a CommonName, and CAs
(Let's Encrypt included) take the names from the SAN anyway.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from autotls.acme.problems import AcmeInputError

CertificateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def generate_certificate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key for one certificate (never reuse the account key)."""
    return ec.generate_private_key(ec.SECP256R1())


def check_dns_name(name: str) -> str:
    """Normalise and check one DNS identifier: lowercase, LDH labels, optional leading ``*.``."""
    if not isinstance(name, str):
        raise AcmeInputError(f"DNS name must be a string, got {type(name).__name__}")
    lowered = name.strip().lower().rstrip(".")
    labels = lowered.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if len(lowered) > 253 or len(labels) < 2:
        raise AcmeInputError(f"not a usable DNS name: {name[:80]!r}")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise AcmeInputError(f"DNS name {name[:80]!r} has an invalid label {label[:70]!r}")
    return lowered


def make_csr(key: CertificateKey, names: Sequence[str]) -> bytes:
    """A DER CSR with an empty subject and exactly ``names`` (in order, deduplicated) as SANs."""
    if isinstance(names, str):
        raise AcmeInputError("make_csr takes a sequence of names, not a single string")
    checked = list(dict.fromkeys(check_dns_name(n) for n in names))
    if not checked:
        raise AcmeInputError("a CSR needs at least one DNS name")
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in checked]), critical=False
        )
    )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        csr = builder.sign(key, None)
    elif isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        csr = builder.sign(key, hashes.SHA256())
    else:
        raise AcmeInputError(f"unsupported certificate key type: {type(key).__name__}")
    return csr.public_bytes(serialization.Encoding.DER)
