"""The pure ACME core against published vectors and independent computations: JWK thumbprint
(RFC 7638), CertID (RFC 9773), DNS-01 value, JWS signing, EAB, key change, CSR, Retry-After,
Link headers, problem classification and defensive parsing of server data."""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from autotls.acme import (
    AccountDoesNotExist,
    AcmeInputError,
    AcmeNetworkError,
    AcmeProblem,
    AcmeProtocolError,
    AlreadyReplaced,
    Authorization,
    BadNonce,
    CertificateChain,
    Directory,
    ExternalAccountBinding,
    InvalidProfile,
    Malformed,
    Order,
    RateLimited,
    RenewalInfo,
    cert_id,
    dns01_value,
    dump_account_key,
    generate_account_key,
    generate_certificate_key,
    jwk_thumbprint,
    key_authorization,
    load_account_key,
    make_csr,
    parse_retry_after,
)
from autotls.acme.jws import (
    acme_request,
    b64url_decode,
    external_account_binding,
    key_change_inner,
    public_jwk,
    public_key_from_jwk,
    verify_jws,
)
from autotls.acme.messages import Challenge, parse_link_header, parse_rfc3339
from autotls.acme.problems import classify, error_for_response, problem_from_document
from autotls.fsm.errors import ErrorClass

B36 = "k51qzi5uqu5dgy8qsq67hbz73jqkw87l3fgf4a91qb0d9b5173tir7n4vxk1oe"
WILDCARD = f"*.{B36}.libp2p.direct"

# RFC 7638 §3.1: the example RSA key and its published thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

# RFC 9773 Appendix A: the example certificate (validity in year 1, EC P-256 key) and §4.1's
# CertID for it: AKI keyIdentifier 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4,
# serial 0x87654321 (DER content 00 87 65 43 21).
RFC9773_CERT = b"""-----BEGIN CERTIFICATE-----
MIIBQzCB66ADAgECAgUAh2VDITAKBggqhkjOPQQDAjAVMRMwEQYDVQQDEwpFeGFt
cGxlIENBMCIYDzAwMDEwMTAxMDAwMDAwWhgPMDAwMTAxMDEwMDAwMDBaMBYxFDAS
BgNVBAMTC2V4YW1wbGUuY29tMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEeBZu
7cbpAYNXZLbbh8rNIzuOoqOOtmxA1v7cRm//AwyMwWxyHz4zfwmBhcSrf47NUAFf
qzLQ2PPQxdTXREYEnKMjMCEwHwYDVR0jBBgwFoAUaYhba4dGQEHhs3uEe6CuLN4B
yNQwCgYIKoZIzj0EAwIDRwAwRAIge09+S5TZAlw5tgtiVvuERV6cT4mfutXIlwTb
+FYN/8oCIClDsqBklhB9KAelFiYt9+6FDj3z4KGVelYM5MdsO3pK
-----END CERTIFICATE-----
"""
RFC9773_CERT_ID = "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- thumbprint, DNS-01 -------------------------------------------------------------------------


def test_rfc7638_thumbprint_of_the_example_jwk() -> None:
    assert jwk_thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT


def test_thumbprint_of_a_key_equals_that_of_its_jwk() -> None:
    public = public_key_from_jwk(RFC7638_JWK)
    assert jwk_thumbprint(public) == RFC7638_THUMBPRINT
    assert public_jwk(public) == {k: RFC7638_JWK[k] for k in ("e", "kty", "n")}


def test_thumbprint_of_an_ec_key_matches_a_hand_built_canonical_form() -> None:
    key = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    canonical = (
        '{"crv":"P-256","kty":"EC",'
        f'"x":"{b64(numbers.x.to_bytes(32, "big"))}","y":"{b64(numbers.y.to_bytes(32, "big"))}"}}'
    )
    assert jwk_thumbprint(key) == b64(hashlib.sha256(canonical.encode()).digest())


