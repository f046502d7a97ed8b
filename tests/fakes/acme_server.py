"""FakeAcmeServer: a fake ACME CA on loopback HTTP, standing in for the Let's Encrypt (Boulder)
behaviours that Pebble 2.4.0 lacks. Use real Pebble for everything Pebble can do.

What it fakes, each behaviour switchable from a test:

* ARI (RFC 9773): ``renewalInfo`` in the directory, windows per CertID (default: the middle of
  the last third of the lifetime; a revoked certificate's window is in the past) with
  Retry-After; 404 ``malformed`` for unknown CertIDs;
* profiles: ``meta.profiles``, ``profile`` on newOrder, ``invalidProfile`` for unknown ones,
  Let's Encrypt's lifetimes per profile *and issuance date* (the default "classic" profile:
  90 days, 64 days from 2027-02-10, 45 days from 2028-02-16; ``shortlived``: 160-hour
  certificates, 1-hour pending authorizations, 8-hour orders); an order whose authorization
  (or itself) expired unfinalized reads ``invalid``, and an expired authorization or its
  challenge answers 404 ``malformed`` ("Expired authorization"), as Boulder's do;
* alternate chains (``Link: rel="alternate"``) shaped like Let's Encrypt's "Gen Y" hierarchy:
  the leaf's issuer chains either to a new root ("FakeAcmeServer Root YE", in few trust stores)
  or, through a cross-sign, to the old one ("FakeAcmeServer Root"); which is the default chain
  is switchable;
* challenge types the client does not know (``dns-persist-01``...), listed next to ``dns-01``
  with fields of their own; a valid authorization lists only the challenge that validated it,
  as Boulder's do, and ``standing_validation`` makes new authorizations valid at once through
  a standing record of such a type (dns-persist-01's point);
* ``Retry-After`` on pending authorizations and processing orders (Boulder sends 3 s), with a
  configurable number of polls before they move on;
* order reuse: the same account asking again for the same identifiers, profile and
  ``replaces`` gets the existing pending/ready order;
* ``replaces``: 409 ``alreadyReplaced`` once a certificate has a live replacement, 404
  ``malformed`` for unknown or expired certificates, 403 ``unauthorized`` for another account's;
* injected failures: any endpoint can answer 429 ``rateLimited``, 503, or any problem, with
  Retry-After, ``times`` times; and ``badNonce`` on demand.

It is complete enough to drive a whole issuance: it verifies every JWS (ES256/384/512, RS256,
EdDSA, independently of the client's own code), enforces nonces and URLs, validates DNS-01
through a pluggable ``validator`` (default: accept), checks the CSR and signs real certificates
with its own root and intermediate. Time comes from the injected ``now``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ERR = "urn:ietf:params:acme:error:"
DEFAULT_PROFILES = {
    "classic": "90-day certificates, the default",
    "tlsserver": "45-day TLS server certificates",
    "shortlived": "160-hour certificates",
}
PROFILE_LIFETIMES = {
    "tlsserver": timedelta(days=45),
    "shortlived": timedelta(hours=160),
}
# Let's Encrypt's announced schedule for the default ("classic") profile, by issuance date.
CLASSIC_LIFETIMES = (
    (datetime(2028, 2, 16, tzinfo=UTC), timedelta(days=45)),
    (datetime(2027, 2, 10, tzinfo=UTC), timedelta(days=64)),
    (datetime.min.replace(tzinfo=UTC), timedelta(days=90)),
)
# How long a pending authorization and an order live, per profile (Boulder: 7 days by default).
PENDING_AUTHZ_LIFETIMES = {"shortlived": timedelta(hours=1)}
ORDER_LIFETIMES = {"shortlived": timedelta(hours=8)}
DEFAULT_PENDING_LIFETIME = timedelta(days=7)
VALID_AUTHZ_LIFETIME = timedelta(days=30)
ROOT_CN = "FakeAcmeServer Root"
GEN_Y_ROOT_CN = "FakeAcmeServer Root YE"


def classic_lifetime(issued: datetime) -> timedelta:
    """The default profile's certificate lifetime for a certificate issued at ``issued``."""
    return next(lifetime for since, lifetime in CLASSIC_LIFETIMES if issued >= since)


# A challenge type from a newer draft (dns-persist-01: a standing TXT record naming the CA
# and the account), with fields of its own and no token.
DNS_PERSIST_01: dict[str, Any] = {
    "type": "dns-persist-01",
    "status": "pending",
    "issuer-domain-names": ["fake-acme.example"],
    "accounturi-required": True,
}

Validator = Callable[[str, str], Awaitable[bool]]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    required = {
        "EC": ("crv", "kty", "x", "y"),
        "RSA": ("e", "kty", "n"),
        "OKP": ("crv", "kty", "x"),
    }
    members = {k: jwk[k] for k in required[jwk["kty"]]}
    return _b64(
        hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest()
    )


_CURVES: dict[str, tuple[ec.EllipticCurve, hashes.HashAlgorithm, int, str]] = {
    "P-256": (ec.SECP256R1(), hashes.SHA256(), 32, "ES256"),
    "P-384": (ec.SECP384R1(), hashes.SHA384(), 48, "ES384"),
    "P-521": (ec.SECP521R1(), hashes.SHA512(), 66, "ES512"),
}


