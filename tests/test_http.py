"""The shared HTTP transport (autotls.http) against small servers on loopback: the observer sees
every exchange, answered or failed; size limits, truncated answers, timeouts and refused
connections become the four failure types, each carrying what did arrive; sessions are
owned or borrowed; CA files and Retry-After."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from autotls.adapters import AcmeAdapter, BrokerAdapter
from autotls.fsm.errors import ConfigurationError
from autotls.http import (
    DEFAULT_USER_AGENT,
    AnswerTooLarge,
    AnswerTruncated,
    ConnectionFailed,
    Exchange,
    HttpClient,
    HttpTransport,
    RequestTimedOut,
    UnusableCaFile,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def ok(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    return web.json_response(
        {"got": len(body), "agent": request.headers.get("User-Agent")},
        headers={"Retry-After": "Sun, 01 Mar 2026 12:00:30 GMT"},
    )


async def big(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"x" * 5000)


async def streamed(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for _ in range(10):
        await response.write(b"y" * 1000)
    await response.write_eof()
    return response


async def cut(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": "text/html"})
    response.content_length = 4096
    await response.prepare(request)
    await response.write(b"<html>Welcome")
    assert request.transport is not None
    request.transport.close()  # the connection dies inside the body
    return response


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await never.wait()  # the client gives up first; closing the server cancels this
        return web.Response()

    app = web.Application()
    routes: dict[str, Handler] = {"/ok": ok, "/big": big, "/streamed": streamed, "/cut": cut}
    routes["/hang"] = hang
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    yield test_server
    await test_server.close()


def url(server: TestServer, path: str) -> str:
    return str(server.make_url(path))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_every_exchange_passes_the_observer(server: TestServer) -> None:
    seen: list[Exchange] = []
    async with HttpTransport(observer=seen.append, max_body=1000) as http:
        answer = await http.request(
            "POST", url(server, "/ok"), request_class="greeting", body=b"hello"
        )
        with pytest.raises(AnswerTooLarge):
            await http.request("GET", url(server, "/big"), request_class="big")
        with pytest.raises(ConnectionFailed):
            await http.request("GET", f"http://127.0.0.1:{free_port()}/", request_class="gone")
    assert answer.status == 200 and answer.retry_after(lambda: NOW) == 30.0
    assert [(e.method, e.request_class, e.status) for e in seen] == [
        ("POST", "greeting", 200),
        ("GET", "big", 200),
        ("GET", "gone", None),
    ]
    first, too_large, refused = seen
    assert first.url == url(server, "/ok")
    assert first.request_headers["User-Agent"] == DEFAULT_USER_AGENT
    assert (first.request_size, first.response_size) == (5, len(answer.body))
    assert first.response_headers is not None and "Retry-After" in first.response_headers
    assert first.error is None and first.elapsed >= 0
    assert isinstance(too_large.error, AnswerTooLarge) and too_large.response_size == 0
    assert isinstance(refused.error, ConnectionFailed) and refused.response_headers is None
    assert http.request_count == 3


async def test_an_observer_that_fails_costs_nothing(
    server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(exchange: Exchange) -> None:
        raise RuntimeError("metrics are down")

    async with HttpTransport(observer=broken) as http:
        answer = await http.request("GET", url(server, "/ok"), request_class="greeting")
    assert answer.status == 200
    assert "HTTP observer failed on GET" in caplog.text


@pytest.mark.parametrize(
    ("path", "message", "kept"),
    [
        ("/big", "body of 5000 bytes exceeds the 1000-byte limit", 0),
        ("/streamed", "body exceeds the 1000-byte limit", 1000),
    ],
)
async def test_the_body_limit_keeps_the_head_and_at_most_the_limit(
    server: TestServer, path: str, message: str, kept: int
) -> None:
    async with HttpTransport(max_body=1000) as http:
        with pytest.raises(AnswerTooLarge, match=message) as caught:
            await http.request("GET", url(server, path), request_class="x")
    assert caught.value.answer.status == 200
    assert len(caught.value.answer.body) == kept


async def test_a_per_request_limit_overrides_the_transports(server: TestServer) -> None:
    async with HttpTransport(max_body=1000) as http:
        answer = await http.request(
            "GET", url(server, "/streamed"), request_class="x", limit=10_000
        )
    assert answer.body == b"y" * 10_000


async def test_a_truncated_answer_keeps_what_arrived(server: TestServer) -> None:
    seen: list[Exchange] = []
    async with HttpTransport(observer=seen.append) as http:
        with pytest.raises(AnswerTruncated) as caught:
            await http.request("GET", url(server, "/cut"), request_class="portal")
    assert caught.value.answer.status == 200
    assert caught.value.answer.headers["Content-Type"] == "text/html"
    # What arrived of the body, never more (aiohttp may drop a last chunk the close overtook).
    assert b"<html>Welcome".startswith(caught.value.answer.body)
    assert "failed: ClientPayloadError" in str(caught.value)
    assert [(e.status, e.response_body) for e in seen] == [(200, caught.value.answer.body)]


async def test_a_server_that_never_answers_times_out(server: TestServer) -> None:
    async with HttpTransport(timeout=0.3) as http:
        with pytest.raises(RequestTimedOut, match=r"GET .*/hang timed out after 0.3s") as caught:
            await http.request("GET", url(server, "/hang"), request_class="x")
    assert caught.value.reason == "timed out"


async def test_a_borrowed_session_stays_open_an_owned_one_is_remade(server: TestServer) -> None:
    async with aiohttp.ClientSession() as session:
        borrowed = HttpTransport(session=session, user_agent="embedder/1")
        answer = await borrowed.request("GET", url(server, "/ok"), request_class="x")
        assert b'"agent": "embedder/1"' in answer.body
        await borrowed.close()
        assert not session.closed
    owned = HttpTransport()
    await owned.request("GET", url(server, "/ok"), request_class="x")
    await owned.close()
    # Closed is not dead: the next request opens a new session (a client reused after close).
    assert (await owned.request("GET", url(server, "/ok"), request_class="x")).status == 200
    await owned.close()


def test_an_unusable_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for path in (tmp_path / "missing.pem", garbage):
        with pytest.raises(UnusableCaFile, match=r"CA file .* is unusable") as caught:
            HttpTransport(ca_file=path)
        assert isinstance(caught.value, ConfigurationError)
        assert isinstance(caught.value, ValueError)


async def test_a_client_takes_a_shared_transport_or_its_options_not_both() -> None:
    shared = HttpTransport()
    with pytest.raises(ConfigurationError, match="ca_file, timeout belong to the HTTP transport"):
        HttpClient(shared, ca_file="x.pem", timeout=3)
    client = HttpClient(shared)
    async with client:
        assert client.http is shared
    assert not client._owns_http
    own = HttpClient(None, timeout=3, user_agent="me/1")
    assert (own.http.timeout, own.http.user_agent) == (3, "me/1")


def test_the_adapters_name_the_server_whose_ca_file_is_unusable(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigurationError, match=r"^the ACME CA file .*missing\.pem"):
        AcmeAdapter("https://ca.test/dir", ca_file=missing)
    # At construction, before any order is touched (the health check's client is made then).
    with pytest.raises(ConfigurationError, match=r"^the broker CA file .*missing\.pem"):
        BrokerAdapter(identity=lambda _p: None, addresses=lambda _p: [], ca_file=missing)


async def test_a_cancelled_exchange_is_observed_too() -> None:
    entered, released = asyncio.Event(), asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        entered.set()
        await released.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/hang", hang)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    seen: list[Exchange] = []
    try:
        async with HttpTransport(observer=seen.append) as http:
            task = asyncio.ensure_future(
                http.request("GET", url(test_server, "/hang"), request_class="slow")
            )
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        released.set()
        await test_server.close()
    assert [(e.request_class, e.status, type(e.error)) for e in seen] == [
        ("slow", None, asyncio.CancelledError)
    ]