def test_thumbprint_rejects_incomplete_jwk() -> None:
    with pytest.raises(AcmeInputError, match="'n'"):
        jwk_thumbprint({"kty": "RSA", "e": "AQAB"})
    with pytest.raises(AcmeInputError, match="kty"):
        jwk_thumbprint({"kty": "oct", "k": "abc"})


def test_dns01_value_vector() -> None:
    token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
    public = public_key_from_jwk(RFC7638_JWK)
    # Independent computation: SHA-256 over "token.thumbprint", base64url without padding.
    expected = b64(hashlib.sha256(f"{token}.{RFC7638_THUMBPRINT}".encode()).digest())
    assert key_authorization(token, public) == f"{token}.{RFC7638_THUMBPRINT}"
    assert dns01_value(token, public) == expected
    assert dns01_value(token, public) == "ZTRx1Ckl1-tM05o5zaizTTA0yUy5AGereMgSNWC6Ll8"
    assert len(expected) == 43


def test_dns01_value_rejects_a_token_that_is_not_base64url() -> None:
    with pytest.raises(AcmeProtocolError, match="token"):
        dns01_value("not a token!", generate_account_key())


# -- keys -----------------------------------------------------------------------------------


def test_account_key_roundtrip_and_new_keys_are_p256() -> None:
    key = generate_account_key()
    assert key.curve.name == "secp256r1"
    loaded = load_account_key(dump_account_key(key))
    assert jwk_thumbprint(loaded) == jwk_thumbprint(key)
    assert dump_account_key(key).startswith(b"-----BEGIN PRIVATE KEY-----")


def test_rsa_and_ed25519_account_keys_load() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    traditional = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert isinstance(load_account_key(traditional), rsa.RSAPrivateKey)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    assert isinstance(load_account_key(dump_account_key(ed_key)), ed25519.Ed25519PrivateKey)


def test_unusable_account_keys_are_rejected_clearly() -> None:
    with pytest.raises(AcmeInputError, match="PEM"):
        load_account_key(b"not a key")
    encrypted = generate_account_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(AcmeInputError, match="unencrypted"):
        load_account_key(encrypted)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(AcmeInputError, match="2048"):
        load_account_key(dump_pem(small))
    k1 = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(AcmeInputError, match="curve"):
        load_account_key(dump_pem(k1))


def dump_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


# -- JWS ------------------------------------------------------------------------------------


def _independent_verify(jws: dict[str, str], key: Any) -> tuple[dict[str, Any], bytes]:
    """Verify with cryptography directly, not with autotls.acme.jws."""
    header = json.loads(unb64(jws["protected"]))
    signing_input = f"{jws['protected']}.{jws['payload']}".encode()
    signature = unb64(jws["signature"])
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        size = (public.curve.key_size + 7) // 8
        der = encode_dss_signature(
            int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        )
        digest = {32: hashes.SHA256(), 48: hashes.SHA384(), 66: hashes.SHA512()}[size]
        public.verify(der, signing_input, ec.ECDSA(digest))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        public.verify(signature, signing_input)
    return header, unb64(jws["payload"])


@pytest.mark.parametrize(
    ("make_key", "alg"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
    ],
)
def test_what_we_sign_verifies(make_key: Any, alg: str) -> None:
    key = make_key()
    jws = acme_request(
        key, url="https://ca.test/new-order", nonce="n0nce", payload={"a": 1}, kid="https://k"
    )
    header, payload = _independent_verify(jws, key)
    assert header == {
        "alg": alg,
        "kid": "https://k",
        "nonce": "n0nce",
        "url": "https://ca.test/new-order",
    }
    assert json.loads(payload) == {"a": 1}
    assert verify_jws(jws, key.public_key()).json() == {"a": 1}


