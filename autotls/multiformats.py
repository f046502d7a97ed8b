"""The multiformats pieces PeerIds and keys are made of: unsigned varints and the base58btc,
base36, base32 and base16 texts, in pure Python.

:class:`PeerIdError` is the one error of everything identity: key bytes and files, PeerId
text, and these encodings. Like the standard library's ``ipaddress`` errors it is a
``ValueError`` (a parse error), and an :class:`~autotls.fsm.errors.AutoTLSError` (a
configuration the operator fixes).
"""

from __future__ import annotations

import base64
import binascii

from autotls.fsm.errors import ConfigurationError

__all__ = [
    "PeerIdError",
    "b16decode",
    "b32decode",
    "b36decode",
    "b36encode",
    "b58decode",
    "b58encode",
    "uvarint_decode",
    "uvarint_encode",
]


class PeerIdError(ConfigurationError, ValueError):
    """Malformed key bytes or files, unsupported key types, bad PeerId text, or a malformed
    varint or multibase text they contain."""


def uvarint_encode(value: int) -> bytes:
    """Unsigned LEB128 (multiformats unsigned-varint), minimal form."""
    if value < 0:
        raise PeerIdError(f"uvarint cannot encode a negative number ({value})")
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


def b32decode(text: str) -> bytes:
    upper = text.upper()
    try:
        return base64.b32decode(upper + "=" * (-len(upper) % 8))
    except (binascii.Error, ValueError) as exc:
        raise PeerIdError(f"invalid base32 text: {exc}") from None


def b16decode(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise PeerIdError(f"invalid base16 text: {exc}") from None
