"""ACME Renewal Information (RFC 9773): the CertID that names a certificate in ``renewalInfo``
URLs and in a renewal order's ``replaces`` field.

CertID = base64url(AuthorityKeyIdentifier.keyIdentifier) "." base64url(serial), both unpadded,
the serial being the content octets of its DER INTEGER (so a serial whose top bit is set keeps
its leading zero byte).
"""

from __future__ import annotations

from cryptography import x509

from autotls.acme.jws import b64url
from autotls.acme.problems import AcmeInputError


def serial_der_content(serial: int) -> bytes:
    """The content octets of the DER INTEGER encoding of a (non-negative) serial number."""
    if serial < 0:
        raise AcmeInputError("certificate serial number is negative")
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big")


def cert_id(cert: x509.Certificate) -> str:
    """The RFC 9773 §4.1 CertID of ``cert``; AcmeInputError when it has no AKI keyIdentifier."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise AcmeInputError(
            "certificate has no Authority Key Identifier: it has no ARI CertID"
        ) from None
    if not aki.key_identifier:
        raise AcmeInputError("certificate's Authority Key Identifier has no keyIdentifier")
    return f"{b64url(aki.key_identifier)}.{b64url(serial_der_content(cert.serial_number))}"


def renewal_info_url(base: str, certificate_id: str) -> str:
    """``<renewalInfo>/<CertID>``: the directory URL may or may not end in a slash."""
    return f"{base.rstrip('/')}/{certificate_id}"