def test_jwk_requests_embed_the_public_key_and_post_as_get_has_empty_payload() -> None:
    key = generate_account_key()
    jws = acme_request(key, url="https://ca.test/acct", nonce="n", payload=None, kid=None)
    header, payload = _independent_verify(jws, key)
    assert "kid" not in header
    assert header["jwk"] == public_jwk(key)
    assert "d" not in header["jwk"]
    assert payload == b""
    assert jws["payload"] == ""


def test_a_tampered_jws_does_not_verify() -> None:
    key = generate_account_key()
    jws = acme_request(key, url="https://ca.test/x", nonce="n", payload={"a": 1}, kid="k")
    jws["payload"] = b64(b'{"a":2}')
    with pytest.raises(AcmeInputError, match="does not verify"):
        verify_jws(jws, key.public_key())
    with pytest.raises(AcmeInputError, match="does not verify"):
        verify_jws(
            acme_request(key, url="u", nonce="n", payload={}, kid="k"),
            generate_account_key().public_key(),
        )


def test_external_account_binding_structure() -> None:
    account_key = generate_account_key()
    hmac_key = bytes(range(32))
    eab = ExternalAccountBinding.from_base64url("kid-1", b64(hmac_key))
    assert "hmac_key" not in repr(eab)
    binding = external_account_binding(eab, account_key, "https://ca.test/new-account")
    protected = json.loads(unb64(binding["protected"]))
    assert protected == {"alg": "HS256", "kid": "kid-1", "url": "https://ca.test/new-account"}
    assert "nonce" not in protected
    assert json.loads(unb64(binding["payload"])) == public_jwk(account_key)
    mac = hmac.new(hmac_key, f"{binding['protected']}.{binding['payload']}".encode(), "sha256")
    assert unb64(binding["signature"]) == mac.digest()


def test_eab_key_must_be_base64url() -> None:
    with pytest.raises(AcmeInputError, match="base64url"):
        ExternalAccountBinding.from_base64url("kid", "not/base64+url")


def test_key_change_inner_jws() -> None:
    old, new = generate_account_key(), generate_account_key()
    inner = key_change_inner(
        new, old, account_url="https://ca.test/acct/1", url="https://ca.test/kc"
    )
    header, payload = _independent_verify(inner, new)
    assert header == {"alg": "ES256", "jwk": public_jwk(new), "url": "https://ca.test/kc"}
    assert json.loads(payload) == {"account": "https://ca.test/acct/1", "oldKey": public_jwk(old)}


def test_strict_base64url() -> None:
    assert b64url_decode("AQAB") == b"\x01\x00\x01"
    for bad in ("AQAB=", "a+b/", "a"):
        with pytest.raises(ValueError, match="base64url"):
            b64url_decode(bad)


# -- CSR and CertID -----------------------------------------------------------------------------


def test_csr_has_an_empty_subject_and_exactly_the_san() -> None:
    assert len(WILDCARD) == 78
    key = generate_certificate_key()
    csr = x509.load_der_x509_csr(make_csr(key, [WILDCARD.upper()]))
    assert csr.is_signature_valid
    assert len(csr.subject) == 0
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [WILDCARD]
    assert len(list(csr.extensions)) == 1
    assert csr.public_key() == key.public_key()


def test_csr_rejects_bad_names() -> None:
    key = generate_certificate_key()
    for bad in (
        [],
        ["localhost"],
        ["a..b.example"],
        ["-bad.example"],
        ["x" * 64 + ".example"],
        ["*.*.example.com"],
    ):
        with pytest.raises(AcmeInputError):
            make_csr(key, bad)
    with pytest.raises(AcmeInputError, match="sequence"):
        make_csr(key, "example.com")


def test_rfc9773_cert_id_example() -> None:
    cert = x509.load_pem_x509_certificate(RFC9773_CERT)
    assert cert_id(cert) == RFC9773_CERT_ID


