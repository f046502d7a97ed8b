"""libp2p-PeerID HTTP auth: the spec's vectors byte for byte, the server's decisions, and real
client <-> server round trips over loopback aiohttp servers."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from autotls.http import HttpTransport
from autotls.peerid import KeyType, PrivateKey, PublicKey
from autotls.peeridauth import (
    MAX_HEADER_SIZE,
    SCHEME,
    AuthDecision,
    AuthResult,
    ClientHandshake,
    HandshakeRefused,
    HeaderError,
    PeerIdAuthClient,
    PeerIdAuthServer,
    PeerIdAuthUnauthorized,
    ServerAuthenticationError,
    b64decode,
    b64encode,
    client_sig_parts,
    data_to_sign,
    format_header,
    new_challenge,
    parse_header,
    request_hostname,
    server_sig_parts,
)

# --- The spec's data (libp2p/specs http/peer-id-auth.md) -------------------------------------

SERVER_KEY_HEX = (
    "0801124001010101010101010101010101010101010101010101010101010101010101018a88e3dd7409f195"
    "fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
)
CLIENT_KEY_HEX = (
    "0801124002020202020202020202020202020202020202020202020202020202020202028139770ea87d175f"
    "56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"
)
CLIENT_PUBLIC_HEX = "080112208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"
CHALLENGE_CLIENT = "ERERERERERERERERERERERERERERERERERERERERERE="
CHALLENGE_SERVER = "MzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMz"
SIGNING_EXAMPLE_DATA_HEX = (
    "6c69627032702d5065657249443d6368616c6c656e67652d7365727665723d45524552455245524552455245"
    "5245524552455245524552455245524552455245524552455245524552453d36636c69656e742d7075626c69"
    "632d6b65793d080112208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b3941468"
    "6f73746e616d653d6578616d706c652e636f6d"
)
SIGNING_EXAMPLE_SIG = (
    "UA88qZbLUzmAxrD9KECbDCgSKAUBAvBHrOCF2X0uPLR1uUCF7qGfLPc7dw3Olo-LaFCDpk5sXN7TkLWPVvuXAA=="
)
SERVER_PUBLIC_B64 = "CAESIIqI4910CfGV_VLbLTy6XXLKZwm_HZQSG_N0iAG0D29c"
CLIENT_PUBLIC_B64 = "CAESIIE5dw6ofRdfVqNUZsNMfszLjYqRtO43ol32D1uPybOU"
SERVER_SIG = (
    "HQ7BJRaSpRhNCORNiALNJENdwXUyq0eM2cxNoxe-XnQw6oEAMaeYnjMYaHHjgq0XNxZmy4W2ngKUcI1CgprLCQ=="
)
CLIENT_INITIATED_OPAQUE = (
    "1JrloFj6hobNG859qexB0_odSQlwsb1QSFUMebPJLFp7ImNsaWVudC1wdWJsaWMta2V5IjoiQ0FFU0lJRTVkdzZv"
    "ZlJkZlZxTlVac05NZnN6TGpZcVJ0TzQzb2wzMkQxdVB5Yk9VIiwiY2hhbGxlbmdlLWNsaWVudCI6IkVSRVJFUkVS"
    "RVJFUkVSRVJFUkVSRVJFUkVSRVJFUkVSRVJFUkVSRVJFUkU9IiwiaG9zdG5hbWUiOiJleGFtcGxlLmNvbSIsImNy"
    "ZWF0ZWQtdGltZSI6IjE5NjktMTItMzFUMTY6MDA6MDAtMDg6MDAifQ=="
)
CLIENT_INITIATED_CLIENT_SIG = (
    "OrwJPO4buHKJdKXP2av8PFwv3XF_-m5MqndskeVV5UzufYzBCTm7RBaFnBS1sEhuQHZSZPh9RJgN5NmLzrUrBQ=="
)
SERVER_INITIATED_OPAQUE = (
    "0H1Y9sq1zrfTJZCCTcTymI2tV_TF9-PzdMip2dFkiqZ7ImNoYWxsZW5nZS1jbGllbnQiOiJFUkVSRVJFUkVSRVJF"
    "UkVSRVJFUkVSRVJFUkVSRVJFUkVSRVJFUkVSRVJFPSIsImhvc3RuYW1lIjoiZXhhbXBsZS5jb20iLCJjcmVhdGVk"
    "LXRpbWUiOiIxOTY5LTEyLTMxVDE2OjAwOjAwLTA4OjAwIn0="
)
BEARER = (
    "YhlYjHWTMOkTleROtjMiChL7Mx15_GDYfi971mdJCqB7ImlzLXRva2VuIjp0cnVlLCJwZWVyLWlkIjoiMTJEM0tv"
    "b1dKV29hcVpoRGFvRUZzaEY3UmgxYnBZOW9oaWhGaHpjVzZkNjlMcjJOQVN1cSIsImhvc3RuYW1lIjoiZXhhbXBs"
    "ZS5jb20iLCJjcmVhdGVkLXRpbWUiOiIxOTY5LTEyLTMxVDE2OjAwOjAwLTA4OjAwIn0="
)
EXAMPLE_NOW = datetime(1969, 12, 31, 16, 0, tzinfo=timezone(timedelta(hours=-8)))


def spec_server(**kwargs: Any) -> PeerIdAuthServer:
    options: dict[str, Any] = {
        "hostnames": {"example.com"},
        "hmac_key": bytes(32),
        "now": lambda: EXAMPLE_NOW,
        "random": lambda n: b"\x11" * n,
    }
    options.update(kwargs)
    return PeerIdAuthServer(PrivateKey.from_proto(bytes.fromhex(SERVER_KEY_HEX)), **options)


def spec_client_handshake() -> ClientHandshake:
    # The spec's challenge-server is 24 bytes of '3' (32 characters).
    return ClientHandshake(
        PrivateKey.from_proto(bytes.fromhex(CLIENT_KEY_HEX)),
        "example.com",
        random=lambda n: b"3" * 24,
    )


def test_signing_example() -> None:
    server = PrivateKey.from_proto(bytes.fromhex(SERVER_KEY_HEX))
    client_public = PublicKey.from_proto(bytes.fromhex(CLIENT_PUBLIC_HEX))
    data = data_to_sign(server_sig_parts(CHALLENGE_CLIENT, client_public, "example.com"))
    assert data.hex() == SIGNING_EXAMPLE_DATA_HEX
    assert data.startswith(b"libp2p-PeerID=challenge-server=")  # '=' is the varint 61
    assert b64encode(server.sign(data)) == SIGNING_EXAMPLE_SIG
    assert server.public_key.verify(b64decode(SIGNING_EXAMPLE_SIG), data)


def test_client_initiated_example_byte_for_byte() -> None:
    server = spec_server()
    client = spec_client_handshake()

    first = client.start()
    assert first == (
        f'{SCHEME} challenge-server="{CHALLENGE_SERVER}", public-key="{CLIENT_PUBLIC_B64}"'
    )

    challenge = server.decide(first, "example.com")
    assert challenge.status == 401
    assert challenge.headers["WWW-Authenticate"] == (
        f'{SCHEME} challenge-client="{CHALLENGE_CLIENT}", public-key="{SERVER_PUBLIC_B64}", '
        f'sig="{SERVER_SIG}", opaque="{CLIENT_INITIATED_OPAQUE}"'
    )

    second = client.on_challenge(challenge.headers["WWW-Authenticate"])
    assert client.server_authenticated
    assert str(client.server_peer_id) == str(server.peer_id)
    assert second == (
        f'{SCHEME} opaque="{CLIENT_INITIATED_OPAQUE}", sig="{CLIENT_INITIATED_CLIENT_SIG}"'
    )

    done = server.decide(second, "example.com")
    assert done.status is None and done.result is not None
    assert str(done.result.peer_id) == "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    assert done.result.via == "client-initiated"
    assert done.headers == {"Authentication-Info": f'{SCHEME} bearer="{BEARER}"'}
    assert client.on_final(done.headers["Authentication-Info"]) == BEARER

    # and the bearer authenticates later requests
    again = server.decide(f'{SCHEME} bearer="{BEARER}"', "example.com")
    assert again.result is not None and again.result.via == "bearer"
    assert again.result.peer_id == done.result.peer_id


def test_server_initiated_example_parts() -> None:
    """The spec's server-initiated example: its opaque, the server's sig and the bearer are
    reproduced; its client sig is stale (protocol.md §3) and is not used."""
    server = spec_server()
    first = server.decide(None, "example.com")
    assert first.status == 401
    params = parse_header(first.headers["WWW-Authenticate"])
    assert params == {
        "challenge-client": CHALLENGE_CLIENT,
        "public-key": SERVER_PUBLIC_B64,
        "opaque": SERVER_INITIATED_OPAQUE,
    }
    client = spec_client_handshake()
    client.flow = "server-initiated"
    second = client.on_challenge(first.headers["WWW-Authenticate"])
    sent = parse_header(second)
    assert sent is not None and sent["challenge-server"] == CHALLENGE_SERVER
    assert sent["opaque"] == SERVER_INITIATED_OPAQUE
    done = server.decide(second, "example.com")
    assert done.result is not None and done.result.via == "server-initiated"
    assert done.headers["Authentication-Info"] == f'{SCHEME} sig="{SERVER_SIG}", bearer="{BEARER}"'
    assert client.on_final(done.headers["Authentication-Info"]) == BEARER
    assert client.server_authenticated


# --- Pure pieces -------------------------------------------------------------------------------


def test_header_round_trip_and_rules() -> None:
    header = format_header([("a", "1"), ("b-c", "x=y")])
    assert header == f'{SCHEME} a="1", b-c="x=y"'
    assert parse_header(header) == {"a": "1", "b-c": "x=y"}
    # separators: spaces only (as in the spec's Authentication-Info example), other schemes
    assert parse_header(f'{SCHEME} sig="s" bearer="b"') == {"sig": "s", "bearer": "b"}
    assert parse_header(f'Basic realm="x", {SCHEME} a="1", Bearer tok68==') == {"a": "1"}
    assert parse_header('Basic realm="x"') is None
    assert parse_header(None) is None
    assert parse_header(SCHEME) == {}
    with pytest.raises(HeaderError, match="duplicate"):
        parse_header(f'{SCHEME} a="1", a="2"')
    with pytest.raises(HeaderError, match='expected name="value"'):
        parse_header(f"{SCHEME} a=1")
    with pytest.raises(HeaderError, match='expected name="value"'):
        parse_header(f'{SCHEME} a="unterminated')
    with pytest.raises(HeaderError, match="expected an auth scheme"):
        parse_header('a="1"')
    with pytest.raises(HeaderError, match="more than one"):
        parse_header(f'{SCHEME} a="1", {SCHEME} b="2"')
    with pytest.raises(HeaderError, match="exceeds 2048 bytes"):
        parse_header(f'{SCHEME} a="{"x" * MAX_HEADER_SIZE}"')
    with pytest.raises(HeaderError, match="limit 2048"):
        format_header([("a", "x" * MAX_HEADER_SIZE)])
    with pytest.raises(HeaderError, match="cannot be sent unescaped"):
        format_header([("a", 'x"y')])
    with pytest.raises(HeaderError, match="invalid parameter name"):
        format_header([("a b", "x")])


def test_base64url_is_padded_and_strict() -> None:
    assert b64encode(b"\xff\xfe") == "__4="
    assert b64decode("__4=") == b"\xff\xfe"
    for bad in ("__4", "//4=", "++4=", "_ _4=", "=__4"):
        with pytest.raises(HeaderError, match="padded base64url"):
            b64decode(bad)


def test_challenges() -> None:
    challenge = new_challenge()
    assert len(challenge) == 44 and len(b64decode(challenge)) == 32
    assert new_challenge() != challenge


def test_request_hostname() -> None:
    assert request_hostname("https://registration.libp2p.direct/v1/x") == (
        "registration.libp2p.direct"
    )
    assert request_hostname("https://registration.libp2p.direct:443/") == (
        "registration.libp2p.direct"
    )
    assert request_hostname("http://127.0.0.1:8080/") == "127.0.0.1:8080"
    assert request_hostname("http://[::1]:8080/") == "[::1]:8080"
    assert request_hostname("http://example.com:80/") == "example.com"


@pytest.mark.parametrize("key_type", list(KeyType))
def test_pure_round_trip_every_key_type(key_type: KeyType) -> None:
    server = PeerIdAuthServer(PrivateKey.generate(key_type), hostnames=None)
    client_key = PrivateKey.generate(key_type)
    for flow in ("client-initiated", "server-initiated"):
        hs = ClientHandshake(client_key, "h.example")
        if flow == "client-initiated":
            www = server.decide(hs.start(), "h.example").headers["WWW-Authenticate"]
        else:
            hs.flow = "server-initiated"
            www = server.decide(None, "h.example").headers["WWW-Authenticate"]
        decision = server.decide(hs.on_challenge(www), "h.example")
        assert decision.result is not None, decision.reason
        assert decision.result.peer_id == client_key.peer_id
        assert decision.result.via == flow
        assert hs.on_final(decision.headers["Authentication-Info"])
        assert hs.server_authenticated and hs.server_peer_id == server.peer_id


def _client_initiated_leg2(
    server: PeerIdAuthServer, hostname: str = "h.example"
) -> tuple[ClientHandshake, str]:
    hs = ClientHandshake(PrivateKey.generate(), hostname)
    www = server.decide(hs.start(), hostname).headers["WWW-Authenticate"]
    return hs, hs.on_challenge(www)


def test_server_rejects_tampered_client_signature() -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None)
    _, leg2 = _client_initiated_leg2(server)
    params = parse_header(leg2)
    assert params is not None
    sig = bytearray(b64decode(params["sig"]))
    sig[0] ^= 1
    params["sig"] = b64encode(bytes(sig))
    decision = server.decide(format_header(params), "h.example")
    assert decision.status == 400 and "signature does not verify" in decision.reason


def test_server_rejects_stripped_padding() -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None)
    _, leg2 = _client_initiated_leg2(server)
    params = parse_header(leg2)
    assert params is not None
    params["sig"] = params["sig"].rstrip("=")
    decision = server.decide(format_header(params), "h.example")
    assert decision.status == 400 and "padded base64url" in decision.reason


def test_client_refuses_tampered_server_signature() -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None)
    hs = ClientHandshake(PrivateKey.generate(), "h.example")
    www = server.decide(hs.start(), "h.example").headers["WWW-Authenticate"]
    params = parse_header(www)
    assert params is not None
    params["sig"] = b64encode(b"\x00" * 64)
    with pytest.raises(ServerAuthenticationError, match="does not verify"):
        hs.on_challenge(format_header(params))


def test_client_refuses_unexpected_server_identity() -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None)
    hs = ClientHandshake(
        PrivateKey.generate(), "h.example", expected_server=PrivateKey.generate().peer_id
    )
    www = server.decide(hs.start(), "h.example").headers["WWW-Authenticate"]
    with pytest.raises(ServerAuthenticationError, match="expected"):
        hs.on_challenge(www)


def test_wrong_hostname() -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames={"registration.libp2p.direct"})
    assert server.decide(None, "evil.example").status == 400
    open_server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None)
    # The server signed for the Host it saw; a client that meant another host refuses it.
    hs = ClientHandshake(PrivateKey.generate(), "registration.libp2p.direct")
    www = open_server.decide(hs.start(), "proxy.example").headers["WWW-Authenticate"]
    with pytest.raises(ServerAuthenticationError, match=r"hostname 'registration\.libp2p\.direct'"):
        hs.on_challenge(www)
    # A client signature made for another hostname does not verify.
    _, leg2 = _client_initiated_leg2(open_server, "a.example")
    decision = open_server.decide(leg2, "a.example")
    assert decision.result is not None
    _, leg2 = _client_initiated_leg2(open_server, "a.example")
    decision = open_server.decide(leg2, "b.example")
    assert decision.status == 400 and "does not match" in decision.reason


def test_expired_challenge_with_injected_clock() -> None:
    clock = [datetime(2026, 1, 1, tzinfo=UTC)]
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None, now=lambda: clock[0])
    _, leg2 = _client_initiated_leg2(server)
    clock[0] += timedelta(seconds=299)
    assert server.decide(leg2, "h.example").result is not None
    _, leg2 = _client_initiated_leg2(server)
    clock[0] += timedelta(seconds=301)
    decision = server.decide(leg2, "h.example")
    assert decision.status == 401 and decision.reason == "challenge expired"
    # a fresh server-initiated challenge comes with it
    fresh = parse_header(decision.headers["WWW-Authenticate"])
    assert fresh is not None and {"challenge-client", "public-key", "opaque"} <= fresh.keys()


def test_bearer_expiry_and_misuse() -> None:
    clock = [datetime(2026, 1, 1, tzinfo=UTC)]
    server = PeerIdAuthServer(
        PrivateKey.generate(), hostnames=None, now=lambda: clock[0], bearer_ttl=3600
    )
    hs, leg2 = _client_initiated_leg2(server)
    info = server.decide(leg2, "h.example").headers["Authentication-Info"]
    bearer = hs.on_final(info)
    assert bearer is not None
    clock[0] += timedelta(seconds=3599)
    assert server.decide(format_header({"bearer": bearer}), "h.example").result is not None
    assert server.decide(format_header({"bearer": bearer}), "other.example").status == 401
    clock[0] += timedelta(seconds=2)
    assert server.decide(format_header({"bearer": bearer}), "h.example").status == 401
    # a bearer is not a challenge opaque
    bogus = format_header({"opaque": bearer, "sig": b64encode(b"x" * 64)})
    clock[0] -= timedelta(seconds=3601)
    decision = server.decide(bogus, "h.example")
    assert decision.status == 400 and "got a bearer token" in decision.reason


def test_foreign_opaque_gets_a_new_challenge() -> None:
    identity = PrivateKey.generate()
    a = PeerIdAuthServer(identity, hostnames=None, hmac_key=b"a" * 32)
    b = PeerIdAuthServer(identity, hostnames=None, hmac_key=b"b" * 32)
    _, leg2 = _client_initiated_leg2(a)
    decision = b.decide(leg2, "h.example")
    assert decision.status == 401 and "HMAC invalid" in decision.reason
    assert a.decide(leg2, "h.example").result is not None


def test_malformed_and_oversized_requests_are_400() -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None)
    cases = {
        "Bearer abc": "not libp2p-PeerID",
        f'{SCHEME} foo="bar"': "no recognisable",
        f'{SCHEME} a="{"x" * 3000}"': "exceeds 2048",
        f'{SCHEME} challenge-server="short", public-key="{SERVER_PUBLIC_B64}"': "too short",
        f'{SCHEME} challenge-server="{"A" * 44}", public-key="AAAA"': "not a libp2p public key",
        f'{SCHEME} opaque="!!!!", sig="AAAA"': "padded base64url",
        f'{SCHEME} opaque="{b64encode(b"x" * 40)}", sig="AAAA"': None,  # bad HMAC -> 401
    }
    for header, reason in cases.items():
        decision = server.decide(header, "h.example")
        if reason is None:
            assert decision.status == 401
        else:
            assert decision.status == 400, header
            assert reason in decision.reason


def test_client_rejects_short_server_challenge() -> None:
    hs = ClientHandshake(PrivateKey.generate(), "h.example")
    hs.start()
    header = format_header(
        {
            "challenge-client": "short",
            "public-key": b64encode(PrivateKey.generate().public_key.to_proto()),
            "opaque": "AAAA",
        }
    )
    with pytest.raises(HeaderError, match="challenge-client is too short"):
        hs.on_challenge(header)


def test_server_initiated_final_without_sig_is_refused() -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None)
    hs = ClientHandshake(PrivateKey.generate(), "h.example")
    hs.flow = "server-initiated"
    decision = server.decide(
        hs.on_challenge(server.decide(None, "h.example").headers["WWW-Authenticate"]), "h.example"
    )
    params = parse_header(decision.headers["Authentication-Info"])
    assert params is not None
    with pytest.raises(ServerAuthenticationError, match="lacks the server's sig"):
        hs.on_final(format_header({"bearer": params["bearer"]}))
    with pytest.raises(ServerAuthenticationError, match="does not verify"):
        hs.on_final(format_header({"sig": b64encode(b"\x01" * 64), "bearer": params["bearer"]}))


def test_signature_layout_sorts_params() -> None:
    key = PrivateKey.generate().public_key
    a = data_to_sign(client_sig_parts("c" * 44, key, "h"))
    b = data_to_sign(
        {"hostname": "h", "server-public-key": key.to_proto(), "challenge-client": "c" * 44}
    )
    assert a == b
    assert a.index(b"challenge-client=") < a.index(b"hostname=") < a.index(b"server-public-key=")


# --- Over real loopback sockets --------------------------------------------------------------


BACKEND_NAME = web.AppKey("backend_name", str)


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def echo_app(server: PeerIdAuthServer, log: list[str] | None = None) -> web.Application:
    async def echo(request: web.Request, auth: AuthResult) -> web.Response:
        body = await request.read()
        if log is not None:
            log.append(f"{request.app[BACKEND_NAME]}:{auth.via}:{len(body)}")
        return web.json_response(
            {"peer": str(auth.peer_id), "via": auth.via, "body": body.decode()}
        )

    app = web.Application()
    app[BACKEND_NAME] = "backend"
    app.router.add_post("/echo", server.protect(echo))
    return app


@pytest.fixture
async def http() -> AsyncIterator[HttpTransport]:
    async with HttpTransport(keep_ip_cookies=True) as transport:
        yield transport


@pytest.mark.parametrize("key_type", list(KeyType))
async def test_loopback_round_trip(key_type: KeyType, http: HttpTransport) -> None:
    server = PeerIdAuthServer(PrivateKey.generate(key_type), hostnames=None)
    runner, url = await _start(echo_app(server))
    try:
        identity = PrivateKey.generate(key_type)
        client = PeerIdAuthClient(identity, http)
        resp = await client.request("POST", f"{url}/echo", json_body={"hello": key_type.name})
        assert resp.status == 200
        assert resp.server_peer_id == server.peer_id
        assert resp.bearer
        assert resp.bearer not in repr(resp)
        data = json.loads(resp.body)
        assert data == {
            "peer": str(identity.peer_id),
            "via": "client-initiated",
            "body": json.dumps({"hello": key_type.name}),
        }
    finally:
        await runner.cleanup()


class _ServerInitiatedOnly(PeerIdAuthServer):
    """Ignores client-initiated challenges, like a server that only speaks the other flow."""

    def _sign_challenge(self, params: Any, hostname: str) -> AuthDecision:
        return self._challenge(hostname, "ignoring the client's challenge")


async def test_fallback_to_server_initiated(http: HttpTransport) -> None:
    server = _ServerInitiatedOnly(PrivateKey.generate(), hostnames=None)
    calls: list[str] = []
    runner, url = await _start(echo_app(server, calls))
    try:
        identity = PrivateKey.generate(KeyType.SECP256K1)
        resp = await PeerIdAuthClient(identity, http).request(
            "POST", f"{url}/echo", json_body={"x": 1}
        )
        assert resp.status == 200 and resp.server_peer_id == server.peer_id
        assert json.loads(resp.body)["via"] == "server-initiated"
        assert calls == ["backend:server-initiated:8"]  # the body travelled with the sig leg
    finally:
        await runner.cleanup()


class _LyingServer(PeerIdAuthServer):
    def _sign_challenge(self, params: Any, hostname: str) -> AuthDecision:
        decision = super()._sign_challenge(params, hostname)
        header = parse_header(decision.headers["WWW-Authenticate"])
        assert header is not None
        header["sig"] = b64encode(b"\x02" * 64)
        return AuthDecision(401, {"WWW-Authenticate": format_header(header)}, "lying")


async def test_client_refuses_bad_server_signature_over_http(
    http: HttpTransport,
) -> None:
    calls: list[str] = []
    runner, url = await _start(echo_app(_LyingServer(PrivateKey.generate(), hostnames=None), calls))
    try:
        with pytest.raises(ServerAuthenticationError):
            await PeerIdAuthClient(PrivateKey.generate(), http).request(
                "POST", f"{url}/echo", json_body={"secret": 1}
            )
        assert calls == []  # nothing was sent to an unauthenticated server
    finally:
        await runner.cleanup()


async def test_non_401_first_answer_is_refused(http: HttpTransport) -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames={"registration.libp2p.direct"})
    runner, url = await _start(echo_app(server))
    try:
        with pytest.raises(HandshakeRefused) as info:
            await PeerIdAuthClient(PrivateKey.generate(), http).request(
                "POST", f"{url}/echo", json_body={}
            )
        assert info.value.status == 400
    finally:
        await runner.cleanup()


async def test_hostname_is_the_host_header(http: HttpTransport) -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None)
    runner, url = await _start(echo_app(server))
    try:
        # exactly "127.0.0.1:<port>": what aiohttp sends as Host and what the client signs
        server.hostnames = frozenset({url.removeprefix("http://")})
        resp = await PeerIdAuthClient(PrivateKey.generate(), http).request(
            "POST", f"{url}/echo", json_body={}
        )
        assert resp.status == 200
    finally:
        await runner.cleanup()


# --- Two backends behind a cookie-affinity balancer ------------------------------------------


async def _balancer(backends: list[str]) -> tuple[web.AppRunner, str, list[str]]:
    """Round-robins requests without an affinity cookie; pins the ones that carry it. Passes
    the Host header through, like a production load balancer."""
    counter = itertools.count()
    routed: list[str] = []
    upstream = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())

    async def proxy(request: web.Request) -> web.Response:
        pinned = request.cookies.get("affinity")
        index = int(pinned) if pinned is not None else next(counter) % len(backends)
        routed.append(str(index))
        headers = {k: v for k, v in request.headers.items() if k.lower() != "cookie"}
        async with upstream.request(
            request.method,
            backends[index] + request.rel_url.path_qs,
            headers=headers,
            data=await request.read(),
        ) as resp:
            body = await resp.read()
            out = web.Response(status=resp.status, body=body)
            for name in ("WWW-Authenticate", "Authentication-Info", "Content-Type"):
                if name in resp.headers:
                    out.headers[name] = resp.headers[name]
        if pinned is None:
            out.set_cookie("affinity", str(index))
        return out

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)

    async def close_upstream(_: web.Application) -> None:
        await upstream.close()

    app.on_cleanup.append(close_upstream)
    runner, url = await _start(app)
    return runner, url, routed


async def _backends(identity: PrivateKey) -> tuple[list[web.AppRunner], list[str], list[str]]:
    runners, urls = [], []
    calls: list[str] = []
    for name in ("a", "b"):
        # Each backend has its own HMAC key: an opaque from one fails on the other.
        app = echo_app(
            PeerIdAuthServer(identity, hostnames=None, hmac_key=name.encode() * 32), calls
        )
        app[BACKEND_NAME] = name
        runner, url = await _start(app)
        runners.append(runner)
        urls.append(url)
    return runners, urls, calls


async def test_cookie_affinity_keeps_the_legs_together() -> None:
    identity = PrivateKey.generate()
    runners, urls, calls = await _backends(identity)
    lb, lb_url, routed = await _balancer(urls)
    try:
        async with HttpTransport(keep_ip_cookies=True) as http:
            resp = await PeerIdAuthClient(PrivateKey.generate(), http).request(
                "POST", f"{lb_url}/echo", json_body={"v": 1}
            )
        assert resp.status == 200 and resp.server_peer_id == identity.peer_id
        assert routed == ["0", "0"]
        assert calls == ["a:client-initiated:8"]
    finally:
        await lb.cleanup()
        for runner in runners:
            await runner.cleanup()


async def test_without_cookies_the_legs_split_and_fail() -> None:
    identity = PrivateKey.generate()
    runners, urls, calls = await _backends(identity)
    lb, lb_url, routed = await _balancer(urls)
    try:
        # A transport that does not keep cookies on IP hosts (the default) loses the pin.
        async with HttpTransport() as http:
            with pytest.raises(PeerIdAuthUnauthorized) as info:
                await PeerIdAuthClient(PrivateKey.generate(), http, max_handshakes=3).request(
                    "POST", f"{lb_url}/echo", json_body={"v": 1}
                )
        assert info.value.status == 401
        assert routed == ["0", "1", "0", "1"]  # every leg on the other backend: bounded
        assert calls == []
    finally:
        await lb.cleanup()
        for runner in runners:
            await runner.cleanup()


async def test_401_mid_flow_then_success_after_rehandshake(http: HttpTransport) -> None:
    """The first completed leg is answered 401 (as if the backend lost its state); the client
    redoes the handshake from that 401 and succeeds."""
    identity = PrivateKey.generate()
    real = PeerIdAuthServer(identity, hostnames=None)
    forgetful: list[bool] = [True]

    class Forgetful(PeerIdAuthServer):
        def decide(self, authorization: str | None, hostname: str) -> AuthDecision:
            params = parse_header(authorization) if authorization else None
            if params and "sig" in params and forgetful[0]:
                forgetful[0] = False
                return real._challenge(hostname, "forgot")
            return real.decide(authorization, hostname)

    calls: list[str] = []
    runner, url = await _start(echo_app(Forgetful(identity, hostnames=None), calls))
    try:
        resp = await PeerIdAuthClient(PrivateKey.generate(), http).request(
            "POST", f"{url}/echo", json_body={"v": 2}
        )
        assert resp.status == 200
        assert json.loads(resp.body)["via"] == "server-initiated"
        assert calls == ["backend:server-initiated:8"]
    finally:
        await runner.cleanup()


async def _raw_status(url: str, host: bytes, authorization: bytes | None) -> int:
    """Send one request with exactly these header bytes; return the status code."""
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        head = b"POST /echo HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 0\r\n"
        if authorization is not None:
            head += b"Authorization: " + authorization + b"\r\n"
        writer.write(head + b"Connection: close\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()


async def test_invalid_utf8_in_host_or_auth_headers_is_400_on_every_path() -> None:
    server = PeerIdAuthServer(PrivateKey.generate(), hostnames=None)
    runner, url = await _start(echo_app(server))
    try:
        bad_host = b"127.0.0.1\xff\xfe"
        client_key = b64encode(PrivateKey.generate().public_key.to_proto()).encode()
        challenge = b64encode(b"\x01" * 32).encode()
        client_initiated = (
            b'libp2p-PeerID challenge-server="' + challenge + b'", public-key="' + client_key + b'"'
        )
        # 1. no credentials; 2. client-initiated, bad Host
        assert await _raw_status(url, bad_host, None) == 400
        assert await _raw_status(url, bad_host, client_initiated) == 400
        # 3. client-initiated, a challenge that is not UTF-8
        bad_challenge = b'libp2p-PeerID challenge-server="' + b"\xff" * 44 + b'", public-key="'
        assert await _raw_status(url, b"localhost", bad_challenge + client_key + b'"') == 400
        # 4. the signature leg, with an opaque minted for that very Host (as the server did
        # before it refused such a Host)
        decision = server._challenge(bad_host.decode("utf-8", "surrogateescape"), "minted")
        params = parse_header(decision.headers["WWW-Authenticate"])
        assert params is not None
        signed = (
            b'libp2p-PeerID public-key="' + client_key + b'", opaque="'
            + params["opaque"].encode() + b'", sig="' + b64encode(b"\x00" * 64).encode() + b'"'
        )  # fmt: skip
        assert await _raw_status(url, bad_host, signed) == 400
        # 5. a bearer token presented with a bad Host: a fresh challenge would be 401; the
        # Host alone makes it 400.
        bearer = b'libp2p-PeerID bearer="' + b"A" * 44 + b'"'
        assert await _raw_status(url, bad_host, bearer) == 400
        # And valid requests are still answered as before.
        assert await _raw_status(url, b"localhost", None) == 401
    finally:
        await runner.cleanup()
