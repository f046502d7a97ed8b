"""The pure protocol of libp2p-PeerID auth (sans-I/O, tested with the spec's vectors): the
``libp2p-PeerID`` header's strict building and parsing, padded base64url, challenges, the
bytes each side signs, and the ``hostname`` the signatures bind."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping

from yarl import URL

from autotls.peerid import PeerIdError, PublicKey, uvarint_encode
from autotls.peeridauth.errors import HeaderError

__all__ = [
    "CHALLENGE_BYTES",
    "MAX_HEADER_SIZE",
    "MIN_CHALLENGE_CHARS",
    "SCHEME",
    "RandomBytes",
    "b64decode",
    "b64encode",
    "check_challenge",
    "client_sig_parts",
    "data_to_sign",
    "format_header",
    "new_challenge",
    "parse_header",
    "public_key_param",
    "request_hostname",
    "server_sig_parts",
]

SCHEME = "libp2p-PeerID"
MAX_HEADER_SIZE = 2048
CHALLENGE_BYTES = 32
# A challenge is signed as its text; peers refuse ones shorter than this many characters.
MIN_CHALLENGE_CHARS = 32

RandomBytes = Callable[[int], bytes]

_B64URL_PADDED = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'({_TCHARS})[ \t]*=[ \t]*"([^"\\]*)"')
_SCHEME_TOKEN = re.compile(rf"({_TCHARS})(?=$|[ \t,])")
_SEPARATORS = re.compile(r"[ \t,]*")
_BARE_TOKEN = re.compile(r"[^ \t,]+")
_VALUE_FORBIDDEN = re.compile(r'[\s",\\]')


def b64encode(data: bytes) -> str:
    """base64url WITH padding (the Go broker rejects unpadded values)."""
    return base64.urlsafe_b64encode(data).decode("ascii")


def b64decode(text: str | bytes, *, what: str = "value") -> bytes:
    """Strict padded base64url: URL-safe alphabet only, length a multiple of 4."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise HeaderError(f"{what} is not ASCII base64url") from None
    if len(text) % 4 or not _B64URL_PADDED.match(text):
        raise HeaderError(f"{what} is not padded base64url")
    try:
        return base64.urlsafe_b64decode(text)
    except (binascii.Error, ValueError):
        raise HeaderError(f"{what} is not padded base64url") from None


def new_challenge(random: RandomBytes = os.urandom) -> str:
    """32 random bytes as padded base64url (44 characters)."""
    return b64encode(random(CHALLENGE_BYTES))


def check_challenge(value: str, what: str) -> str:
    if len(value) < MIN_CHALLENGE_CHARS:
        raise HeaderError(f"{what} is too short ({len(value)} < {MIN_CHALLENGE_CHARS} characters)")
    return value


def _skip_separators(value: str, pos: int) -> int:
    match = _SEPARATORS.match(value, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def format_header(params: Mapping[str, str] | list[tuple[str, str]]) -> str:
    """``libp2p-PeerID k="v", k2="v2"`` in the given order; every value quoted.

    Values may not contain whitespace, quotes, commas or backslashes (Go's parser splits on
    spaces and commas), and the whole header must fit in :data:`MAX_HEADER_SIZE` bytes.
    """
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    parts = []
    for name, value in items:
        if not re.fullmatch(_TCHARS, name):
            raise HeaderError(f"invalid parameter name {name!r}")
        if _VALUE_FORBIDDEN.search(value):
            raise HeaderError(f"parameter {name!r} has a value that cannot be sent unescaped")
        parts.append(f'{name}="{value}"')
    header = f"{SCHEME} " + ", ".join(parts)
    if len(header.encode()) > MAX_HEADER_SIZE:
        raise HeaderError(f"header is {len(header.encode())} bytes (limit {MAX_HEADER_SIZE})")
    return header


def parse_header(value: str | None) -> dict[str, str] | None:
    """The params of the ``libp2p-PeerID`` challenge/credentials in a header value.

    Returns ``None`` when the header is absent or holds no ``libp2p-PeerID`` scheme (other
    schemes around it are skipped). Raises :class:`HeaderError` for an oversized header,
    malformed or unquoted params, and duplicate params.
    """
    if value is None:
        return None
    if len(value.encode("utf-8", "surrogateescape")) > MAX_HEADER_SIZE:
        raise HeaderError(f"header exceeds {MAX_HEADER_SIZE} bytes")
    ours: dict[str, str] | None = None
    pos = _skip_separators(value, 0)
    while pos < len(value):
        scheme = _SCHEME_TOKEN.match(value, pos)
        if scheme is None:
            raise HeaderError("malformed authentication header: expected an auth scheme")
        is_ours = scheme.group(1).lower() == SCHEME.lower()
        params: dict[str, str] = {}
        pos = _skip_separators(value, scheme.end())
        while pos < len(value):
            param = _PARAM.match(value, pos)
            if param is not None:
                name = param.group(1).lower()
                if is_ours and name in params:
                    raise HeaderError(f"duplicate {SCHEME} parameter {name!r}")
                params[name] = param.group(2)
                pos = _skip_separators(value, param.end())
                continue
            token = _BARE_TOKEN.match(value, pos)
            assert token is not None
            if "=" not in token.group():
                break  # the next scheme starts here
            if is_ours:
                raise HeaderError(
                    f'malformed {SCHEME} parameter at offset {pos}: expected name="value"'
                )
            pos = _skip_separators(value, token.end())  # another scheme's token68 / param
        if is_ours:
            if ours is not None:
                raise HeaderError(f"more than one {SCHEME} challenge in the header")
            ours = params
    return ours


def data_to_sign(parts: Mapping[str, bytes | str]) -> bytes:
    """``"libp2p-PeerID"`` then, for each part sorted by name,
    ``uvarint(len(k) + 1 + len(v)) || k || "=" || v`` (strings UTF-8, keys as raw bytes)."""
    out = bytearray(SCHEME.encode())
    for name in sorted(parts):
        raw = parts[name]
        value = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
        key = name.encode("utf-8")
        out += uvarint_encode(len(key) + 1 + len(value)) + key + b"=" + value
    return bytes(out)


def client_sig_parts(
    challenge_client: str, server_public_key: PublicKey, hostname: str
) -> dict[str, bytes | str]:
    return {
        "challenge-client": challenge_client,
        "server-public-key": server_public_key.to_proto(),
        "hostname": hostname,
    }


def server_sig_parts(
    challenge_server: str, client_public_key: PublicKey, hostname: str
) -> dict[str, bytes | str]:
    return {
        "challenge-server": challenge_server,
        "client-public-key": client_public_key.to_proto(),
        "hostname": hostname,
    }


def public_key_param(params: Mapping[str, str], what: str) -> PublicKey:
    raw = params.get("public-key")
    if raw is None:
        raise HeaderError(f"{what} lacks public-key")
    try:
        return PublicKey.from_proto(b64decode(raw, what=f"{what} public-key"))
    except PeerIdError as exc:
        raise HeaderError(f"{what} public-key is not a libp2p public key: {exc.message}") from None


def request_hostname(url: URL | str) -> str:
    """What the server sees in ``Host`` for this URL: the host (IPv6 in brackets), plus
    ``:port`` when the URL names a non-default port. This is the signed ``hostname``."""
    url = URL(url)
    host = url.raw_host
    if not host:
        raise ValueError(f"URL {url} has no host")
    if ":" in host:
        host = f"[{host}]"
    if url.explicit_port is not None and not url.is_default_port():
        host = f"{host}:{url.port}"
    return host