def _cert(serial: int, *, aki: bool = True) -> x509.Certificate:
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(issuer_key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
    )
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(b"\x01\x02\x03", None, None), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def test_cert_id_serial_keeps_der_leading_zero_only_when_needed() -> None:
    aki = b64(bytes([1, 2, 3]))
    assert cert_id(_cert(0x7F)) == f"{aki}.{b64(bytes([0x7F]))}"
    assert cert_id(_cert(0x80)) == f"{aki}.{b64(bytes([0x00, 0x80]))}"


def test_cert_id_without_aki_is_an_input_error() -> None:
    with pytest.raises(AcmeInputError, match="Authority Key Identifier"):
        cert_id(_cert(5, aki=False))


# -- Retry-After, timestamps, Link ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 30 ", 30.0),
        ("0", 0.0),
        ("Sun, 01 Mar 2026 12:01:30 GMT", 90.0),
        ("Sun, 01 Mar 2026 11:00:00 GMT", 0.0),  # in the past: no wait
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("Mon, 99 Foo 2026 99:99:99 GMT", None),
        ("9" * 5000, None),  # beyond int() limits: garbage, not a crash
        ("99999999999999999999", 1e20),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_rfc3339_parsing() -> None:
    assert parse_rfc3339("2026-03-01T12:00:00Z") == NOW
    assert parse_rfc3339("2026-03-01T12:00:00.123456789Z") == NOW.replace(microsecond=123456)
    assert parse_rfc3339("2026-03-01T14:00:00+02:00") == NOW
    for bad in ("2026-03-01", "2026-13-01T00:00:00Z", "yesterday", "2026-03-01T12:00:00"):
        assert parse_rfc3339(bad) is None


def test_link_header_parsing() -> None:
    links = parse_link_header(
        [
            '<https://ca.test/cert/1/alt/1>;rel="alternate", </dir>;rel=index',
            '<https://ca.test/cert/1/alt/2>; title="a, b; c"; rel="alternate up"',
            "garbage without brackets",
            '<https://ca.test/x>; norel="1"',
        ],
        "https://ca.test/cert/1",
    )
    assert [(link.url, link.rel) for link in links] == [
        ("https://ca.test/cert/1/alt/1", "alternate"),
        ("https://ca.test/dir", "index"),
        ("https://ca.test/cert/1/alt/2", "alternate"),
        ("https://ca.test/cert/1/alt/2", "up"),
    ]
    assert links[2].params["title"] == "a, b; c"


# -- problems -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "expected"),
    [
        ("badNonce", 400, ErrorClass.TRANSIENT),
        ("serverInternal", 500, ErrorClass.TRANSIENT),
        ("orderNotReady", 403, ErrorClass.TRANSIENT),
        ("rateLimited", 429, ErrorClass.RATE_LIMITED),
        ("rateLimited", None, ErrorClass.RATE_LIMITED),
        ("malformed", 429, ErrorClass.RATE_LIMITED),
        ("alreadyReplaced", 409, ErrorClass.ORDER_INVALID),
        ("dns", 400, ErrorClass.ORDER_INVALID),
        ("incorrectResponse", 403, ErrorClass.ORDER_INVALID),
        ("caa", 403, ErrorClass.ORDER_INVALID),
        ("unauthorized", 403, ErrorClass.PERMANENT),
        ("accountDoesNotExist", 400, ErrorClass.PERMANENT),
        ("malformed", 400, ErrorClass.PERMANENT),
        ("invalidProfile", 400, ErrorClass.PERMANENT),
        ("badPublicKey", 400, ErrorClass.PERMANENT),
        ("externalAccountRequired", 403, ErrorClass.PERMANENT),
        ("userActionRequired", 403, ErrorClass.PERMANENT),
        ("somethingNew", 400, ErrorClass.TRANSIENT),
        ("somethingNew", 503, ErrorClass.TRANSIENT),
    ],
)
def test_classification_table(kind: str, status: int | None, expected: ErrorClass) -> None:
    assert classify(f"urn:ietf:params:acme:error:{kind}", status) is expected
    problem = problem_from_document({"type": f"urn:ietf:params:acme:error:{kind}"}, status=status)
    assert problem.error_class is expected
    assert problem.kind == kind


