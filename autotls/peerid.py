"""libp2p PeerIds, in pure Python on top of ``cryptography``.

This module owns the byte formats of protocol.md §2 and the peer-ids spec for PeerIds: the
identity-vs-sha2-256 multihash rule, base58btc PeerIds (``12D3KooW…``, ``Qm…``) and the base36
CIDv1 ``libp2p-key`` label (``k51qzi5uqu5d…``) used as the ``libp2p.direct`` DNS label. Keys
and key files are in :mod:`autotls.keys`, varints and multibase texts in
:mod:`autotls.multiformats`; this module re-exports their public names. It does not import
py-libp2p or any multiformats package: the core library must work without them, and the
formats are small enough to own (and to test against the published vectors).
"""

from __future__ import annotations

import hashlib

from autotls.keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    key_file_exposed,
    load_private_key,
    load_private_key_async,
    save_private_key,
)
from autotls.multiformats import (
    PeerIdError,
    b16decode,
    b32decode,
    b36decode,
    b36encode,
    b58decode,
    b58encode,
    uvarint_decode,
    uvarint_encode,
)

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

# A serialised public key of at most this many bytes is inlined in the PeerId (identity
# multihash); longer ones are hashed with sha2-256.
MAX_INLINE_KEY_LENGTH = 42

MH_IDENTITY = 0x00
MH_SHA2_256 = 0x12
CID_V1 = 0x01
CODEC_LIBP2P_KEY = 0x72


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
            "b": b32decode,
            "B": b32decode,
            "z": b58decode,
            "f": b16decode,
            "F": b16decode,
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
