"""Account keys and what is computed from them: JWK (RFC 7517/7518), the RFC 7638 thumbprint, the
key authorization and DNS-01 value (RFC 8555 §8.1, §8.4), and flattened JWS objects (RFC 7515)
for ACME requests, External Account Binding (§7.3.4) and key rollover (§7.3.5).

Pure functions only; nothing here does I/O. New accounts use ES256 (P-256). Existing accounts
with P-384/P-521 (ES384/ES512), RSA >= 2048 bits (RS256) or Ed25519 (EdDSA) keys load and sign.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from autotls.acme.problems import AcmeInputError, AcmeProtocolError

AccountKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# curve name -> (JWK crv, JWS alg, hash, coordinate bytes)
_EC_CURVES: Mapping[str, tuple[str, str, type[hashes.HashAlgorithm], int]] = {
    "secp256r1": ("P-256", "ES256", hashes.SHA256, 32),
    "secp384r1": ("P-384", "ES384", hashes.SHA384, 48),
    "secp521r1": ("P-521", "ES512", hashes.SHA512, 66),
}
_JWK_CURVES: Mapping[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
MIN_RSA_BITS = 2048
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict inverse of :func:`b64url`: padding and characters outside the URL alphabet are
    errors (lenient decoders accept two spellings of one value)."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError(f"not unpadded base64url: {text[:40]!r}")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError(f"not unpadded base64url: {text[:40]!r}") from exc


def _int_bytes(value: int, size: int | None = None) -> bytes:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(length, "big")


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# -- keys -----------------------------------------------------------------------------------


def generate_account_key() -> ec.EllipticCurvePrivateKey:
    """A new ES256 account key."""
    return ec.generate_private_key(ec.SECP256R1())


def check_account_key(key: object) -> AccountKey:
    """``key`` if it is a private key type ACME accounts can use here, else AcmeInputError."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _EC_CURVES:
            raise AcmeInputError(f"unsupported EC curve for an ACME account: {key.curve.name}")
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise AcmeInputError(
                f"RSA account key has {key.key_size} bits; at least {MIN_RSA_BITS} are required"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise AcmeInputError(f"unsupported ACME account key type: {type(key).__name__}")


def load_account_key(pem: bytes) -> AccountKey:
    """Read a PEM private key (PKCS#8, or the traditional EC/RSA forms); no passphrase."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AcmeInputError(
            f"account key is not an unencrypted PEM private key ({type(exc).__name__})"
        ) from None
    return check_account_key(key)


def dump_account_key(key: AccountKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the caller stores it with ``autotls._files.write_secret``."""
    return check_account_key(key).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public(key: AccountKey | PublicKey) -> PublicKey:
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return key.public_key()
    return key


def jws_algorithm(key: AccountKey | PublicKey) -> str:
    public = _public(key)
    if isinstance(public, ec.EllipticCurvePublicKey):
        try:
            return _EC_CURVES[public.curve.name][1]
        except KeyError:
            raise AcmeInputError(f"unsupported EC curve: {public.curve.name}") from None
    if isinstance(public, rsa.RSAPublicKey):
        return "RS256"
    return "EdDSA"


def public_jwk(key: AccountKey | PublicKey) -> dict[str, str]:
    """The public JWK with exactly the RFC 7638 required members."""
    public = _public(key)
    if isinstance(public, ec.EllipticCurvePublicKey):
        try:
            crv, _alg, _hash, size = _EC_CURVES[public.curve.name]
        except KeyError:
            raise AcmeInputError(f"unsupported EC curve: {public.curve.name}") from None
        numbers = public.public_numbers()
        return {
            "crv": crv,
            "kty": "EC",
            "x": b64url(_int_bytes(numbers.x, size)),
            "y": b64url(_int_bytes(numbers.y, size)),
        }
    if isinstance(public, rsa.RSAPublicKey):
        rsa_numbers = public.public_numbers()
        return {
            "e": b64url(_int_bytes(rsa_numbers.e)),
            "kty": "RSA",
            "n": b64url(_int_bytes(rsa_numbers.n)),
        }
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}