def test_problem_documents_become_typed_errors() -> None:
    document = {
        "type": "urn:ietf:params:acme:error:rateLimited",
        "detail": "too many certificates",
        "instance": "https://ca.test/docs/rate-limits",
    }
    problem = problem_from_document(
        document, status=429, retry_after=3600.0, url="https://ca.test/o"
    )
    assert isinstance(problem, RateLimited)
    assert (problem.status, problem.retry_after, problem.instance) == (
        429,
        3600.0,
        document["instance"],
    )
    assert problem.problem == document
    assert "too many certificates" in str(problem)
    for kind, cls in [
        ("badNonce", BadNonce),
        ("accountDoesNotExist", AccountDoesNotExist),
        ("alreadyReplaced", AlreadyReplaced),
        ("invalidProfile", InvalidProfile),
        ("malformed", Malformed),
    ]:
        assert type(problem_from_document({"type": f"urn:ietf:params:acme:error:{kind}"})) is cls
    other = problem_from_document({"type": "https://ca.test/problems/odd", "status": 418})
    assert type(other) is AcmeProblem
    assert (other.kind, other.status) == (None, 418)


def test_compound_problem_takes_the_most_severe_subproblem() -> None:
    document = {
        "type": "urn:ietf:params:acme:error:compound",
        "detail": "several",
        "subproblems": [
            {
                "type": "urn:ietf:params:acme:error:dns",
                "detail": "no TXT",
                "identifier": {"type": "dns", "value": "a.example"},
            },
            {
                "type": "urn:ietf:params:acme:error:rejectedIdentifier",
                "detail": "no",
                "identifier": {"type": "dns", "value": "b.example"},
            },
        ],
    }
    problem = problem_from_document(document, status=400)
    assert problem.error_class is ErrorClass.PERMANENT
    assert [(s.kind, s.identifier) for s in problem.subproblems] == [
        ("dns", {"type": "dns", "value": "a.example"}),
        ("rejectedIdentifier", {"type": "dns", "value": "b.example"}),
    ]
    only_dns = dict(document, subproblems=document["subproblems"][:1])
    assert problem_from_document(only_dns).error_class is ErrorClass.ORDER_INVALID


def test_malformed_problem_documents_are_protocol_errors() -> None:
    with pytest.raises(AcmeProtocolError, match="not an object"):
        problem_from_document(["x"])
    with pytest.raises(AcmeProtocolError, match="detail"):
        problem_from_document({"type": "urn:ietf:params:acme:error:malformed", "detail": 5})
    with pytest.raises(AcmeProtocolError, match=r"subproblems\[0\]"):
        problem_from_document({"type": "t", "subproblems": [{"type": 1}]})


def test_error_for_response_without_problem_document() -> None:
    html = b"<html>bad gateway</html>"
    down = error_for_response(503, "text/html", html, retry_after=120.0, url="https://ca.test/x")
    assert isinstance(down, AcmeNetworkError)
    assert (down.status, down.retry_after, down.error_class) == (503, 120.0, ErrorClass.TRANSIENT)
    limited = error_for_response(429, "text/plain", b"slow down", retry_after=60.0, url="u")
    assert isinstance(limited, RateLimited)
    assert limited.error_class is ErrorClass.RATE_LIMITED
    assert limited.retry_after == 60.0
    odd = error_for_response(404, "text/html", html, retry_after=None, url="u")
    assert isinstance(odd, AcmeProtocolError)
    assert odd.error_class is ErrorClass.TRANSIENT
    deep = b"[" * 100_000 + b"]" * 100_000
    nested = error_for_response(500, "application/json", deep, retry_after=None, url="u")
    assert isinstance(nested, AcmeNetworkError)
    typed = error_for_response(
        400,
        "application/problem+json",
        b'{"type":"urn:ietf:params:acme:error:badNonce"}',
        retry_after=None,
        url="u",
    )
    assert isinstance(typed, BadNonce)


