"""libp2p identity keys: the ``PublicKey`` / ``PrivateKey`` protobufs of the peer-ids spec
(hand-rolled: two fields, deterministic, minimal varints), signatures, and identity key files.

Signatures follow the peer-ids spec: Ed25519 pure, RSA PKCS#1 v1.5 with SHA-256, ECDSA and
secp256k1 over SHA-256 with DER-encoded signatures (secp256k1 signatures are normalised to low-S,
as the Bitcoin encoding expects). A key's PeerId is in :mod:`autotls.peerid`.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from autotls._files import KeyFileError, exposed_to_others, read_key_file, write_secret
from autotls.multiformats import PeerIdError, uvarint_decode, uvarint_encode

if TYPE_CHECKING:
    from autotls.peerid import PeerId

log = logging.getLogger("autotls.peerid")

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192

_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_ECDSA_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class KeyType(enum.IntEnum):
    RSA = 0
    ED25519 = 1
    SECP256K1 = 2
    ECDSA = 3


_CryptoPublic: TypeAlias = rsa.RSAPublicKey | ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
_CryptoPrivate: TypeAlias = (
    rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
)


# ---------------------------------------------------------------------------------------------
# The two-field key protobuf (proto2: 1 = KeyType varint, 2 = Data bytes).


def _encode_key_proto(key_type: int, data: bytes) -> bytes:
    return b"\x08" + uvarint_encode(key_type) + b"\x12" + uvarint_encode(len(data)) + data


def _decode_key_proto(data: bytes, what: str) -> tuple[KeyType, bytes]:
    if not data:
        raise PeerIdError(f"{what} protobuf is empty")

    def varint(at: int) -> tuple[int, int]:
        try:
            return uvarint_decode(data, at)
        except PeerIdError as exc:
            raise PeerIdError(f"{what} protobuf is malformed: {exc.message}") from None

    fields: dict[int, int | bytes] = {}
    offset = 0
    while offset < len(data):
        tag, offset = varint(offset)
        field, wire = tag >> 3, tag & 7
        if field in fields:
            raise PeerIdError(f"{what} protobuf repeats field {field}")
        if field == 1 and wire == 0:
            fields[1], offset = varint(offset)
        elif field == 2 and wire == 2:
            length, offset = varint(offset)
            if offset + length > len(data):
                raise PeerIdError(
                    f"{what} protobuf is truncated: field 2 says {length} bytes, "
                    f"{len(data) - offset} left"
                )
            fields[2] = data[offset : offset + length]
            offset += length
        else:
            raise PeerIdError(
                f"{what} protobuf has an unexpected field {field} (wire type {wire}); "
                "expected only 1 = KeyType and 2 = Data"
            )
    if 1 not in fields or 2 not in fields:
        missing = "KeyType (field 1)" if 1 not in fields else "Data (field 2)"
        raise PeerIdError(f"{what} protobuf lacks {missing}")
    raw_type = fields[1]
    assert isinstance(raw_type, int)
    try:
        key_type = KeyType(raw_type)
    except ValueError:
        raise PeerIdError(
            f"{what} protobuf has unknown key type {raw_type} "
            "(known: 0 RSA, 1 Ed25519, 2 Secp256k1, 3 ECDSA)"
        ) from None
    payload = fields[2]
    assert isinstance(payload, bytes)
    return key_type, payload


def _check_rsa_size(bits: int) -> None:
    if bits < RSA_MIN_BITS:
        raise PeerIdError(f"RSA key of {bits} bits is too small (minimum {RSA_MIN_BITS})")
    if bits > RSA_MAX_BITS:
        raise PeerIdError(f"RSA key of {bits} bits is too large (maximum {RSA_MAX_BITS})")


def _check_ecdsa_curve(curve: ec.EllipticCurve) -> None:
    if not isinstance(curve, _ECDSA_CURVES):
        raise PeerIdError(f"unsupported ECDSA curve {curve.name} (supported: P-256, P-384, P-521)")


def _key_type(
    key: _CryptoPublic | _CryptoPrivate, half: str, secp256k1_as_ecdsa: bool
) -> KeyType:
    """The libp2p key type of a ``cryptography`` key (its class and curve), checked."""
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return KeyType.ED25519
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        _check_rsa_size(key.key_size)
        return KeyType.RSA
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256K1) and not secp256k1_as_ecdsa:
            return KeyType.SECP256K1
        _check_ecdsa_curve(key.curve)
        return KeyType.ECDSA
    raise PeerIdError(f"unsupported {half} key type {type(key).__name__}")


def _low_s(signature: bytes) -> bytes:
    r, s = decode_dss_signature(signature)
    if s > _SECP256K1_ORDER // 2:
        s = _SECP256K1_ORDER - s
    return encode_dss_signature(r, s)


# ---------------------------------------------------------------------------------------------
# Keys


class PublicKey:
    """A libp2p public key. Immutable; equal when the serialised protobufs are equal."""

    __slots__ = ("_key", "_proto", "key_type")

    key_type: KeyType
    _key: _CryptoPublic
    _proto: bytes

    def __init__(self, key_type: KeyType, key: _CryptoPublic) -> None:
        object.__setattr__(self, "key_type", KeyType(key_type))
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_proto", _encode_key_proto(key_type, self._data()))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PublicKey is immutable")

    @classmethod
    def from_cryptography(
        cls, key: _CryptoPublic, *, secp256k1_as_ecdsa: bool = False
    ) -> PublicKey:
        """Wrap a ``cryptography`` public key; the key type follows from the class and curve."""
        return cls(_key_type(key, "public", secp256k1_as_ecdsa), key)

    @classmethod
    def from_proto(cls, data: bytes) -> PublicKey:
        key_type, payload = _decode_key_proto(bytes(data), "public key")
        return cls._from_data(key_type, payload)

    @classmethod
    def _from_data(cls, key_type: KeyType, payload: bytes) -> PublicKey:
        try:
            if key_type is KeyType.ED25519:
                if len(payload) != 32:
                    raise PeerIdError(f"Ed25519 public key must be 32 bytes, got {len(payload)}")
                return cls(key_type, ed25519.Ed25519PublicKey.from_public_bytes(payload))
            if key_type is KeyType.SECP256K1:
                if len(payload) not in (33, 65):
                    raise PeerIdError(
                        "secp256k1 public key must be 33 (compressed) or 65 bytes, "
                        f"got {len(payload)}"
                    )
                point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), payload)
                return cls(key_type, point)
            loaded = serialization.load_der_public_key(payload)
        except PeerIdError:
            raise
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise PeerIdError(f"invalid {key_type.name} public key bytes: {exc}") from None
        if key_type is KeyType.RSA:
            if not isinstance(loaded, rsa.RSAPublicKey):
                raise PeerIdError("RSA public key data is not an RSA SubjectPublicKeyInfo")
            _check_rsa_size(loaded.key_size)
            return cls(key_type, loaded)
        if not isinstance(loaded, ec.EllipticCurvePublicKey):
            raise PeerIdError("ECDSA public key data is not an EC SubjectPublicKeyInfo")
        _check_ecdsa_curve(loaded.curve)
        return cls(key_type, loaded)

    def _data(self) -> bytes:
        key = self._key
        if isinstance(key, ed25519.Ed25519PublicKey):
            return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if self.key_type is KeyType.SECP256K1:
            return key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            )
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def to_proto(self) -> bytes:
        return self._proto

    @property
    def raw(self) -> bytes:
        """The ``Data`` field: the key bytes without the protobuf wrapper."""
        return self._data()

    def to_cryptography(self) -> _CryptoPublic:
        return self._key

    @property
    def peer_id(self) -> PeerId:
        from autotls.peerid import PeerId

        return PeerId.from_public_key(self)

    def verify(self, signature: bytes, data: bytes) -> bool:
        key = self._key
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, data)
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            else:
                key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self._proto == other._proto

    def __hash__(self) -> int:
        return hash(self._proto)

    def __repr__(self) -> str:
        return f"PublicKey({self.key_type.name}, peer_id={self.peer_id})"


class PrivateKey:
    """A libp2p identity key. Its ``repr`` names the type and PeerId, never key material."""

    __slots__ = ("_key", "_public", "key_type")

    key_type: KeyType
    _key: _CryptoPrivate
    _public: PublicKey

    def __init__(self, key_type: KeyType, key: _CryptoPrivate) -> None:
        object.__setattr__(self, "key_type", KeyType(key_type))
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_public", PublicKey(self.key_type, key.public_key()))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PrivateKey is immutable")

    @classmethod
    def generate(cls, key_type: KeyType = KeyType.ED25519, *, bits: int = 2048) -> PrivateKey:
        key_type = KeyType(key_type)
        if key_type is KeyType.ED25519:
            return cls(key_type, ed25519.Ed25519PrivateKey.generate())
        if key_type is KeyType.RSA:
            _check_rsa_size(bits)
            return cls(key_type, rsa.generate_private_key(public_exponent=65537, key_size=bits))
        if key_type is KeyType.SECP256K1:
            return cls(key_type, ec.generate_private_key(ec.SECP256K1()))
        return cls(key_type, ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_cryptography(
        cls, key: _CryptoPrivate, *, secp256k1_as_ecdsa: bool = False
    ) -> PrivateKey:
        return cls(_key_type(key, "private", secp256k1_as_ecdsa), key)

    @classmethod
    def from_proto(cls, data: bytes) -> PrivateKey:
        key_type, payload = _decode_key_proto(bytes(data), "private key")
        try:
            if key_type is KeyType.ED25519:
                return cls._ed25519_from_data(payload)
            if key_type is KeyType.SECP256K1:
                if len(payload) != 32:
                    raise PeerIdError(
                        f"secp256k1 private key must be a 32-byte scalar, got {len(payload)} bytes"
                    )
                scalar = int.from_bytes(payload, "big")
                if not 0 < scalar < _SECP256K1_ORDER:
                    raise PeerIdError("secp256k1 private key scalar is out of range")
                return cls(key_type, ec.derive_private_key(scalar, ec.SECP256K1()))
            loaded = serialization.load_der_private_key(payload, password=None)
        except PeerIdError:
            raise
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise PeerIdError(f"invalid {key_type.name} private key bytes: {exc}") from None
        if key_type is KeyType.RSA:
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise PeerIdError("RSA private key data is not a PKCS#1 RSA key")
            _check_rsa_size(loaded.key_size)
            return cls(key_type, loaded)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise PeerIdError("ECDSA private key data is not a SEC1 EC key")
        _check_ecdsa_curve(loaded.curve)
        return cls(key_type, loaded)

    @classmethod
    def _ed25519_from_data(cls, payload: bytes) -> PrivateKey:
        if len(payload) not in (32, 64, 96):
            raise PeerIdError(f"Ed25519 private key must be 32, 64 or 96 bytes, got {len(payload)}")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(payload[:32])
        derived = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        for start in range(32, len(payload), 32):
            if not hmac.compare_digest(payload[start : start + 32], derived):
                raise PeerIdError(
                    "Ed25519 private key is inconsistent: its public half does not match the seed"
                )
        return cls(KeyType.ED25519, key)

    def to_proto(self, *, ed25519_seed_only: bool = False) -> bytes:
        """The libp2p ``PrivateKey`` protobuf as go-libp2p writes it (Ed25519: seed || public,
        64 bytes). ``ed25519_seed_only=True`` writes the 32-byte seed form that py-libp2p
        0.8.1's ``deserialize_private_key`` expects (it rejects the 64-byte form)."""
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            seed = key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            data = seed if ed25519_seed_only else seed + self._public.raw
        elif self.key_type is KeyType.SECP256K1:
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            data = key.private_numbers().private_value.to_bytes(32, "big")
        else:
            # RSA: PKCS#1 RSAPrivateKey; ECDSA: SEC1 ECPrivateKey (what Go's x509 writes).
            data = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        return _encode_key_proto(self.key_type, data)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes) -> PrivateKey:
        try:
            loaded = serialization.load_pem_private_key(bytes(data), password=None)
        except TypeError:
            raise PeerIdError("PEM private key is encrypted; supply an unencrypted key") from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise PeerIdError(f"invalid PEM private key: {exc}") from None
        if not isinstance(
            loaded, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
        ):
            raise PeerIdError(
                f"unsupported PEM private key type {type(loaded).__name__} "
                "(supported: RSA, Ed25519, secp256k1, ECDSA)"
            )
        return cls.from_cryptography(loaded)

    def to_cryptography(self) -> _CryptoPrivate:
        return self._key

    @property
    def public_key(self) -> PublicKey:
        return self._public

    @property
    def peer_id(self) -> PeerId:
        from autotls.peerid import PeerId

        return PeerId.from_public_key(self._public)

    def sign(self, data: bytes) -> bytes:
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
        if self.key_type is KeyType.SECP256K1:
            signature = _low_s(signature)
        return signature

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivateKey):
            return NotImplemented
        return hmac.compare_digest(self.to_proto(), other.to_proto())

    def __hash__(self) -> int:
        return hash(self._public)

    def __repr__(self) -> str:
        return f"PrivateKey({self.key_type.name}, peer_id={self.peer_id})"

    __str__ = __repr__


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read an identity key file: the libp2p ``PrivateKey`` protobuf or a PEM private key.

    Only a regular file of at most 16 KiB is read (:data:`autotls._files.MAX_KEY_FILE`): a
    FIFO, a device such as ``/dev/zero`` or ``/dev/urandom``, or anything larger is refused at
    once. A key file that group or others may read is loaded with a warning (the CLI refuses
    it; see :func:`key_file_exposed`). Errors name the file and the problem. Blocking: in
    async code use :func:`load_private_key_async`.
    """
    target = Path(path)
    try:
        data = read_key_file(target)
    except FileNotFoundError:
        raise PeerIdError(f"{target}: identity key file does not exist") from None
    except IsADirectoryError:
        raise PeerIdError(f"{target}: identity key path is a directory") from None
    except KeyFileError as exc:
        raise PeerIdError(f"identity key {exc}") from None
    except OSError as exc:
        raise PeerIdError(f"{target}: cannot read identity key file: {exc.strerror}") from None
    if not data.strip():
        raise PeerIdError(f"{target}: identity key file is empty")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = PrivateKey.from_pem(data)
        else:
            key = PrivateKey.from_proto(data)
    except PeerIdError as exc:
        raise PeerIdError(f"{target}: {exc.message}") from None
    if key_file_exposed(target):
        log.warning(
            "identity key %s is readable by group or others: run `chmod 600 %s`", target, target
        )
    return key


async def load_private_key_async(path: str | os.PathLike[str]) -> PrivateKey:
    """:func:`load_private_key` in a worker thread: the event loop (and its signal handlers)
    keep running while the file is read and parsed."""
    return await asyncio.to_thread(load_private_key, path)


def key_file_exposed(path: str | os.PathLike[str]) -> bool:
    """True when group or others may read the key file at ``path`` (it should be 0600, as
    :func:`save_private_key` writes it)."""
    try:
        return exposed_to_others(path)
    except OSError:
        return False


def save_private_key(
    key: PrivateKey,
    path: str | os.PathLike[str],
    *,
    format: Literal["protobuf", "pem"] = "protobuf",
) -> None:
    """Write the key atomically with mode 0600 (design rule 11)."""
    if format == "protobuf":
        data = key.to_proto()
    elif format == "pem":
        data = key.to_pem()
    else:
        raise ValueError(f"unknown key file format {format!r} (use 'protobuf' or 'pem')")
    write_secret(path, data)
