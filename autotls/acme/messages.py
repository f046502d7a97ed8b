"""ACME resources as immutable records, parsed defensively from what the server sent, plus the
two HTTP headers ACME leans on: ``Retry-After`` (RFC 9110 §10.2.3) and ``Link`` (RFC 8288).

Every parser raises :class:`AcmeProtocolError` naming the resource and the field when the
server's data is missing or mistyped; unknown fields are ignored (servers add them freely).
So are challenges of types this client does not know (``dns-persist-01`` and whatever drafts
come next): one that does not parse as RFC 8555 says is left out of its authorization rather
than making the authorization unreadable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urljoin

from cryptography import x509

from autotls.acme.problems import AcmeProblem, AcmeProtocolError, problem_from_document

ORDER_STATUSES = frozenset({"pending", "ready", "processing", "valid", "invalid"})
AUTHORIZATION_STATUSES = frozenset(
    {"pending", "valid", "invalid", "deactivated", "expired", "revoked"}
)
CHALLENGE_STATUSES = frozenset({"pending", "processing", "valid", "invalid"})
ACCOUNT_STATUSES = frozenset({"valid", "deactivated", "revoked"})
# Challenge types whose token the client uses; others may come without one.
_TOKEN_CHALLENGES = frozenset({"dns-01", "http-01", "tls-alpn-01", "dns-account-01"})

log = logging.getLogger(__name__)


class _Fields:
    """Typed access to one JSON object, with errors that say which resource and field."""

    def __init__(self, raw: Any, what: str, url: str | None = None) -> None:
        if not isinstance(raw, Mapping):
            raise AcmeProtocolError(f"{what} is a {type(raw).__name__}, not a JSON object", url=url)
        self.raw = raw
        self.what = what
        self.url = url

    def fail(self, name: str, expected: str) -> AcmeProtocolError:
        value = self.raw.get(name)
        got = "missing" if name not in self.raw else f"a {type(value).__name__}"
        return AcmeProtocolError(
            f"{self.what}: field {name!r} must be {expected}, got {got}", url=self.url
        )

    def text(self, name: str) -> str:
        value = self.raw.get(name)
        if not isinstance(value, str) or not value:
            raise self.fail(name, "a non-empty string")
        return value

    def opt_text(self, name: str) -> str | None:
        if self.raw.get(name) is None:
            return None
        return self.text(name)

    def status(self, allowed: frozenset[str]) -> str:
        value = self.text("status")
        if value not in allowed:
            raise AcmeProtocolError(f"{self.what}: unknown status {value[:40]!r}", url=self.url)
        return value

    def texts(self, name: str, *, required: bool = True) -> tuple[str, ...]:
        value = self.raw.get(name)
        if value is None and not required:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, "a list of strings")
        return tuple(value)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.raw.get(name, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(name, "a boolean")
        return value

    def mapping(self, name: str, *, required: bool = True) -> Mapping[str, Any] | None:
        value = self.raw.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(name, "an object")
        return value

    def list_of_mappings(self, name: str) -> list[Mapping[str, Any]]:
        value = self.raw.get(name)
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.fail(name, "a list of objects")
        return value

    def time(self, name: str) -> datetime | None:
        if self.raw.get(name) is None:
            return None
        return self.required_time(name)

    def required_time(self, name: str) -> datetime:
        value = self.raw.get(name)
        if not isinstance(value, str):
            raise self.fail(name, "an RFC 3339 timestamp")
        parsed = parse_rfc3339(value)
        if parsed is None:
            raise AcmeProtocolError(
                f"{self.what}: field {name!r} is not an RFC 3339 timestamp: {value[:40]!r}",
                url=self.url,
            )
        return parsed


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})"
)


def parse_rfc3339(text: str) -> datetime | None:
    """An aware UTC datetime, or None. Fractions beyond microseconds (Go sends nanoseconds)
    are truncated; leap seconds are clamped to :59."""
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = (match.group(7) or "0")[:6].ljust(6, "0")
    offset = match.group(8)
    try:
        if offset in ("Z", "z"):
            tz: timezone = UTC
        else:
            sign = 1 if offset[0] == "+" else -1
            tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
        return datetime(
            year, month, day, hour, minute, min(second, 59), int(fraction), tzinfo=tz
        ).astimezone(UTC)
    except ValueError:
        return None


def format_rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identifier:
    type: str
    value: str

    @classmethod
    def parse(cls, raw: Any, what: str, url: str | None = None) -> Identifier:
        fields = _Fields(raw, what, url)
        return cls(fields.text("type"), fields.text("value"))

    def to_json(self) -> dict[str, str]:
        return {"type": self.type, "value": self.value}


@dataclass(frozen=True)
class Directory:
    new_nonce: str
    new_account: str
    new_order: str
    revoke_cert: str
    key_change: str
    renewal_info: str | None = None
    new_authz: str | None = None
    terms_of_service: str | None = None
    website: str | None = None
    profiles: Mapping[str, str] = field(default_factory=dict)
    external_account_required: bool = False

    @classmethod
    def parse(cls, raw: Any, url: str | None = None) -> Directory:
        fields = _Fields(raw, "directory", url)
        meta = _Fields(fields.mapping("meta", required=False) or {}, "directory meta", url)
        profiles_raw = meta.mapping("profiles", required=False) or {}
        profiles: dict[str, str] = {}
        for name, description in profiles_raw.items():
            if not isinstance(description, str):
                raise AcmeProtocolError(
                    f"directory meta: profile {str(name)[:40]!r} must be described by a string",
                    url=url,
                )
            profiles[str(name)] = description
        return cls(
            new_nonce=fields.text("newNonce"),
            new_account=fields.text("newAccount"),
            new_order=fields.text("newOrder"),
            revoke_cert=fields.text("revokeCert"),
            key_change=fields.text("keyChange"),
            renewal_info=fields.opt_text("renewalInfo"),
            new_authz=fields.opt_text("newAuthz"),
            terms_of_service=meta.opt_text("termsOfService"),
            website=meta.opt_text("website"),
            profiles=profiles,
            external_account_required=meta.flag("externalAccountRequired"),
        )


@dataclass(frozen=True)
class Account:
    url: str
    status: str
    contact: tuple[str, ...] = ()
    orders: str | None = None

    @classmethod
    def parse(cls, raw: Any, url: str) -> Account:
        fields = _Fields(raw, "account", url)
        return cls(
            url=url,
            status=fields.status(ACCOUNT_STATUSES),
            contact=fields.texts("contact", required=False),
            orders=fields.opt_text("orders"),
        )


@dataclass(frozen=True)
class Order:
    url: str
    status: str
    identifiers: tuple[Identifier, ...]
    authorizations: tuple[str, ...]
    finalize: str
    expires: datetime | None = None
    certificate: str | None = None
    error: Mapping[str, Any] | None = None
    profile: str | None = None
    replaces: str | None = None
    retry_after: float | None = None

    @classmethod
    def parse(cls, raw: Any, url: str, *, retry_after: float | None = None) -> Order:
        fields = _Fields(raw, "order", url)
        identifiers = tuple(
            Identifier.parse(item, f"order: identifiers[{i}]", url)
            for i, item in enumerate(fields.list_of_mappings("identifiers"))
        )
        if not identifiers:
            raise AcmeProtocolError("order: field 'identifiers' is empty", url=url)
        return cls(
            url=url,
            status=fields.status(ORDER_STATUSES),
            identifiers=identifiers,
            authorizations=fields.texts("authorizations"),
            finalize=fields.text("finalize"),
            expires=fields.time("expires"),
            certificate=fields.opt_text("certificate"),
            error=fields.mapping("error", required=False),
            profile=fields.opt_text("profile"),
            replaces=fields.opt_text("replaces"),
            retry_after=retry_after,
        )

    def problem(self) -> AcmeProblem | None:
        """The order's ``error`` as a typed problem, if any."""
        return problem_from_document(self.error, url=self.url) if self.error else None