# -- resources from hostile servers -------------------------------------------------------------

DIRECTORY = {
    "newNonce": "https://ca.test/nonce",
    "newAccount": "https://ca.test/acct",
    "newOrder": "https://ca.test/order",
    "revokeCert": "https://ca.test/revoke",
    "keyChange": "https://ca.test/kc",
    "renewalInfo": "https://ca.test/ari",
    "meta": {
        "termsOfService": "https://ca.test/tos",
        "profiles": {"classic": "c"},
        "externalAccountRequired": True,
    },
}

ORDER = {
    "status": "pending",
    "expires": "2026-03-08T12:00:00Z",
    "identifiers": [{"type": "dns", "value": WILDCARD}],
    "authorizations": ["https://ca.test/authz/1"],
    "finalize": "https://ca.test/finalize/1",
}


def test_directory_parses_meta() -> None:
    directory = Directory.parse(DIRECTORY)
    assert directory.renewal_info == "https://ca.test/ari"
    assert directory.profiles == {"classic": "c"}
    assert directory.external_account_required
    assert directory.terms_of_service == "https://ca.test/tos"
    bare = Directory.parse({k: v for k, v in DIRECTORY.items() if k not in ("meta", "renewalInfo")})
    assert (bare.renewal_info, bare.profiles, bare.external_account_required) == (None, {}, False)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("newNonce"), "'newNonce' must be a non-empty string, got missing"),
        (lambda d: d.update(newOrder=42), "'newOrder' must be a non-empty string, got a int"),
        (lambda d: d.update(meta=[]), "'meta' must be an object"),
        (lambda d: d["meta"].update(profiles={"x": 1}), "profile 'x'"),
        (
            lambda d: d["meta"].update(externalAccountRequired="yes"),
            "'externalAccountRequired' must be a boolean",
        ),
    ],
)
def test_bad_directories_name_the_field(mutate: Any, message: str) -> None:
    data = json.loads(json.dumps(DIRECTORY))
    mutate(data)
    with pytest.raises(AcmeProtocolError, match=message.replace("(", r"\(")):
        Directory.parse(data, url="https://ca.test/dir")


def test_order_parses() -> None:
    order = Order.parse(
        dict(ORDER, profile="classic", replaces="a.b"), "https://ca.test/o/1", retry_after=3.0
    )
    assert order.expires == datetime(2026, 3, 8, 12, tzinfo=UTC)
    assert order.identifiers[0].value == WILDCARD
    assert (order.profile, order.replaces, order.retry_after) == ("classic", "a.b", 3.0)
    assert order.problem() is None
    failed = Order.parse(
        dict(
            ORDER,
            status="invalid",
            error={"type": "urn:ietf:params:acme:error:unauthorized", "detail": "x"},
        ),
        "https://ca.test/o/1",
    )
    assert failed.problem() is not None
    assert failed.problem().kind == "unauthorized"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("finalize"), "order: field 'finalize'"),
        (lambda d: d.update(status="done"), "unknown status 'done'"),
        (lambda d: d.update(identifiers=[]), "'identifiers' is empty"),
        (lambda d: d.update(identifiers=[{"type": "dns"}]), r"identifiers\[0\]: field 'value'"),
        (
            lambda d: d.update(authorizations="https://x"),
            "'authorizations' must be a list of strings",
        ),
        (lambda d: d.update(expires="tomorrow"), "'expires' is not an RFC 3339 timestamp"),
        (lambda d: d.update(error="boom"), "'error' must be an object"),
    ],
)
def test_bad_orders_name_the_field(mutate: Any, message: str) -> None:
    data = json.loads(json.dumps(ORDER))
    mutate(data)
    with pytest.raises(AcmeProtocolError, match=message):
        Order.parse(data, "https://ca.test/o/1")