def _verify(jwk: Mapping[str, Any], alg: str, signing_input: bytes, signature: bytes) -> bool:
    try:
        if jwk["kty"] == "EC":
            curve, hash_alg, size, expected_alg = _CURVES[jwk["crv"]]
            if alg != expected_alg or len(signature) != 2 * size:
                return False
            ec_key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(_unb64(jwk["x"]), "big"),
                int.from_bytes(_unb64(jwk["y"]), "big"),
                curve,
            ).public_key()
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            ec_key.verify(der, signing_input, ec.ECDSA(hash_alg))
        elif jwk["kty"] == "RSA":
            if alg != "RS256":
                return False
            rsa_key = rsa.RSAPublicNumbers(
                int.from_bytes(_unb64(jwk["e"]), "big"), int.from_bytes(_unb64(jwk["n"]), "big")
            ).public_key()
            rsa_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        elif jwk["kty"] == "OKP" and jwk.get("crv") == "Ed25519":
            if alg != "EdDSA":
                return False
            ed25519.Ed25519PublicKey.from_public_bytes(_unb64(jwk["x"])).verify(
                signature, signing_input
            )
        else:
            return False
    except (InvalidSignature, KeyError, ValueError, TypeError):
        return False
    return True


def _jwk_of(public_key: Any) -> dict[str, str]:
    """The JWK of a certificate's public key (to match revocation by certificate key)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[
            public_key.curve.name
        ]
        size = _CURVES[crv][2]
        numbers = public_key.public_numbers()
        return {
            "crv": crv,
            "kty": "EC",
            "x": _b64(numbers.x.to_bytes(size, "big")),
            "y": _b64(numbers.y.to_bytes(size, "big")),
        }
    if isinstance(public_key, rsa.RSAPublicKey):
        n = public_key.public_numbers()
        return {
            "e": _b64(n.e.to_bytes((n.e.bit_length() + 7) // 8, "big")),
            "kty": "RSA",
            "n": _b64(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
        }
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)}


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _ca_certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    path_length: int | None,
    now: datetime,
    days: int,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


class Problem(Exception):
    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        retry_after: str | None = None,
        subproblems: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after
        self.subproblems = subproblems


@dataclass
class Injection:
    status: int
    problem_type: str | None
    detail: str
    retry_after: str | None
    times: int


@dataclass
class FakeAccount:
    id: str
    jwk: dict[str, Any]
    status: str = "valid"
    contact: list[str] = field(default_factory=list)


@dataclass
class FakeAuthorization:
    id: str
    account_id: str
    identifier: str
    wildcard: bool
    token: str
    expires: datetime
    status: str = "pending"
    challenge_status: str = "pending"
    pending_polls_left: int = 0
    error: dict[str, Any] | None = None
    validated: datetime | None = None
    validated_by: str = "dns-01"


@dataclass
class IssuedCertificate:
    cert_id: str
    account_id: str
    certificate: x509.Certificate
    pem_chain: str
    alternates: list[str] = field(default_factory=list)
    revoked_reason: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_reason is not None


@dataclass
class FakeOrder:
    id: str
    account_id: str
    identifiers: tuple[str, ...]
    authz_ids: list[str]
    expires: datetime
    profile: str | None
    replaces: str | None
    finalized: bool = False
    processing_polls_left: int = 0
    certificate_id: str | None = None
    error: dict[str, Any] | None = None


@dataclass
class RenewalWindow:
    start: datetime
    end: datetime
    retry_after: str | None = "21600"
    explanation_url: str | None = None


class FakeAcmeServer:
    """A fake ACME CA; see the module docstring. ``async with FakeAcmeServer() as ca:``."""

    def __init__(
        self,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        profiles: Mapping[str, str] | None = None,
        ari: bool = True,
        order_reuse: bool = True,
        validator: Validator | None = None,
        default_lifetime: timedelta | None = None,
        chains: str = "single",
        host: str = "127.0.0.1",
    ) -> None:
        """``default_lifetime``: the lifetime of certificates ordered without a profile (None:
        Let's Encrypt's "classic" schedule by issuance date). ``chains``: "single" (leaf,
        issuer; one root), "cross-signed" (the default chain ends at the old root through a
        cross-sign, the alternate at the Gen Y root) or "gen-y" (the other way round)."""
        if chains not in ("single", "cross-signed", "gen-y"):
            raise ValueError(f"unknown chains {chains!r}")
        self.now = now
        self.profiles = dict(DEFAULT_PROFILES if profiles is None else profiles)
        self.ari = ari
        self.order_reuse = order_reuse
        self.validator = validator
        self.default_lifetime = default_lifetime
        self.chains = chains
        self.host = host
        # Challenges of types the client does not use, listed before dns-01 in every
        # authorization (each gets its own URL; answering one is refused).
        self.extra_challenges: list[dict[str, Any]] = []
        # A challenge type (one of extra_challenges) through which every new authorization is
        # valid at once: a standing dns-persist-01 record naming this CA and the account.
        self.standing_validation: str | None = None
        # Polling behaviour. authz_pending_polls: authorization fetches after the challenge
        # answer that still see "pending"; order_processing_polls: order fetches after finalize
        # that still see "processing" (Let's Encrypt answers those with Retry-After: 3).
        self.authz_pending_polls = 0
        self.authz_retry_after: str | None = None
        self.order_processing_polls = 0
        self.order_retry_after: str | None = "3"
        # Retry-After of the ARI windows the fake computes itself (Let's Encrypt: ~6 h).
        self.ari_retry_after: str | None = "21600"
        self.accounts: dict[str, FakeAccount] = {}
        self.orders: dict[str, FakeOrder] = {}
        self.authorizations: dict[str, FakeAuthorization] = {}
        self.certificates: dict[str, IssuedCertificate] = {}  # by CertID
        self.replaced_by: dict[str, str] = {}  # CertID -> order id
        self.windows: dict[str, RenewalWindow] = {}
        self.requests: list[tuple[str, str]] = []  # (method, endpoint)
        self.payloads: list[tuple[str, Any]] = []  # (endpoint, decoded JWS payload)
        self.problems: list[tuple[str, int, str]] = []  # (endpoint, status, detail) answered
        self._nonces: set[str] = set()
        self._reject_nonces = 0
        self._injections: dict[str, list[Injection]] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._make_ca()

    # -- test controls ----------------------------------------------------------------------

    def fail_next(
        self,
        endpoint: str,
        *,
        status: int,
        problem_type: str | None = None,
        detail: str = "injected failure",
        retry_after: str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests to ``endpoint`` (directory, newNonce, newAccount,
        account, newOrder, order, authz, challenge, finalize, certificate, revokeCert,
        keyChange, renewalInfo) with ``status``: a problem document of ``problem_type`` (short
        or full URN), or a plain-text body when it is None."""
        self._injections.setdefault(endpoint, []).append(
            Injection(status, problem_type, detail, retry_after, times)
        )

    def rate_limit_next(self, endpoint: str, *, retry_after: str = "3600", times: int = 1) -> None:
        self.fail_next(
            endpoint,
            status=429,
            problem_type="rateLimited",
            detail="too many certificates already issued",
            retry_after=retry_after,
            times=times,
        )

    def unavailable_next(self, endpoint: str, *, retry_after: str = "120", times: int = 1) -> None:
        self.fail_next(
            endpoint,
            status=503,
            problem_type=None,
            detail="service unavailable",
            retry_after=retry_after,
            times=times,
        )

    def reject_nonces(self, count: int) -> None:
        """The next ``count`` signed requests get badNonce, however good their nonce."""
        self._reject_nonces += count

    def set_renewal_window(
        self,
        cert_id: str,
        start: datetime,
        end: datetime,
        *,
        retry_after: str | None = "21600",
        explanation_url: str | None = None,
    ) -> None:
        self.windows[cert_id] = RenewalWindow(start, end, retry_after, explanation_url)

    def count(self, endpoint: str) -> int:
        return sum(1 for _method, name in self.requests if name == endpoint)

    @property
    def directory_url(self) -> str:
        return f"{self.base_url}/directory"

    @property
    def root_pem(self) -> str:
        return self._root_cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def gen_y_root_pem(self) -> str:
        """The Gen Y root (only with ``chains`` other than "single")."""
        assert self._gen_y_root is not None, "no Gen Y hierarchy: pass chains=..."
        return self._gen_y_root.public_bytes(serialization.Encoding.PEM).decode()

    def lifetime(self, profile: str | None, issued: datetime) -> timedelta:
        """The lifetime of a certificate of ``profile`` issued at ``issued``."""
        if profile in PROFILE_LIFETIMES:
            return PROFILE_LIFETIMES[profile]
        if profile is None and self.default_lifetime is not None:
            return self.default_lifetime
        return classic_lifetime(issued)

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeAcmeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/directory", self._directory)
        app.router.add_get("/new-nonce", self._new_nonce)  # HEAD too
        app.router.add_post("/new-account", self._new_account)
        app.router.add_post("/account/{id}", self._account)
        app.router.add_post("/new-order", self._new_order)
        app.router.add_post("/order/{id}", self._order)
        app.router.add_post("/authz/{id}", self._authz)
        app.router.add_post("/chall/{id}", self._challenge)
        app.router.add_post("/chall/{id}/{extra}", self._challenge)
        app.router.add_post("/finalize/{id}", self._finalize)
        app.router.add_post("/cert/{id}", self._certificate)
        app.router.add_post("/cert/{id}/{alternate}", self._certificate)
        app.router.add_post("/revoke-cert", self._revoke)
        app.router.add_post("/key-change", self._key_change)
        app.router.add_get("/renewal-info/{cert_id}", self._renewal_info)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- CA -------------------------------------------------------------------------------------

    def _make_ca(self) -> None:
        now = self.now()
        self._root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _cn(ROOT_CN)
        # Under a cross-sign the old root has two CAs below it (cross-sign, issuer).
        root_path_length = 1 if self.chains == "single" else None
        self._root_cert = _ca_certificate(
            root_name, self._root_key, root_name, self._root_key, root_path_length, now, 3650
        )
        self._issuer_key = ec.generate_private_key(ec.SECP256R1())
        self._gen_y_root: x509.Certificate | None = None
        self._cross_sign: x509.Certificate | None = None
        if self.chains == "single":
            self._issuer_name = _cn("FakeAcmeServer Issuer")
            self._issuer_cert = _ca_certificate(
                self._issuer_name, self._issuer_key, root_name, self._root_key, 0, now, 1825
            )
            return
        # Let's Encrypt's Gen Y shape: the issuer hangs below a new root, which the old root
        # cross-signs, so a chain can end at either root.
        gen_y_key = ec.generate_private_key(ec.SECP384R1())
        gen_y_name = _cn(GEN_Y_ROOT_CN)
        self._gen_y_root = _ca_certificate(
            gen_y_name, gen_y_key, gen_y_name, gen_y_key, 1, now, 3650
        )
        self._cross_sign = _ca_certificate(
            gen_y_name, gen_y_key, root_name, self._root_key, 1, now, 1825
        )
        self._issuer_name = _cn("FakeAcmeServer Issuer YE1")
        self._issuer_cert = _ca_certificate(
            self._issuer_name, self._issuer_key, gen_y_name, gen_y_key, 0, now, 1825
        )

    def _chains(self, leaf: x509.Certificate) -> tuple[str, list[str]]:
        """The default chain and the alternates for ``leaf`` (PEM, leaf first)."""

        def pem(*certs: x509.Certificate) -> str:
            return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)

        if self._cross_sign is None:
            return pem(leaf, self._issuer_cert), []
        to_old_root = pem(leaf, self._issuer_cert, self._cross_sign)
        to_gen_y = pem(leaf, self._issuer_cert)
        if self.chains == "cross-signed":
            return to_old_root, [to_gen_y]
        return to_gen_y, [to_old_root]

    def _issue(self, order: FakeOrder, csr: x509.CertificateSigningRequest) -> IssuedCertificate:
        now = self.now()
        lifetime = self.lifetime(order.profile, now)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._issuer_name)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + lifetime)
            .add_extension(x509.SubjectAlternativeName(list(san)), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._issuer_key.public_key()),
                critical=False,
            )
            .sign(self._issuer_key, hashes.SHA256())
        )
        aki = cert.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier
        ).value.key_identifier
        serial = cert.serial_number.to_bytes(cert.serial_number.bit_length() // 8 + 1, "big")
        cert_id = f"{_b64(aki or b'')}.{_b64(serial)}"
        chain, alternates = self._chains(cert)
        issued = IssuedCertificate(cert_id, order.account_id, cert, chain, alternates)
        self.certificates[cert_id] = issued
        return issued

    # -- plumbing -----------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _fresh_nonce(self) -> str:
        nonce = _b64(secrets.token_bytes(16))
        self._nonces.add(nonce)
        return nonce

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        endpoint = _endpoint(request)
        self.requests.append((request.method, endpoint))
        response: web.StreamResponse
        try:
            injected = self._take_injection(endpoint)
            if injected is not None:
                response = injected
            else:
                response = await handler(request)
        except Problem as problem:
            self.problems.append((endpoint, problem.status, problem.detail))
            body: dict[str, Any] = {
                "type": ERR + problem.kind if ":" not in problem.kind else problem.kind,
                "detail": problem.detail,
                "status": problem.status,
            }
            if problem.subproblems:
                body["subproblems"] = problem.subproblems
            response = web.json_response(
                body, status=problem.status, content_type="application/problem+json"
            )
            if problem.retry_after is not None:
                response.headers["Retry-After"] = problem.retry_after
        response.headers["Replay-Nonce"] = self._fresh_nonce()
        response.headers.add("Link", f'<{self.directory_url}>;rel="index"')
        response.headers["Cache-Control"] = "no-store"
        return response

    def _take_injection(self, endpoint: str) -> web.Response | None:
        queue = self._injections.get(endpoint)
        if not queue:
            return None
        injection = queue[0]
        injection.times -= 1
        if injection.times <= 0:
            queue.pop(0)
        headers = (
            {"Retry-After": injection.retry_after} if injection.retry_after is not None else {}
        )
        if injection.problem_type is None:
            return web.Response(
                status=injection.status,
                text=f"<html>{injection.detail}</html>",
                content_type="text/html",
                headers=headers,
            )
        kind = (
            injection.problem_type
            if ":" in injection.problem_type
            else ERR + injection.problem_type
        )
        return web.json_response(
            {"type": kind, "detail": injection.detail, "status": injection.status},
            status=injection.status,
            content_type="application/problem+json",
            headers=headers,
        )

    async def _signed(
        self, request: web.Request, *, allow_jwk: bool = False
    ) -> tuple[Any, FakeAccount | None, dict[str, Any]]:
        """Verify the JWS of a POST: (payload or None for POST-as-GET, account, jwk)."""
        if request.content_type != "application/jose+json":
            raise Problem(415, "malformed", "Content-Type must be application/jose+json")
        try:
            jws = json.loads(await request.read())
            protected = json.loads(_unb64(jws["protected"]))
            payload_bytes = _unb64(jws["payload"])
            signature = _unb64(jws["signature"])
            signing_input = f"{jws['protected']}.{jws['payload']}".encode()
        except (ValueError, KeyError, TypeError) as exc:
            raise Problem(400, "malformed", f"unparseable JWS: {exc}") from None
        if protected.get("url") != self._url(request.path):
            raise Problem(401, "unauthorized", "JWS url does not match the request URL")
        nonce = protected.get("nonce")
        if self._reject_nonces > 0:
            self._reject_nonces -= 1
            self._nonces.discard(nonce)
            raise Problem(400, "badNonce", "nonce rejected (injected)")
        if nonce not in self._nonces:
            raise Problem(400, "badNonce", "unknown or reused nonce")
        self._nonces.discard(nonce)
        has_kid, has_jwk = "kid" in protected, "jwk" in protected
        if has_kid == has_jwk:
            raise Problem(400, "malformed", "exactly one of kid and jwk is required")
        account: FakeAccount | None = None
        if has_jwk:
            if not allow_jwk:
                raise Problem(400, "malformed", "this endpoint requires kid")
            jwk = protected["jwk"]
            if not isinstance(jwk, dict):
                raise Problem(400, "malformed", "jwk is not an object")
        else:
            account_id = str(protected["kid"]).rsplit("/", 1)[-1]
            account = self.accounts.get(account_id)
            if account is None or protected["kid"] != self._url(f"/account/{account_id}"):
                raise Problem(400, "accountDoesNotExist", "no account for this kid")
            if account.status != "valid":
                raise Problem(403, "unauthorized", f"account is {account.status}")
            jwk = account.jwk
        if not _verify(jwk, str(protected.get("alg")), signing_input, signature):
            raise Problem(400, "malformed", "JWS signature does not verify")
        try:
            payload = json.loads(payload_bytes) if payload_bytes else None
        except ValueError:
            raise Problem(400, "malformed", "payload is not JSON") from None
        self.payloads.append((_endpoint(request), payload))
        return payload, account, jwk

    def _account_by_thumbprint(self, thumbprint: str) -> FakeAccount | None:
        for account in self.accounts.values():
            if _thumbprint(account.jwk) == thumbprint:
                return account
        return None

    # -- resources ------------------------------------------------------------------------------

    def _account_json(self, account: FakeAccount) -> dict[str, Any]:
        return {
            "status": account.status,
            "contact": account.contact,
            "orders": self._url(f"/orders/{account.id}"),
        }

    def _authz_status(self, authz: FakeAuthorization) -> str:
        if authz.status in ("pending", "valid") and authz.expires <= self.now():
            return "expired"
        return authz.status

    def _order_status(self, order: FakeOrder) -> str:
        if order.error is not None:
            return "invalid"
        statuses = [self._authz_status(self.authorizations[a]) for a in order.authz_ids]
        if any(s in ("invalid", "deactivated", "revoked") for s in statuses):
            return "invalid"
        if order.finalized:
            return "processing" if order.processing_polls_left > 0 else "valid"
        # Boulder: an order whose authorization, or itself, expired unfinalized is invalid.
        if "expired" in statuses or order.expires <= self.now():
            return "invalid"
        if all(s == "valid" for s in statuses):
            return "ready"
        return "pending"

    def _order_json(self, order: FakeOrder) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self._order_status(order),
            "expires": _rfc3339(order.expires),
            "identifiers": [{"type": "dns", "value": v} for v in order.identifiers],
            "authorizations": [self._url(f"/authz/{a}") for a in order.authz_ids],
            "finalize": self._url(f"/finalize/{order.id}"),
        }
        if order.profile is not None:
            body["profile"] = order.profile
        if order.replaces is not None:
            body["replaces"] = order.replaces
        if body["status"] == "valid":
            body["certificate"] = self._url(f"/cert/{order.certificate_id}")
        if order.error is not None:
            body["error"] = order.error
        return body

    def _authz_json(self, authz: FakeAuthorization) -> dict[str, Any]:
        body = self._authz_body(authz)
        if body["status"] == "valid":
            # Boulder shows a valid authorization with the one challenge that validated it.
            body["challenges"] = [c for c in body["challenges"] if c["type"] == authz.validated_by]
        return body

    def _authz_body(self, authz: FakeAuthorization) -> dict[str, Any]:
        challenge: dict[str, Any] = {
            "type": "dns-01",
            "url": self._url(f"/chall/{authz.id}"),
            "status": authz.challenge_status,
            "token": authz.token,
        }
        if authz.error is not None:
            challenge["error"] = authz.error
        if authz.validated is not None:
            challenge["validated"] = _rfc3339(authz.validated)
        extras = [
            {**extra, "url": self._url(f"/chall/{authz.id}/{n}")}
            for n, extra in enumerate(self.extra_challenges)
        ]
        for extra in extras:
            if extra["type"] == authz.validated_by and authz.validated is not None:
                extra.update(status="valid", validated=_rfc3339(authz.validated))
        body: dict[str, Any] = {
            "status": self._authz_status(authz),
            "expires": _rfc3339(authz.expires),
            "identifier": {"type": "dns", "value": authz.identifier},
            "challenges": [*extras, challenge],
        }
        if authz.wildcard:
            body["wildcard"] = True
        return body

    # -- handlers -------------------------------------------------------------------------------

    async def _directory(self, request: web.Request) -> web.Response:
        meta: dict[str, Any] = {
            "termsOfService": self._url("/terms"),
            "website": "https://example.invalid/fake-acme",
        }
        if self.profiles:
            meta["profiles"] = self.profiles
        body: dict[str, Any] = {
            "newNonce": self._url("/new-nonce"),
            "newAccount": self._url("/new-account"),
            "newOrder": self._url("/new-order"),
            "revokeCert": self._url("/revoke-cert"),
            "keyChange": self._url("/key-change"),
            "meta": meta,
        }
        if self.ari:
            body["renewalInfo"] = self._url("/renewal-info")
        return web.json_response(body)

    async def _new_nonce(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.method == "HEAD" else 204)

    async def _new_account(self, request: web.Request) -> web.Response:
        payload, _account, jwk = await self._signed(request, allow_jwk=True)
        if not isinstance(payload, dict):
            raise Problem(400, "malformed", "newAccount payload must be an object")
        existing = self._account_by_thumbprint(_thumbprint(jwk))
        if existing is not None:
            return web.json_response(
                self._account_json(existing),
                status=200,
                headers={"Location": self._url(f"/account/{existing.id}")},
            )
        if payload.get("onlyReturnExisting"):
            raise Problem(400, "accountDoesNotExist", "no account exists with the provided key")
        account = FakeAccount(
            secrets.token_hex(8), dict(jwk), contact=list(payload.get("contact", []))
        )
        self.accounts[account.id] = account
        return web.json_response(
            self._account_json(account),
            status=201,
            headers={"Location": self._url(f"/account/{account.id}")},
        )

    async def _account(self, request: web.Request) -> web.Response:
        payload, account, _jwk = await self._signed(request)
        assert account is not None
        if account.id != request.match_info["id"]:
            raise Problem(403, "unauthorized", "not your account")
        if isinstance(payload, dict) and payload.get("status") == "deactivated":
            account.status = "deactivated"
        return web.json_response(self._account_json(account))

    async def _key_change(self, request: web.Request) -> web.Response:
        inner, account, _jwk = await self._signed(request)
        assert account is not None
        try:
            header = json.loads(_unb64(inner["protected"]))
            signing_input = f"{inner['protected']}.{inner['payload']}".encode()
            body = json.loads(_unb64(inner["payload"]))
            new_jwk = header["jwk"]
            ok = _verify(new_jwk, header["alg"], signing_input, _unb64(inner["signature"]))
        except (KeyError, TypeError, ValueError):
            raise Problem(400, "malformed", "inner JWS is malformed") from None
        if not ok or header.get("url") != self._url("/key-change"):
            raise Problem(400, "malformed", "inner JWS does not verify")
        old_key = body.get("oldKey") if isinstance(body, dict) else None
        try:
            old_key_matches = isinstance(old_key, dict) and _thumbprint(old_key) == _thumbprint(
                account.jwk
            )
        except KeyError:
            old_key_matches = False
        if body.get("account") != self._url(f"/account/{account.id}") or not old_key_matches:
            raise Problem(400, "malformed", "keyChange names another account or old key")
        if self._account_by_thumbprint(_thumbprint(new_jwk)) is not None:
            raise Problem(409, "malformed", "new key already in use")
        account.jwk = dict(new_jwk)
        return web.json_response(self._account_json(account))

    async def _new_order(self, request: web.Request) -> web.Response:
        payload, account, _jwk = await self._signed(request)
        assert account is not None
        if (
            not isinstance(payload, dict)
            or not isinstance(payload.get("identifiers"), list)
            or not payload["identifiers"]
        ):
            raise Problem(400, "malformed", "newOrder needs identifiers")
        values = []
        for ident in payload["identifiers"]:
            if (
                not isinstance(ident, dict)
                or ident.get("type") != "dns"
                or not isinstance(ident.get("value"), str)
            ):
                raise Problem(400, "unsupportedIdentifier", "only dns identifiers")
            values.append(ident["value"].lower())
        identifiers = tuple(sorted(set(values)))
        profile = payload.get("profile")
        if profile is not None and profile not in self.profiles:
            raise Problem(400, "invalidProfile", f"profile {profile!r} is not offered")
        replaces = payload.get("replaces")
        now = self.now()
        if self.order_reuse:
            for order in self.orders.values():
                if (
                    order.account_id == account.id
                    and order.identifiers == identifiers
                    and order.profile == profile
                    and order.replaces == replaces
                    and self._order_status(order) in ("pending", "ready")
                ):
                    return web.json_response(
                        self._order_json(order),
                        status=201,
                        headers={"Location": self._url(f"/order/{order.id}")},
                    )
        if replaces is not None:
            self._check_replaces(replaces, account, identifiers, now)
        order = FakeOrder(
            id=secrets.token_hex(8),
            account_id=account.id,
            identifiers=identifiers,
            authz_ids=[],
            expires=now + ORDER_LIFETIMES.get(profile or "", DEFAULT_PENDING_LIFETIME),
            profile=profile,
            replaces=replaces,
        )
        for value in identifiers:
            wildcard = value.startswith("*.")
            authz = FakeAuthorization(
                id=secrets.token_hex(8),
                account_id=account.id,
                identifier=value[2:] if wildcard else value,
                wildcard=wildcard,
                token=_b64(secrets.token_bytes(32)),
                expires=now + PENDING_AUTHZ_LIFETIMES.get(profile or "", DEFAULT_PENDING_LIFETIME),
            )
            if self.standing_validation is not None:
                authz.status = "valid"
                authz.validated, authz.validated_by = now, self.standing_validation
                authz.expires = now + VALID_AUTHZ_LIFETIME
            self.authorizations[authz.id] = authz
            order.authz_ids.append(authz.id)
        self.orders[order.id] = order
        if replaces is not None:
            self.replaced_by[replaces] = order.id
        return web.json_response(
            self._order_json(order),
            status=201,
            headers={"Location": self._url(f"/order/{order.id}")},
        )

    def _check_replaces(
        self, replaces: Any, account: FakeAccount, identifiers: tuple[str, ...], now: datetime
    ) -> None:
        issued = self.certificates.get(replaces) if isinstance(replaces, str) else None
        if issued is None or issued.certificate.not_valid_after_utc <= now:
            raise Problem(
                404,
                "malformed",
                f"unknown or expired certificate {str(replaces)[:60]!r} in replaces",
            )
        if issued.account_id != account.id:
            raise Problem(
                403, "unauthorized", "this account did not request the certificate it replaces"
            )
        san = issued.certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        if not set(san.get_values_for_type(x509.DNSName)) & set(identifiers):
            raise Problem(
                400, "malformed", "the replacement shares no identifier with the certificate"
            )
        previous = self.replaced_by.get(replaces)
        if previous is not None and self._order_status(self.orders[previous]) != "invalid":
            raise Problem(
                409, "alreadyReplaced", f"certificate {replaces} already has a replacement order"
            )

    def _own_order(self, account: FakeAccount | None, order_id: str) -> FakeOrder:
        order = self.orders.get(order_id)
        if order is None or account is None or order.account_id != account.id:
            raise Problem(404, "malformed", "no such order")
        return order

    async def _order(self, request: web.Request) -> web.Response:
        payload, account, _jwk = await self._signed(request)
        if payload is not None:
            raise Problem(400, "malformed", "order fetch must be POST-as-GET")
        order = self._own_order(account, request.match_info["id"])
        if not order.finalized:
            for authz_id in order.authz_ids:
                self._poll_validation(self.authorizations[authz_id])
        body = self._order_json(order)
        headers = {}
        if body["status"] == "pending" and self.authz_retry_after is not None:
            headers["Retry-After"] = self.authz_retry_after
        if body["status"] == "processing":
            order.processing_polls_left -= 1
            if self.order_retry_after is not None:
                headers["Retry-After"] = self.order_retry_after
        return web.json_response(body, headers=headers)

    def _poll_validation(self, authz: FakeAuthorization) -> None:
        """A poll of the authorization, or of its order: the validation in progress ends
        after ``authz_pending_polls`` of them (a CA validates whichever the client polls)."""
        if authz.status == "pending" and authz.challenge_status == "processing":
            if authz.pending_polls_left > 0:
                authz.pending_polls_left -= 1
            else:
                authz.status = authz.challenge_status = "valid"
                authz.validated = self.now()
                authz.expires = authz.validated + VALID_AUTHZ_LIFETIME

    async def _authz(self, request: web.Request) -> web.Response:
        payload, account, _jwk = await self._signed(request)
        authz = self.authorizations.get(request.match_info["id"])
        if authz is None or account is None or authz.account_id != account.id:
            raise Problem(404, "malformed", "no such authorization")
        if payload is not None:
            raise Problem(400, "malformed", "authorization fetch must be POST-as-GET")
        self._refuse_expired(authz)
        headers = {}
        if authz.status == "pending":
            self._poll_validation(authz)
            if authz.status == "pending" and self.authz_retry_after is not None:
                headers["Retry-After"] = self.authz_retry_after
        return web.json_response(self._authz_json(authz), headers=headers)

    async def _challenge(self, request: web.Request) -> web.Response:
        payload, account, _jwk = await self._signed(request)
        authz = self.authorizations.get(request.match_info["id"])
        if authz is None or account is None or authz.account_id != account.id:
            raise Problem(404, "malformed", "no such challenge")
        self._refuse_expired(authz)
        if request.match_info.get("extra") is not None:
            raise Problem(400, "malformed", "this fake validates dns-01 only")
        if (
            payload is not None
            and authz.challenge_status == "pending"
            and authz.status == "pending"
        ):
            expected = _b64(
                hashlib.sha256(f"{authz.token}.{_thumbprint(account.jwk)}".encode()).digest()
            )
            ok = (
                await self.validator(authz.identifier, expected)
                if self.validator is not None
                else True
            )
            if ok:
                authz.challenge_status = "processing"
                authz.pending_polls_left = self.authz_pending_polls
            else:
                # Boulder validates once: a failure makes the authorization (and order) invalid.
                authz.status = authz.challenge_status = "invalid"
                authz.error = {
                    "type": ERR + "unauthorized",
                    "detail": f"Incorrect TXT record found at _acme-challenge.{authz.identifier}",
                    "status": 403,
                }
        challenge = self._authz_json(authz)["challenges"][-1]
        headers = {"Link": f'<{self._url(f"/authz/{authz.id}")}>;rel="up"'}
        return web.json_response(challenge, headers=headers)

    def _refuse_expired(self, authz: FakeAuthorization) -> None:
        # Boulder: "After expiring, authorizations are inaccessible" -- 404 for the
        # authorization and its challenges, whatever their status was.
        if authz.expires <= self.now():
            raise Problem(404, "malformed", f"Expired authorization {authz.id}")

    async def _finalize(self, request: web.Request) -> web.Response:
        payload, account, _jwk = await self._signed(request)
        order = self._own_order(account, request.match_info["id"])
        status = self._order_status(order)
        if status != "ready":
            raise Problem(403, "orderNotReady", f"order is {status}, not ready")
        try:
            csr = x509.load_der_x509_csr(_unb64(payload["csr"]))
        except (KeyError, TypeError, ValueError):
            raise Problem(400, "badCSR", "CSR is not a base64url DER CSR") from None
        if not csr.is_signature_valid:
            raise Problem(400, "badCSR", "CSR signature is invalid")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise Problem(400, "badCSR", "CSR has no SAN") from None
        names = tuple(sorted(set(san.get_values_for_type(x509.DNSName))))
        if names != order.identifiers:
            raise Problem(
                400, "badCSR", f"CSR names {names} differ from the order's {order.identifiers}"
            )
        issued = self._issue(order, csr)
        order.finalized = True
        order.certificate_id = issued.cert_id
        order.processing_polls_left = self.order_processing_polls
        headers = {"Location": self._url(f"/order/{order.id}")}
        if self._order_status(order) == "processing" and self.order_retry_after is not None:
            headers["Retry-After"] = self.order_retry_after
        return web.json_response(self._order_json(order), headers=headers)

    async def _certificate(self, request: web.Request) -> web.Response:
        _payload, account, _jwk = await self._signed(request)
        issued = self.certificates.get(request.match_info["id"])
        if issued is None or account is None or issued.account_id != account.id:
            raise Problem(404, "malformed", "no such certificate")
        alternate = request.match_info.get("alternate")
        if alternate is not None:
            if not alternate.isdigit() or int(alternate) >= len(issued.alternates):
                raise Problem(404, "malformed", "no such alternate chain")
            pem = issued.alternates[int(alternate)]
        else:
            pem = issued.pem_chain
        response = web.Response(text=pem, content_type="application/pem-certificate-chain")
        base = self._url(f"/cert/{issued.cert_id}")
        links = [f'<{base}>;rel="alternate"'] if alternate is not None else []
        links += [
            f'<{base}/{n}>;rel="alternate"'
            for n in range(len(issued.alternates))
            if str(n) != alternate
        ]
        for link in links:
            response.headers.add("Link", link)
        return response

    async def _revoke(self, request: web.Request) -> web.Response:
        payload, account, jwk = await self._signed(request, allow_jwk=True)
        try:
            cert = x509.load_der_x509_certificate(_unb64(payload["certificate"]))
        except (KeyError, TypeError, ValueError):
            raise Problem(400, "malformed", "certificate is not base64url DER") from None
        issued = next((c for c in self.certificates.values() if c.certificate == cert), None)
        if issued is None:
            raise Problem(404, "malformed", "certificate not issued here")
        if account is not None:
            if issued.account_id != account.id:
                raise Problem(403, "unauthorized", "this account did not issue the certificate")
        elif _thumbprint(jwk) != _thumbprint(_jwk_of(cert.public_key())):
            raise Problem(403, "unauthorized", "JWK is not the certificate's key")
        if issued.revoked:
            raise Problem(400, "alreadyRevoked", "certificate already revoked")
        reason = payload.get("reason", 0)
        if reason not in (0, 1, 3, 4, 5, 9):
            raise Problem(400, "badRevocationReason", f"reason {reason!r} not accepted")
        issued.revoked_reason = reason
        return web.Response(status=200)

    async def _renewal_info(self, request: web.Request) -> web.Response:
        if not self.ari:
            raise Problem(404, "malformed", "no ARI here")
        cert_id = request.match_info["cert_id"]
        issued = self.certificates.get(cert_id)
        if issued is None:
            raise Problem(404, "malformed", "unknown certificate")
        window = self.windows.get(cert_id)
        if window is None:
            cert = issued.certificate
            if issued.revoked:
                start = self.now() - timedelta(hours=2)
                end = self.now() - timedelta(hours=1)
            else:
                lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
                start = cert.not_valid_before_utc + lifetime * 2 / 3
                end = start + lifetime / 6
            window = RenewalWindow(start, end, self.ari_retry_after)
        body: dict[str, Any] = {
            "suggestedWindow": {"start": _rfc3339(window.start), "end": _rfc3339(window.end)}
        }
        if window.explanation_url is not None:
            body["explanationURL"] = window.explanation_url
        headers = {"Retry-After": window.retry_after} if window.retry_after is not None else {}
        return web.json_response(body, headers=headers)


def _endpoint(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return _ENDPOINTS.get(resource.canonical, "unknown") if resource is not None else "unknown"


_ENDPOINTS = {
    "/directory": "directory",
    "/new-nonce": "newNonce",
    "/new-account": "newAccount",
    "/account/{id}": "account",
    "/new-order": "newOrder",
    "/order/{id}": "order",
    "/authz/{id}": "authz",
    "/chall/{id}": "challenge",
    "/chall/{id}/{extra}": "challenge",
    "/finalize/{id}": "finalize",
    "/cert/{id}": "certificate",
    "/cert/{id}/{alternate}": "certificate",
    "/revoke-cert": "revokeCert",
    "/key-change": "keyChange",
    "/renewal-info/{cert_id}": "renewalInfo",
}
