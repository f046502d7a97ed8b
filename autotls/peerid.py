"""libp2p identity keys and PeerIds, in pure Python on top of ``cryptography``.

This module owns the byte formats of protocol.md §2 and the peer-ids spec: the ``PublicKey`` /
``PrivateKey`` protobufs (hand-rolled: two fields, deterministic, minimal varints), the
identity-vs-sha2-256 multihash rule, base58btc PeerIds (``12D3KooW…``, ``Qm…``) and the base36
CIDv1 ``libp2p-key`` label (``k51qzi5uqu5d…``) used as the ``libp2p.direct`` DNS label. It does not
import py-libp2p or any multiformats package: the core library must work without them, and the
formats are small enough to own (and to test against the published vectors).

Signatures follow the peer-ids spec: Ed25519 pure, RSA PKCS#1 v1.5 with SHA-256, ECDSA and
secp256k1 over SHA-256 with DER-encoded signatures (secp256k1 signatures are normalised to low-S,
as the Bitcoin encoding expects).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from autotls._files import KeyFileError, exposed_to_others, read_key_file, write_secret
from autotls.fsm.errors import ConfigurationError

__all__ = [
    "KeyType",
    "PeerId",
    "PeerIdError",
    "PrivateKey",
    "PublicKey",
    "b36decode",
    "b36encode",
    "b58decode",
    "b58encode",
    "key_file_exposed",
    "load_private_key",
    "load_private_key_async",
    "save_private_key",
    "uvarint_decode",
    "uvarint_encode",
]

log = logging.getLogger(__name__)

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
# A serialised public key of at most this many bytes is inlined in the PeerId (identity
# multihash); longer ones are hashed with sha2-256.
MAX_INLINE_KEY_LENGTH = 42

MH_IDENTITY = 0x00
MH_SHA2_256 = 0x12
CID_V1 = 0x01
CODEC_LIBP2P_KEY = 0x72

_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_ECDSA_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class PeerIdError(ConfigurationError):
    """Malformed key bytes or files, unsupported key types, bad PeerId text."""


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
# Varints, base58btc, base36, base32: the multiformats pieces we need.


def uvarint_encode(value: int) -> bytes:
    """Unsigned LEB128 (multiformats unsigned-varint), minimal form."""
    if value < 0:
        raise ValueError("uvarint cannot encode a negative number")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def uvarint_decode(data: bytes, offset: int = 0) -> tuple[int, int]:
    """Decode one varint at ``offset``; returns ``(value, next_offset)``.

    Rejects truncated, over-long (more than 9 bytes, the multiformats limit) and non-minimal
    encodings, as go-varint does.
    """
    value = 0
    shift = 0
    start = offset
    while True:
        if offset >= len(data):
            raise PeerIdError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and offset - start > 1:
                raise PeerIdError("varint is not minimally encoded")
            return value, offset
        shift += 7
        if offset - start >= 9:
            raise PeerIdError("varint longer than 9 bytes")


_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}
_B36_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_B36_INDEX = {c: i for i, c in enumerate(_B36_ALPHABET)}


def _encode_base(data: bytes, alphabet: str) -> str:
    base = len(alphabet)
    zeros = len(data) - len(data.lstrip(b"\x00"))
    number = int.from_bytes(data, "big")
    digits: list[str] = []
    while number:
        number, rem = divmod(number, base)
        digits.append(alphabet[rem])
    return alphabet[0] * zeros + "".join(reversed(digits))


def _decode_base(text: str, index: dict[str, int], name: str) -> bytes:
    base = len(index)
    zero = next(c for c, i in index.items() if i == 0)
    number = 0
    for pos, char in enumerate(text):
        digit = index.get(char)
        if digit is None:
            raise PeerIdError(f"invalid {name} character {char!r} at position {pos}")
        number = number * base + digit
    zeros = len(text) - len(text.lstrip(zero))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * zeros + body


def b58encode(data: bytes) -> str:
    """base58btc (Bitcoin alphabet), leading zero bytes as ``1``."""
    return _encode_base(data, _B58_ALPHABET)


def b58decode(text: str) -> bytes:
    return _decode_base(text, _B58_INDEX, "base58btc")


def b36encode(data: bytes) -> str:
    """base36 lowercase without the multibase prefix, leading zero bytes as ``0``."""
    return _encode_base(data, _B36_ALPHABET)


def b36decode(text: str) -> bytes:
    return _decode_base(text.lower(), _B36_INDEX, "base36")


def _b32decode(text: str) -> bytes:
    upper = text.upper()
    try:
        return base64.b32decode(upper + "=" * (-len(upper) % 8))
    except (binascii.Error, ValueError) as exc:
        raise PeerIdError(f"invalid base32 text: {exc}") from None


def _b16decode(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise PeerIdError(f"invalid base16 text: {exc}") from None


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
        if isinstance(key, ed25519.Ed25519PublicKey):
            return cls(KeyType.ED25519, key)
        if isinstance(key, rsa.RSAPublicKey):
            _check_rsa_size(key.key_size)
            return cls(KeyType.RSA, key)
        if isinstance(key, ec.EllipticCurvePublicKey):
            if isinstance(key.curve, ec.SECP256K1) and not secp256k1_as_ecdsa:
                return cls(KeyType.SECP256K1, key)
            _check_ecdsa_curve(key.curve)
            return cls(KeyType.ECDSA, key)
        raise PeerIdError(f"unsupported public key type {type(key).__name__}")

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
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return cls(KeyType.ED25519, key)
        if isinstance(key, rsa.RSAPrivateKey):
            _check_rsa_size(key.key_size)
            return cls(KeyType.RSA, key)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if isinstance(key.curve, ec.SECP256K1) and not secp256k1_as_ecdsa:
                return cls(KeyType.SECP256K1, key)
            _check_ecdsa_curve(key.curve)
            return cls(KeyType.ECDSA, key)
        raise PeerIdError(f"unsupported private key type {type(key).__name__}")

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


# ---------------------------------------------------------------------------------------------
# PeerId


def _parse_multihash(mh: bytes) -> tuple[int, bytes]:
    try:
        code, offset = uvarint_decode(mh)
        length, offset = uvarint_decode(mh, offset)
    except PeerIdError as exc:
        raise PeerIdError(f"malformed multihash: {exc.message}") from None
    digest = mh[offset:]
    if len(digest) != length:
        raise PeerIdError(
            f"malformed multihash: header says {length} digest bytes, found {len(digest)}"
        )
    if code == MH_SHA2_256:
        if length != 32:
            raise PeerIdError(f"sha2-256 multihash must carry 32 bytes, got {length}")
    elif code != MH_IDENTITY:
        raise PeerIdError(
            f"unsupported multihash code 0x{code:x} (PeerIds use identity 0x00 or sha2-256 0x12)"
        )
    return code, digest


class PeerId:
    """A libp2p PeerId: a multihash of the public key protobuf."""

    __slots__ = ("_public_key", "multihash")

    multihash: bytes
    _public_key: PublicKey | None

    def __init__(self, multihash: bytes) -> None:
        code, digest = _parse_multihash(bytes(multihash))
        public: PublicKey | None = None
        if code == MH_IDENTITY:
            try:
                public = PublicKey.from_proto(digest)
            except PeerIdError as exc:
                raise PeerIdError(
                    f"identity PeerId does not hold a valid public key: {exc.message}"
                ) from None
        object.__setattr__(self, "multihash", bytes(multihash))
        object.__setattr__(self, "_public_key", public)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PeerId is immutable")

    @classmethod
    def from_multihash(cls, mh: bytes) -> PeerId:
        return cls(mh)

    @classmethod
    def from_public_key(cls, key: PublicKey) -> PeerId:
        proto = key.to_proto()
        if len(proto) <= MAX_INLINE_KEY_LENGTH:
            mh = bytes([MH_IDENTITY]) + uvarint_encode(len(proto)) + proto
        else:
            mh = bytes([MH_SHA2_256, 32]) + hashlib.sha256(proto).digest()
        return cls(mh)

    @classmethod
    def from_public_key_proto(cls, data: bytes) -> PeerId:
        return cls.from_public_key(PublicKey.from_proto(data))

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse ``12D3KooW…`` / ``Qm…`` (bare base58btc multihash) or a CIDv1 ``libp2p-key``
        in multibase (``k…`` base36 as used by libp2p.direct, ``b…`` base32, ``z…`` base58btc,
        ``f…`` base16)."""
        if not isinstance(text, str):
            raise PeerIdError(f"PeerId text must be a string, not {type(text).__name__}")
        text = text.strip()
        if not text:
            raise PeerIdError("empty PeerId")
        if text.startswith(("1", "Qm")):
            try:
                return cls(b58decode(text))
            except PeerIdError as exc:
                raise PeerIdError(f"invalid PeerId {text!r}: {exc.message}") from None
        prefix, body = text[0], text[1:]
        decoders = {
            "k": b36decode,
            "K": b36decode,
            "b": _b32decode,
            "B": _b32decode,
            "z": b58decode,
            "f": _b16decode,
            "F": _b16decode,
        }
        decoder = decoders.get(prefix)
        if decoder is None:
            raise PeerIdError(
                f"invalid PeerId {text!r}: neither base58btc (1…, Qm…) nor a multibase CID "
                "(k… base36, b… base32, z… base58btc, f… base16)"
            )
        if not body:
            raise PeerIdError(f"invalid PeerId {text!r}: empty CID")
        try:
            return cls._from_cid(decoder(body))
        except PeerIdError as exc:
            raise PeerIdError(f"invalid PeerId {text!r}: {exc.message}") from None

    @classmethod
    def _from_cid(cls, cid: bytes) -> PeerId:
        version, offset = uvarint_decode(cid)
        if version != CID_V1:
            raise PeerIdError(f"CID version {version} is not 1")
        codec, offset = uvarint_decode(cid, offset)
        if codec != CODEC_LIBP2P_KEY:
            raise PeerIdError(f"CID codec 0x{codec:x} is not libp2p-key (0x{CODEC_LIBP2P_KEY:x})")
        return cls(cid[offset:])

    def to_base58(self) -> str:
        return b58encode(self.multihash)

    def to_cid_bytes(self) -> bytes:
        return bytes([CID_V1, CODEC_LIBP2P_KEY]) + self.multihash

    def to_base36(self) -> str:
        """The multibase base36 CIDv1 label used under ``libp2p.direct``."""
        return "k" + b36encode(self.to_cid_bytes())

    def public_key(self) -> PublicKey | None:
        """The public key, when inlined (identity multihash); ``None`` for sha2-256 ids."""
        return self._public_key

    def matches(self, key: PublicKey) -> bool:
        return PeerId.from_public_key(key) == self

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeerId):
            return NotImplemented
        return self.multihash == other.multihash

    def __hash__(self) -> int:
        return hash(self.multihash)
