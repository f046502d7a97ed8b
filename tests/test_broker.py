"""The broker client against in-test aiohttp brokers: every answer class, the health wait, and
the exact request the production broker expects."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web

from autotls.adapters import BrokerAdapter
from autotls.broker import (
    BrokerClient,
    BrokerDialError,
    BrokerForbidden,
    BrokerNetworkError,
    BrokerRejected,
    BrokerUnauthorized,
    BrokerUnavailable,
    InvalidChallengeValue,
    NoDialableAddresses,
    health_wait,
    validate_challenge_value,
)
from autotls.fsm.clock import ManualClock
from autotls.fsm.errors import ConfigurationError, ErrorClass
from autotls.http import DEFAULT_USER_AGENT, Exchange
from autotls.peerid import PrivateKey
from autotls.peeridauth import AuthDecision, AuthResult, PeerIdAuthServer, parse_header

VALUE = "x" * 42 + "A"  # 43 chars, low bits of the last char clear: 32 bytes
PUBLIC = ["/ip4/1.2.3.4/tcp/4001", "/ip6/2001:4860::1/udp/4001/quic-v1"]

Handler = Callable[[web.Request, AuthResult], Awaitable[web.StreamResponse]]


@dataclass
class FakeBroker:
    """An in-test broker: PeerID auth in front of a scripted handler."""

    identity: PrivateKey = field(default_factory=PrivateKey.generate)
    handler: Handler | None = None
    health_status: int = 204
    health_headers: dict[str, str] = field(default_factory=dict)
    pre_auth_status: int | None = None  # answer before auth (denylist, outage)
    pre_auth_headers: dict[str, str] = field(default_factory=lambda: {"Retry-After": "120"})
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    server: PeerIdAuthServer | None = None

    def app(self) -> web.Application:
        self.server = self.server or PeerIdAuthServer(self.identity, hostnames=None)

        async def registered(request: web.Request, auth: AuthResult) -> web.StreamResponse:
            body = await request.read()
            self.requests.append(
                {"headers": dict(request.headers), "body": body, "peer": auth.peer_id}
            )
            if self.handler is not None:
                return await self.handler(request, auth)
            return web.Response(status=200)

        async def register(request: web.Request) -> web.StreamResponse:
            if self.pre_auth_status is not None:
                return web.Response(
                    status=self.pre_auth_status, text="go away", headers=self.pre_auth_headers
                )
            assert self.server is not None  # tests may swap the server between requests
            return await self.server.protect(registered)(request)

        async def health(request: web.Request) -> web.Response:
            return web.Response(status=self.health_status, headers=self.health_headers)

        app = web.Application()
        app.router.add_get("/v1/health", health)
        app.router.add_post("/v1/_acme-challenge", register)
        return app


@pytest.fixture
async def broker() -> AsyncIterator[FakeBroker]:
    fake = FakeBroker()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


def client_for(broker: FakeBroker, **kwargs: Any) -> BrokerClient:
    return BrokerClient(PrivateKey.generate(), base_url=broker.url, **kwargs)


def respond(status: int, text: str = "", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request, auth: AuthResult) -> web.StreamResponse:
        return web.Response(status=status, text=text, headers=headers)

    return handler


# --- Pure pieces -------------------------------------------------------------------------------


def test_health_wait_bounds() -> None:
    assert health_wait(None) == 3600
    assert health_wait(10) == 3600
    assert health_wait(7200) == 7200
    assert health_wait(10**7) == 86400


@pytest.mark.parametrize(
    "value",
    [
        VALUE + "=",  # padded
        "x" * 42,  # too short
        "x" * 44,  # too long
        "x" * 42 + "+",  # standard alphabet
        "x" * 42 + "B",  # 43 chars whose last char has stray low bits: not canonical
        None,
        b"x" * 43,
    ],
)
def test_value_validation(value: Any) -> None:
    with pytest.raises(InvalidChallengeValue) as info:
        validate_challenge_value(value)
    assert isinstance(info.value, ConfigurationError) and isinstance(info.value, ValueError)


def test_valid_value() -> None:
    import base64
    import hashlib

    real = base64.urlsafe_b64encode(hashlib.sha256(b"token.thumb").digest()).rstrip(b"=").decode()
    assert validate_challenge_value(real) == real
    assert validate_challenge_value(VALUE) == VALUE


def test_bad_base_url() -> None:
    with pytest.raises(ConfigurationError, match="not an http"):
        BrokerClient(PrivateKey.generate(), base_url="ftp://x")


# --- Registration ------------------------------------------------------------------------------


async def test_register_success_sends_what_the_broker_expects(broker: FakeBroker) -> None:
    async with client_for(broker, forge_auth="sekrit-token") as client:
        sent = await client.register(VALUE, [*PUBLIC, "/ip4/10.0.0.1/tcp/4001"])
    assert sent == PUBLIC
    assert len(broker.requests) == 1
    request = broker.requests[0]
    assert json.loads(request["body"]) == {"value": VALUE, "addresses": PUBLIC}
    assert list(json.loads(request["body"])) == ["value", "addresses"]
    headers = request["headers"]
    assert headers["User-Agent"] == DEFAULT_USER_AGENT
    assert DEFAULT_USER_AGENT.startswith("autotls/") and "(+python)" in DEFAULT_USER_AGENT
    assert headers["Forge-Authorization"] == "sekrit-token"
    assert headers["Content-Type"] == "application/json"
    assert headers["Host"] == broker.url.removeprefix("http://")
    assert request["peer"] == client.identity.peer_id


async def test_register_without_forge_auth_and_custom_agent(broker: FakeBroker) -> None:
    async with client_for(broker, user_agent="my-node/1.0") as client:
        await client.register(VALUE, PUBLIC)
    headers = broker.requests[0]["headers"]
    assert "Forge-Authorization" not in headers
    assert headers["User-Agent"] == "my-node/1.0"


async def test_private_addresses_only_when_allowed(broker: FakeBroker) -> None:
    private = ["/ip4/127.0.0.1/tcp/4001", "/ip4/192.168.1.2/tcp/4001"]
    async with client_for(broker) as client:
        with pytest.raises(NoDialableAddresses) as info:
            await client.register(VALUE, private)
    assert info.value.error_class is ErrorClass.TRANSIENT
    assert info.value.retry_after is not None and info.value.retry_after >= 600
    assert broker.requests == []
    async with client_for(broker, allow_private_addresses=True) as client:
        assert await client.register(VALUE, private) == private


async def test_invalid_value_is_not_sent(broker: FakeBroker) -> None:
    async with client_for(broker) as client:
        with pytest.raises(InvalidChallengeValue):
            await client.register(VALUE + "=", PUBLIC)
    assert broker.requests == []


async def test_dial_failure_is_transient(broker: FakeBroker) -> None:
    broker.handler = respond(400, "error testing addresses: all dials failed")
    async with client_for(broker) as client:
        with pytest.raises(BrokerDialError) as info:
            await client.register(VALUE, PUBLIC)
    assert info.value.error_class is ErrorClass.TRANSIENT
    assert info.value.status == 400
    assert "all dials failed" in str(info.value)


async def test_other_400_is_permanent(broker: FakeBroker) -> None:
    broker.handler = respond(400, "invalid value")
    async with client_for(broker) as client:
        with pytest.raises(BrokerRejected) as info:
            await client.register(VALUE, PUBLIC)
    assert info.value.error_class is ErrorClass.PERMANENT
    assert info.value.detail == "invalid value"


async def test_403_is_permanent(broker: FakeBroker) -> None:
    broker.handler = respond(403, "denied")
    async with client_for(broker) as client:
        with pytest.raises(BrokerForbidden) as info:
            await client.register(VALUE, PUBLIC)
    assert info.value.error_class is ErrorClass.PERMANENT


async def test_403_before_auth(broker: FakeBroker) -> None:
    broker.pre_auth_status = 403
    async with client_for(broker) as client:
        with pytest.raises(BrokerForbidden):
            await client.register(VALUE, PUBLIC)


@pytest.mark.parametrize("pre_auth", [False, True])
async def test_5xx_with_retry_after(broker: FakeBroker, pre_auth: bool) -> None:
    if pre_auth:
        broker.pre_auth_status = 503
    else:
        broker.handler = respond(500, "boom", {"Retry-After": "120"})
    async with client_for(broker) as client:
        with pytest.raises(BrokerUnavailable) as info:
            await client.register(VALUE, PUBLIC)
    assert info.value.error_class is ErrorClass.TRANSIENT
    assert info.value.retry_after == 120


async def test_401_mid_flow_then_success(broker: FakeBroker) -> None:
    real = PeerIdAuthServer(broker.identity, hostnames=None)
    state = {"forget": True}

    class Forgetful(PeerIdAuthServer):
        def decide(self, authorization: str | None, hostname: str) -> AuthDecision:
            params = parse_header(authorization) if authorization else None
            if params and "sig" in params and state["forget"]:
                state["forget"] = False
                return real._challenge(hostname, "backend lost its state")
            return real.decide(authorization, hostname)

    broker.server = Forgetful(broker.identity, hostnames=None)
    async with client_for(broker) as client:
        assert await client.register(VALUE, PUBLIC) == PUBLIC
    assert not state["forget"]
    assert len(broker.requests) == 1


async def test_401_that_survives_rehandshakes(broker: FakeBroker) -> None:
    real = PeerIdAuthServer(broker.identity, hostnames=None)

    class Stubborn(PeerIdAuthServer):
        def decide(self, authorization: str | None, hostname: str) -> AuthDecision:
            params = parse_header(authorization) if authorization else None
            if params and "sig" in params:
                return real._challenge(hostname, "never")
            return real.decide(authorization, hostname)

    broker.server = Stubborn(broker.identity, hostnames=None)
    async with client_for(broker) as client:
        with pytest.raises(BrokerUnauthorized) as info:
            await client.register(VALUE, PUBLIC)
    assert info.value.error_class is ErrorClass.TRANSIENT
    assert broker.requests == []


async def test_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    async with BrokerClient(PrivateKey.generate(), base_url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(BrokerNetworkError) as info:
            await client.register(VALUE, PUBLIC)
        assert info.value.error_class is ErrorClass.TRANSIENT
        with pytest.raises(BrokerNetworkError):
            await client.health()


async def test_timeout(broker: FakeBroker) -> None:
    released = asyncio.Event()

    async def hang(request: web.Request, auth: AuthResult) -> web.StreamResponse:
        await released.wait()  # until the client has given up
        return web.Response()

    broker.handler = hang
    try:
        async with client_for(broker, timeout=0.3) as client:
            with pytest.raises(BrokerNetworkError, match="timed out"):
                await client.register(VALUE, PUBLIC)
    finally:
        released.set()


async def test_bearer_is_never_logged(broker: FakeBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    async def capture(request: web.Request, auth: AuthResult) -> web.StreamResponse:
        seen.append(auth.headers["Authentication-Info"])
        return web.Response()

    broker.handler = capture
    async with client_for(broker) as client:
        await client.register(VALUE, PUBLIC)
    params = parse_header(seen[0])
    assert params is not None
    assert params["bearer"] not in caplog.text
    assert str(client.identity.peer_id) in caplog.text


# --- Health ------------------------------------------------------------------------------------


async def test_the_observer_sees_the_health_check_and_both_legs(broker: FakeBroker) -> None:
    seen: list[Exchange] = []
    async with client_for(broker, observer=seen.append) as client:
        await client.health()
        await client.register(VALUE, PUBLIC)
    assert [(e.method, e.request_class, e.status) for e in seen] == [
        ("GET", "health", 204),
        ("POST", "challenge_leg", 401),
        ("POST", "registration_leg", 200),
    ]
    assert (seen[1].request_size, seen[2].request_size) == (0, len(broker.requests[0]["body"]))


async def test_a_client_without_identity_checks_health_only(broker: FakeBroker) -> None:
    async with BrokerClient(base_url=broker.url) as client:
        assert (await client.health()).healthy
        with pytest.raises(ConfigurationError, match="no identity key"):
            await client.register(VALUE, PUBLIC)
    assert broker.requests == []


async def test_health_ok(broker: FakeBroker) -> None:
    async with client_for(broker) as client:
        health = await client.health()
    assert health.healthy and health.wait_s == 0


@pytest.mark.parametrize(
    ("retry_after", "wait"),
    [(None, 3600), ("10", 3600), ("7200", 7200), ("999999", 86400)],
)
async def test_health_down(broker: FakeBroker, retry_after: str | None, wait: float) -> None:
    broker.health_status = 503
    if retry_after is not None:
        broker.health_headers = {"Retry-After": retry_after}
    async with client_for(broker) as client:
        health = await client.health()
    assert not health.healthy
    assert health.wait_s == wait
    assert "503" in health.detail


async def test_external_session_is_not_closed(broker: FakeBroker) -> None:
    import aiohttp

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        client = client_for(broker, session=session)
        await client.register(VALUE, PUBLIC)
        await client.close()
        assert not session.closed


async def test_health_down_with_http_date(broker: FakeBroker) -> None:
    broker.health_status = 503
    later = datetime.now(UTC) + timedelta(hours=5)
    broker.health_headers = {"Retry-After": format_datetime(later, usegmt=True)}
    async with client_for(broker) as client:
        health = await client.health()
    assert not health.healthy
    assert 5 * 3600 - 60 < health.wait_s <= 5 * 3600


# --- Retry-After dates on the engine's clock ---------------------------------------------------

# Far from the wall clock: a date Retry-After measured from the wall clock would read as years.
ENGINE_NOW = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)


def _http_date(moment: datetime) -> str:
    return format_datetime(moment, usegmt=True)


async def test_health_retry_after_date_is_measured_on_the_injected_clock(
    broker: FakeBroker,
) -> None:
    clock = ManualClock(ENGINE_NOW)
    broker.health_status = 503
    broker.health_headers = {"Retry-After": _http_date(ENGINE_NOW + timedelta(hours=5))}
    async with client_for(broker, now=clock.now) as client:
        health = await client.health()
    assert not health.healthy
    assert health.wait_s == 5 * 3600


@pytest.mark.parametrize("pre_auth", [False, True])
async def test_registration_retry_after_date_is_measured_on_the_injected_clock(
    broker: FakeBroker, pre_auth: bool
) -> None:
    clock = ManualClock(ENGINE_NOW)
    headers = {"Retry-After": _http_date(ENGINE_NOW + timedelta(minutes=2))}
    if pre_auth:  # the load balancer answers before the PeerID-auth handshake
        broker.pre_auth_status = 503
        broker.pre_auth_headers = headers
    else:  # the broker, after it
        broker.handler = respond(503, "busy", headers)
    async with client_for(broker, now=clock.now) as client:
        with pytest.raises(BrokerUnavailable) as info:
            await client.register(VALUE, PUBLIC)
    assert info.value.retry_after == 120


async def test_the_broker_adapter_hands_its_clock_to_its_clients(broker: FakeBroker) -> None:
    clock = ManualClock(ENGINE_NOW)
    broker.health_status = 503
    broker.health_headers = {"Retry-After": _http_date(ENGINE_NOW + timedelta(hours=3))}
    adapter = BrokerAdapter(
        identity=lambda _p: None, addresses=lambda _p: [], base_url=broker.url, clock=clock
    )
    try:
        health = await adapter.health()
    finally:
        await adapter.close()
    assert not health.healthy and health.wait_s == 3 * 3600