_REQUIRED_MEMBERS: Mapping[str, tuple[str, ...]] = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}


def jwk_thumbprint(key: AccountKey | PublicKey | Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url: the required members only, sorted, no spaces."""
    jwk = key if isinstance(key, Mapping) else public_jwk(key)
    kty = jwk.get("kty")
    members = _REQUIRED_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise AcmeInputError(f"JWK has an unsupported 'kty': {kty!r}")
    canonical: dict[str, str] = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise AcmeInputError(f"JWK ({kty}) lacks the string member {name!r}")
        canonical[name] = value
    digest = hashlib.sha256(json.dumps(canonical, separators=(",", ":"), sort_keys=True).encode())
    return b64url(digest.digest())


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """Parse a public JWK (EC P-256/384/521, RSA, Ed25519); AcmeInputError naming the problem."""
    try:
        kty = jwk["kty"]
        if kty == "EC":
            curve = _JWK_CURVES[jwk["crv"]]
            size = (curve.key_size + 7) // 8
            x, y = b64url_decode(jwk["x"]), b64url_decode(jwk["y"])
            if len(x) != size or len(y) != size:
                raise AcmeInputError("EC JWK coordinates have the wrong length")
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        if kty == "RSA":
            return rsa.RSAPublicNumbers(
                int.from_bytes(b64url_decode(jwk["e"]), "big"),
                int.from_bytes(b64url_decode(jwk["n"]), "big"),
            ).public_key()
        if kty == "OKP" and jwk.get("crv") == "Ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(jwk["x"]))
    except AcmeInputError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise AcmeInputError(f"malformed JWK: {type(exc).__name__}: {exc}") from None
    raise AcmeInputError(f"unsupported JWK kty/crv: {jwk.get('kty')!r}/{jwk.get('crv')!r}")


# -- challenge values -----------------------------------------------------------------------


def key_authorization(token: str, account_key: AccountKey | PublicKey) -> str:
    """``token || '.' || thumbprint`` (RFC 8555 §8.1)."""
    if not token or not _B64URL.fullmatch(token):
        raise AcmeProtocolError(f"challenge token is not base64url: {token[:40]!r}")
    return f"{token}.{jwk_thumbprint(account_key)}"


def dns01_value(token: str, account_key: AccountKey | PublicKey) -> str:
    """The TXT value for ``_acme-challenge.<domain>``: 43 characters (RFC 8555 §8.4)."""
    digest = hashlib.sha256(key_authorization(token, account_key).encode("ascii")).digest()
    return b64url(digest)


# -- signing --------------------------------------------------------------------------------


def sign_bytes(key: AccountKey, data: bytes) -> bytes:
    """The JWS signature of ``data`` for the key's algorithm (ECDSA as fixed-size r||s)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        try:
            _crv, _alg, hash_cls, size = _EC_CURVES[key.curve.name]
        except KeyError:
            raise AcmeInputError(f"unsupported EC curve: {key.curve.name}") from None
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hash_cls())))
        return _int_bytes(r, size) + _int_bytes(s, size)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data)