@dataclass(frozen=True)
class Challenge:
    url: str
    type: str
    status: str
    token: str | None = None
    error: Mapping[str, Any] | None = None
    validated: datetime | None = None

    @classmethod
    def parse(cls, raw: Any, what: str = "challenge", url: str | None = None) -> Challenge:
        fields = _Fields(raw, what, url)
        challenge_type = fields.text("type")
        token = fields.text("token") if challenge_type in _TOKEN_CHALLENGES else None
        return cls(
            url=fields.text("url"),
            type=challenge_type,
            status=fields.status(CHALLENGE_STATUSES),
            token=token,
            error=fields.mapping("error", required=False),
            validated=fields.time("validated"),
        )

    def problem(self) -> AcmeProblem | None:
        return problem_from_document(self.error, url=self.url) if self.error else None


@dataclass(frozen=True)
class Authorization:
    url: str
    status: str
    identifier: Identifier
    challenges: tuple[Challenge, ...]
    wildcard: bool = False
    expires: datetime | None = None
    retry_after: float | None = None

    @classmethod
    def parse(cls, raw: Any, url: str, *, retry_after: float | None = None) -> Authorization:
        fields = _Fields(raw, "authorization", url)
        challenges = []
        for i, item in enumerate(fields.list_of_mappings("challenges")):
            try:
                challenges.append(Challenge.parse(item, f"authorization: challenges[{i}]", url))
            except AcmeProtocolError as exc:
                kind = item.get("type")
                if not isinstance(kind, str) or kind in _TOKEN_CHALLENGES:
                    raise
                log.debug("ignoring a %.40r challenge we cannot read: %s", kind, exc)
        return cls(
            url=url,
            status=fields.status(AUTHORIZATION_STATUSES),
            identifier=Identifier.parse(
                fields.mapping("identifier"), "authorization: identifier", url
            ),
            challenges=tuple(challenges),
            wildcard=fields.flag("wildcard"),
            expires=fields.time("expires"),
            retry_after=retry_after,
        )

    def challenge(self, challenge_type: str) -> Challenge:
        """The challenge of that type; AcmeProtocolError when the CA did not offer it."""
        for challenge in self.challenges:
            if challenge.type == challenge_type:
                return challenge
        offered = ", ".join(c.type for c in self.challenges) or "none"
        raise AcmeProtocolError(
            f"authorization for {self.identifier.value} offers no {challenge_type} challenge"
            f" (offered: {offered})",
            url=self.url,
        )

    def problem(self) -> AcmeProblem | None:
        """The first failing challenge's error, typed: why an ``invalid`` authorization failed."""
        for challenge in self.challenges:
            if challenge.error:
                return challenge.problem()
        return None


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----"
)


