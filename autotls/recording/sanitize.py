"""What a transcript may not hold, and how it is taken out at write time.

What this module owns, and nothing else: turning a value that crossed a port, or an HTTP
exchange made during a port call, into its written form without a secret in it. Removed:

* private keys (account, certificate; any PEM ``... PRIVATE KEY`` block),
* the signature of a CSR (the rest of it -- subject, public key, names -- stays),
* JWS signatures, the external account binding's HMAC, and nonces (``Replay-Nonce`` and
  the JWS ``nonce``),
* everything in ``libp2p-PeerID`` authentication headers except ``public-key``: signatures,
  challenges, ``opaque`` and the bearer token; any other ``Authorization`` credential,
* ``Forge-Authorization`` and cookies.

A replaced value keeps its shape: text is masked character for character
(:func:`mask`: same length, same base64 alphabet, the ``=`` padding kept), a CSR keeps its
DER structure with a signature of zero bytes, a PEM block keeps its armour and line lengths,
a JWS keeps its three base64url members. A replay therefore parses every value it finds, and
masking is idempotent: a sanitised value sanitises to itself, which is how a replay compares
what the code asks for with what the transcript holds (:func:`autotls.recording.codec.encode`
is applied to both).

Beyond that structure, every secret value seen (collected in a :class:`SecretValues` as the
exchanges are sanitised, plus the configured ones: the ``Forge-Authorization`` token, the
EAB HMAC key) is scrubbed from every string before a line is written (:func:`scrub`): a
secret a server echoed in an error message does not get through either.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography import x509

_PATTERN = "REDACTED"
# Scrubbing shorter values would blank out ordinary words.
MIN_SECRET_LENGTH = 8
# Recent secret values kept for scrubbing (nonces and signatures are fresh per request).
RECENT_SECRETS = 512
BODY_LIMIT = 16 * 1024

_PRIVATE_PEM = re.compile(
    r"(-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----)(.*?)(-----END \2-----)", re.DOTALL
)
_AUTH_PARAM = re.compile(r'([A-Za-z0-9!#$%&\'*+.^_`|~-]+)="([^"]*)"')
AUTH_HEADERS = frozenset({"authorization", "www-authenticate", "authentication-info"})
SECRET_HEADERS = frozenset(
    {"replay-nonce", "forge-authorization", "cookie", "set-cookie", "proxy-authorization"}
)
PUBLIC_AUTH_PARAMS = frozenset({"public-key"})


def mask(value: str) -> str:
    """``value`` replaced character for character (``REDACTEDREDAC...``), ``=`` padding kept:
    the same length, still base64 of the same number of bytes."""
    core = value.rstrip("=")
    padding = value[len(core) :]
    return (_PATTERN * (len(core) // len(_PATTERN) + 1))[: len(core)] + padding


def configured_secrets(forge_auth: str | None, eab_hmac_key: bytes | None) -> list[str]:
    """The configured secrets (the ``Forge-Authorization`` token, the EAB HMAC key) in the
    forms a transcript could hold them in."""
    found = [forge_auth] if forge_auth else []
    if eab_hmac_key is not None:
        found.append(base64.urlsafe_b64encode(eab_hmac_key).rstrip(b"=").decode("ascii"))
        found.append(base64.b64encode(eab_hmac_key).decode("ascii"))
    return found


class SecretValues:
    """Secret values to scrub from every written string: the configured ones, always, and the
    most recent ones met in exchanges."""

    def __init__(self, configured: Iterable[str] = ()) -> None:
        self.configured = [v for v in configured if len(v) >= MIN_SECRET_LENGTH]
        self._recent: deque[str] = deque(maxlen=RECENT_SECRETS)
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if len(value) >= MIN_SECRET_LENGTH and value != mask(value):
            self._recent.append(value)
            self._pattern = None

    def pattern(self) -> re.Pattern[str] | None:
        if self._pattern is None:
            values = sorted(set(self.configured) | set(self._recent), key=len, reverse=True)
            if values:
                self._pattern = re.compile("|".join(re.escape(v) for v in values))
        return self._pattern


def scrub(value: Any, secrets: SecretValues) -> Any:
    """A copy of the JSON-like ``value`` with every private key block and every secret value
    in its strings (and keys) masked."""
    pattern = secrets.pattern()

    def text(item: str) -> str:
        item = redact_private_keys(item)
        return pattern.sub(lambda m: mask(m.group()), item) if pattern is not None else item

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return text(item)
        if isinstance(item, Mapping):
            return {text(str(k)): walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v) for v in item]
        return item

    return walk(value)


def redact_private_keys(text: str) -> str:
    """Every PEM private key block in ``text`` with its body masked line by line."""
    if "PRIVATE KEY" not in text:
        return text

    def body(match: re.Match[str]) -> str:
        lines = match.group(3).split("\n")
        masked = "\n".join(mask(line.strip()) if line.strip() else line for line in lines)
        return match.group(1) + masked + match.group(4)

    return _PRIVATE_PEM.sub(body, text)


def sanitize_csr(der: bytes) -> bytes:
    """The CSR with its signature replaced by zero bytes (the DER still parses); bytes that
    are not a CSR are zeroed whole."""
    try:
        signature = x509.load_der_x509_csr(der).signature
    except ValueError:
        return bytes(len(der))
    if not signature or not der.endswith(signature):
        return bytes(len(der))
    return der[: -len(signature)] + bytes(len(signature))


def is_csr(der: bytes) -> bool:
    try:
        x509.load_der_x509_csr(der)
    except ValueError:
        return False
    return True


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- HTTP ----------------------------------------------------------------------------------


def sanitize_headers(headers: Mapping[str, str] | None, secrets: SecretValues) -> dict[str, str]:
    """Headers as written: authentication parameters and secret headers masked."""
    out: dict[str, str] = {}
    for name, value in (headers or {}).items():
        lowered = name.lower()
        if lowered in SECRET_HEADERS:
            secrets.add(value)
            value = mask(value)
        elif lowered in AUTH_HEADERS:
            value = _sanitize_auth(value, secrets)
        key = name
        while key in out:  # repeated headers (Link, Set-Cookie) are all kept
            key += " "
        out[key] = value
    return out


def _sanitize_auth(value: str, secrets: SecretValues) -> str:
    if '="' in value:

        def param(match: re.Match[str]) -> str:
            name, content = match.group(1), match.group(2)
            if name.lower() in PUBLIC_AUTH_PARAMS:
                return match.group()
            secrets.add(content)
            return f'{name}="{mask(content)}"'

        return _AUTH_PARAM.sub(param, value)
    scheme, _, credentials = value.partition(" ")
    if not credentials:
        secrets.add(value)
        return mask(value)
    secrets.add(credentials)
    return f"{scheme} {mask(credentials)}"


def sanitize_jws(body: Mapping[str, Any], secrets: SecretValues) -> dict[str, Any] | None:
    """A flattened JWS (an ACME request body) with its nonce, signature, the EAB's HMAC and a
    finalize CSR's signature masked; plus ``decoded``, its protected header and payload as
    JSON for the reader. None when ``body`` is not a JWS."""
    protected_b64, payload_b64, signature = (
        body.get("protected"),
        body.get("payload"),
        body.get("signature"),
    )
    if not all(isinstance(v, str) for v in (protected_b64, payload_b64, signature)):
        return None
    assert isinstance(protected_b64, str) and isinstance(payload_b64, str)
    assert isinstance(signature, str)
    try:
        protected = json.loads(_b64url_decode(protected_b64))
        payload_raw = _b64url_decode(payload_b64)
    except (ValueError, binascii.Error):
        return None
    if not isinstance(protected, dict):
        return None
    if isinstance(protected.get("nonce"), str):
        secrets.add(protected["nonce"])
        protected["nonce"] = mask(protected["nonce"])
    new_protected = _b64url(json.dumps(protected, separators=(",", ":")).encode())
    payload: Any = payload_raw.decode("utf-8", "replace") if payload_raw else ""
    new_payload = payload_b64
    try:
        parsed = json.loads(payload_raw) if payload_raw else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        changed = False
        csr = parsed.get("csr")
        if isinstance(csr, str):
            try:
                clean = _b64url(sanitize_csr(_b64url_decode(csr)))
            except (ValueError, binascii.Error):
                clean = mask(csr)
            if clean != csr:
                secrets.add(csr)
                parsed["csr"], changed = clean, True
        eab = parsed.get("externalAccountBinding")
        if isinstance(eab, dict) and isinstance(eab.get("signature"), str):
            secrets.add(eab["signature"])
            eab["signature"], changed = mask(eab["signature"]), True
        if changed:
            new_payload = _b64url(json.dumps(parsed, separators=(",", ":")).encode())
        payload = parsed
    secrets.add(signature)
    return {
        "protected": new_protected,
        "payload": new_payload,
        "signature": mask(signature),
        "decoded": {"protected": protected, "payload": payload},
    }


def body_for_transcript(
    body: bytes | None, headers: Mapping[str, str] | None, secrets: SecretValues
) -> Any:
    """An HTTP body as written: a JWS sanitised (:func:`sanitize_jws`), other JSON as JSON,
    text as text, anything else as base64; cut at :data:`BODY_LIMIT` bytes (and said so)."""
    if body is None:
        return None
    if not body:
        return ""
    cut = len(body) > BODY_LIMIT
    shown = body[:BODY_LIMIT]
    content_type = ""
    for name, value in (headers or {}).items():
        if name.lower() == "content-type":
            content_type = value.lower()
    if not cut and ("json" in content_type or shown.lstrip()[:1] in (b"{", b"[")):
        try:
            parsed = json.loads(shown)
        except ValueError:
            parsed = None
        if parsed is not None:
            if isinstance(parsed, dict):
                jws = sanitize_jws(parsed, secrets)
                if jws is not None:
                    return {"jws": jws}
            return {"json": parsed}
    suffix = {"cut_at": BODY_LIMIT, "size": len(body)} if cut else {}
    try:
        return {"text": shown.decode("utf-8"), **suffix}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(shown).decode("ascii"), **suffix}