def verify_signature(public: PublicKey, alg: str, data: bytes, signature: bytes) -> bool:
    """Check a JWS signature; False (never an exception) when it does not verify."""
    try:
        if alg != jws_algorithm(public):
            return False
        if isinstance(public, ec.EllipticCurvePublicKey):
            _crv, _alg, hash_cls, size = _EC_CURVES[public.curve.name]
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            public.verify(der, data, ec.ECDSA(hash_cls()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            public.verify(signature, data)
    except (InvalidSignature, AcmeInputError, KeyError, ValueError):
        return False
    return True


def sign_jws(key: AccountKey, protected: Mapping[str, Any], payload: bytes) -> dict[str, str]:
    """Flattened JSON serialization (RFC 7515 §7.2.2). ``alg`` is filled in from the key."""
    header = dict(protected)
    header["alg"] = jws_algorithm(key)
    protected_b64 = b64url(json_bytes(header))
    payload_b64 = b64url(payload)
    signing_input = f"{protected_b64}.{payload_b64}".encode("ascii")
    return {
        "protected": protected_b64,
        "payload": payload_b64,
        "signature": b64url(sign_bytes(key, signing_input)),
    }


def acme_request(
    key: AccountKey,
    *,
    url: str,
    nonce: str,
    payload: Mapping[str, Any] | None,
    kid: str | None,
) -> dict[str, str]:
    """The JWS body of an ACME POST. ``payload=None`` is POST-as-GET (empty payload);
    ``kid=None`` embeds the public JWK (newAccount, revocation by certificate key)."""
    protected: dict[str, Any] = {"nonce": nonce, "url": url}
    if kid is None:
        protected["jwk"] = public_jwk(key)
    else:
        protected["kid"] = kid
    body = b"" if payload is None else json_bytes(payload)
    return sign_jws(key, protected, body)


@dataclass(frozen=True)
class VerifiedJws:
    protected: dict[str, Any]
    payload: bytes

    def json(self) -> Any:
        return json.loads(self.payload) if self.payload else None


def parse_jws(jws: Mapping[str, Any]) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """Split a flattened JWS into (protected header, payload, signing input, signature)."""
    try:
        protected_b64, payload_b64, signature_b64 = (
            jws["protected"],
            jws["payload"],
            jws["signature"],
        )
        if not all(isinstance(v, str) for v in (protected_b64, payload_b64, signature_b64)):
            raise TypeError("JWS members must be strings")
        header = json.loads(b64url_decode(protected_b64))
        if not isinstance(header, dict):
            raise TypeError("protected header is not an object")
        return (
            header,
            b64url_decode(payload_b64),
            f"{protected_b64}.{payload_b64}".encode("ascii"),
            b64url_decode(signature_b64),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AcmeInputError(f"malformed JWS: {exc}") from None


def verify_jws(jws: Mapping[str, Any], public: PublicKey) -> VerifiedJws:
    """Verify a flattened JWS against ``public``; AcmeInputError when it does not verify."""
    header, payload, signing_input, signature = parse_jws(jws)
    alg = header.get("alg")
    if not isinstance(alg, str) or not verify_signature(public, alg, signing_input, signature):
        raise AcmeInputError("JWS signature does not verify")
    return VerifiedJws(header, payload)


# -- External Account Binding and key change ------------------------------------------------


@dataclass(frozen=True)
class ExternalAccountBinding:
    """EAB credentials from the CA: a key identifier and an HMAC key (kept out of repr)."""

    kid: str
    hmac_key: bytes = field(repr=False)

    @classmethod
    def from_base64url(cls, kid: str, hmac_key_b64: str) -> ExternalAccountBinding:
        """CAs hand the HMAC key out base64url-encoded (padding tolerated here, as CAs differ)."""
        try:
            key = b64url_decode(hmac_key_b64.strip().rstrip("="))
        except ValueError:
            raise AcmeInputError(f"EAB HMAC key for {kid!r} is not base64url") from None
        if not kid or not key:
            raise AcmeInputError("EAB needs a non-empty key identifier and HMAC key")
        return cls(kid, key)


def external_account_binding(
    eab: ExternalAccountBinding, account_key: AccountKey, url: str
) -> dict[str, str]:
    """The ``externalAccountBinding`` member of a newAccount payload: an HS256 JWS over the
    account's public JWK, ``url`` being the newAccount URL (RFC 8555 §7.3.4)."""
    protected_b64 = b64url(json_bytes({"alg": "HS256", "kid": eab.kid, "url": url}))
    payload_b64 = b64url(json_bytes(public_jwk(account_key)))
    mac = hmac.new(eab.hmac_key, f"{protected_b64}.{payload_b64}".encode("ascii"), "sha256")
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64url(mac.digest())}


def key_change_inner(
    new_key: AccountKey, old_key: AccountKey, *, account_url: str, url: str
) -> dict[str, str]:
    """The inner JWS of a keyChange request: signed by the new key, embedding its JWK, naming
    the account and its old key (RFC 8555 §7.3.5). The outer JWS is a normal kid request."""
    payload = json_bytes({"account": account_url, "oldKey": public_jwk(old_key)})
    return sign_jws(new_key, {"jwk": public_jwk(new_key), "url": url}, payload)