def split_pem_chain(pem: bytes, url: str | None = None) -> list[x509.Certificate]:
    """Parse a ``application/pem-certificate-chain`` body; at least one certificate."""
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise AcmeProtocolError("certificate chain contains no PEM certificate", url=url)
    certificates = []
    for index, block in enumerate(blocks):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise AcmeProtocolError(
                f"certificate chain: block {index} is not a valid certificate", url=url
            ) from None
    return certificates


@dataclass(frozen=True)
class CertificateChain:
    """The PEM chain as downloaded (leaf first) and the alternate chains the CA linked."""

    url: str
    pem: str
    alternates: tuple[str, ...] = ()

    def certificates(self) -> list[x509.Certificate]:
        return split_pem_chain(self.pem.encode("ascii"), self.url)

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates()[0]


@dataclass(frozen=True)
class RenewalInfo:
    """An ARI answer (RFC 9773 §4.2): renew at a random moment in [start, end)."""

    start: datetime
    end: datetime
    explanation_url: str | None = None
    retry_after: float | None = None

    @classmethod
    def parse(cls, raw: Any, url: str, *, retry_after: float | None = None) -> RenewalInfo:
        fields = _Fields(raw, "renewalInfo", url)
        window = _Fields(fields.mapping("suggestedWindow"), "renewalInfo suggestedWindow", url)
        start = window.required_time("start")
        end = window.required_time("end")
        if end <= start:
            raise AcmeProtocolError(
                "renewalInfo: suggestedWindow 'end' is not after 'start'", url=url
            )
        return cls(start, end, fields.opt_text("explanationURL"), retry_after)


# -- headers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    url: str
    rel: str
    params: Mapping[str, str] = field(default_factory=dict)


_LINK_PARAM = re.compile(
    r'\s*;\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*))?'
)


def parse_link_header(values: Iterable[str], base_url: str) -> list[Link]:
    """Every ``<uri>; rel="..."`` in the given Link header values, one Link per relation type,
    URIs resolved against ``base_url``. Malformed entries are skipped, not fatal: a Link we
    cannot read is one we would not have needed."""
    links: list[Link] = []
    for value in values:
        position = 0
        while position < len(value):
            start = value.find("<", position)
            if start < 0:
                break
            end = value.find(">", start)
            if end < 0:
                break
            target = value[start + 1 : end].strip()
            position = end + 1
            params: dict[str, str] = {}
            while True:
                match = _LINK_PARAM.match(value, position)
                if match is None:
                    break
                name, raw = match.group(1).lower(), match.group(2) or ""
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params.setdefault(name, raw)
                position = match.end()
            for rel in params.get("rel", "").split():
                links.append(Link(urljoin(base_url, target), rel.lower(), params))
            comma = value.find(",", position)
            if comma < 0:
                break
            position = comma + 1
    return links


def links_with_rel(links: Sequence[Link], rel: str) -> list[str]:
    return [link.url for link in links if link.rel == rel]