def test_non_object_resources_are_rejected() -> None:
    with pytest.raises(AcmeProtocolError, match="order is a list"):
        Order.parse([], "https://ca.test/o/1")


def test_authorization_parsing_and_challenge_lookup() -> None:
    raw = {
        "status": "invalid",
        "identifier": {"type": "dns", "value": f"{B36}.libp2p.direct"},
        "wildcard": True,
        "challenges": [
            {
                "type": "dns-01",
                "url": "https://ca.test/c/1",
                "status": "invalid",
                "token": "tok",
                "error": {
                    "type": "urn:ietf:params:acme:error:unauthorized",
                    "detail": "Incorrect TXT",
                },
            },
            {"type": "future-01", "url": "https://ca.test/c/2", "status": "pending"},
        ],
    }
    authz = Authorization.parse(raw, "https://ca.test/a/1")
    assert authz.wildcard
    assert authz.challenge("dns-01").token == "tok"
    assert authz.challenge("future-01").token is None
    assert authz.problem() is not None and authz.problem().detail == "Incorrect TXT"  # type: ignore[union-attr]
    with pytest.raises(AcmeProtocolError, match="no http-01 challenge"):
        authz.challenge("http-01")
    with pytest.raises(AcmeProtocolError, match="'wildcard' must be a boolean"):
        Authorization.parse(dict(raw, wildcard="yes"), "https://ca.test/a/1")
    raw["challenges"][0].pop("token")  # type: ignore[index]
    with pytest.raises(AcmeProtocolError, match="'token'"):
        Authorization.parse(raw, "https://ca.test/a/1")
    with pytest.raises(AcmeProtocolError, match="unknown status"):
        Challenge.parse({"type": "dns-01", "url": "u", "status": "weird", "token": "t"})


def test_renewal_info_parsing() -> None:
    info = RenewalInfo.parse(
        {
            "suggestedWindow": {"start": "2026-03-01T00:00:00Z", "end": "2026-03-02T00:00:00Z"},
            "explanationURL": "https://e",
        },
        "https://ca.test/ari/x",
        retry_after=21600.0,
    )
    assert info.end - info.start == timedelta(days=1)
    assert (info.explanation_url, info.retry_after) == ("https://e", 21600.0)
    with pytest.raises(AcmeProtocolError, match="'end' is not after 'start'"):
        RenewalInfo.parse(
            {"suggestedWindow": {"start": "2026-03-02T00:00:00Z", "end": "2026-03-01T00:00:00Z"}},
            "u",
        )
    with pytest.raises(AcmeProtocolError, match="'suggestedWindow'"):
        RenewalInfo.parse({}, "u")


def test_certificate_chain_rejects_non_certificates() -> None:
    chain = CertificateChain(
        url="u", pem="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(AcmeProtocolError, match="block 0 is not a valid certificate"):
        chain.certificates()
    with pytest.raises(AcmeProtocolError, match="no PEM certificate"):
        CertificateChain(url="u", pem="hello").certificates()
    good = CertificateChain(url="u", pem=RFC9773_CERT.decode())
    assert good.leaf.serial_number == 0x87654321


def test_the_acme_modules_import_one_another_without_a_cycle() -> None:
    """Type-only imports included: a cycle there is still two modules that cannot be read
    (or split) one without the other. ``problems`` is the bottom: it knows no resource."""
    package = Path(__file__).resolve().parent.parent / "autotls" / "acme"
    graph: dict[str, set[str]] = {}
    for source in package.glob("*.py"):
        module = f"autotls.acme.{source.stem}".removesuffix(".__init__")
        graph[module] = set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                graph[module].add(node.module)
    ours = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    assert ours["autotls.acme.problems"] == set()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for target in ours[module]:
                visit(target, (*path, module))
            done.add(module)

    for module in ours:
        if module != "autotls.acme":  # the package re-exports everything by design
            visit(module, ())
