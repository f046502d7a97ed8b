"""AcmeClient's transport against small hostile servers on loopback: size limits, timeouts
(including a TLS handshake that never completes), non-JSON and non-object bodies, missing
headers, unbounded badNonce, and the headers we send."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from autotls.acme import (
    AcmeClient,
    AcmeInputError,
    AcmeNetworkError,
    AcmeProtocolError,
    BadNonce,
    RateLimited,
    generate_account_key,
)
from autotls.acme.client import MAX_ERROR_RETRY_AFTER
from autotls.fsm.errors import ErrorClass

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[str, Handler]], Awaitable[TestServer]]]:
    servers: list[TestServer] = []

    async def start(routes: dict[str, Handler]) -> TestServer:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def directory_handler(server_ref: list[TestServer]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        base = str(server_ref[0].make_url(""))
        return web.json_response(
            {
                "newNonce": f"{base}/nonce",
                "newAccount": f"{base}/account",
                "newOrder": f"{base}/order",
                "revokeCert": f"{base}/revoke",
                "keyChange": f"{base}/kc",
            }
        )

    return handler


def client_for(server: TestServer, path: str = "/dir", **kwargs: object) -> AcmeClient:
    return AcmeClient(
        str(server.make_url(path)),
        generate_account_key(),
        now=lambda: NOW,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_body_over_the_limit_with_content_length(
    serve: Callable[..., Awaitable[TestServer]],
) -> None:
    async def big(request: web.Request) -> web.Response:
        return web.json_response({"pad": "x" * 5000})

    server = await serve({"/dir": big})
    async with client_for(server, max_body=1000) as client:
        with pytest.raises(AcmeProtocolError, match="exceeds the 1000-byte limit") as caught:
            await client.directory()
    assert caught.value.error_class is ErrorClass.TRANSIENT


async def test_body_over_the_limit_when_streamed(
    serve: Callable[..., Awaitable[TestServer]],
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"x" * 1000)
        await response.write_eof()
        return response

    server = await serve({"/dir": stream})
    async with client_for(server, max_body=10_000) as client:
        with pytest.raises(AcmeProtocolError, match="exceeds the 10000-byte limit"):
            await client.directory()


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"<html>hello</html>", "text/html", "directory is not valid JSON"),
        (b"[1, 2]", "application/json", "directory is a JSON list, not an object"),
        (b'{"newNonce": 1}', "application/json", "'newNonce' must be a non-empty string"),
        (b"[" * 50_000 + b"]" * 50_000, "application/json", "directory is not valid JSON"),
    ],
)
async def test_unusable_directories(
    serve: Callable[..., Awaitable[TestServer]], body: bytes, content_type: str, message: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    server = await serve({"/dir": handler})
    async with client_for(server) as client:
        with pytest.raises(AcmeProtocolError, match=message):
            await client.directory()


async def test_a_server_that_never_answers_times_out(
    serve: Callable[..., Awaitable[TestServer]],
) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    server = await serve({"/dir": hang})
    async with client_for(server, timeout=0.3) as client:
        with pytest.raises(AcmeNetworkError, match="timed out") as caught:
            await client.directory()
    assert caught.value.error_class is ErrorClass.TRANSIENT


async def test_a_tls_handshake_that_never_completes_is_a_transient_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep the TCP connection open, never speak TLS

    tcp = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        async with AcmeClient(
            f"https://127.0.0.1:{port}/dir", generate_account_key(), timeout=0.3
        ) as client:
            with pytest.raises(AcmeNetworkError, match="timed out") as caught:
                await client.directory()
        assert caught.value.error_class is ErrorClass.TRANSIENT
        assert accepted, "the client did connect"
    finally:
        for writer in accepted:
            writer.close()
        tcp.close()
        await tcp.wait_closed()


async def test_connection_refused_is_a_network_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now.
    async with AcmeClient(f"http://127.0.0.1:{port}/dir", generate_account_key()) as client:
        with pytest.raises(AcmeNetworkError, match="failed") as caught:
            await client.directory()
    assert caught.value.error_class is ErrorClass.TRANSIENT
    assert client.request_count == 1


async def test_503_page_with_http_date_retry_after(
    serve: Callable[..., Awaitable[TestServer]],
) -> None:
    async def down(request: web.Request) -> web.Response:
        return web.Response(
            status=503,
            text="<html>maintenance</html>",
            content_type="text/html",
            headers={"Retry-After": "Sun, 01 Mar 2026 12:10:00 GMT"},
        )

    server = await serve({"/dir": down})
    async with client_for(server) as client:
        with pytest.raises(AcmeNetworkError) as caught:
            await client.directory()
    assert (caught.value.status, caught.value.retry_after) == (503, 600.0)


async def test_absurd_retry_after_is_capped(serve: Callable[..., Awaitable[TestServer]]) -> None:
    async def limited(request: web.Request) -> web.Response:
        return web.json_response(
            {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "later"},
            status=429,
            headers={"Retry-After": str(10**12)},
        )

    server = await serve({"/dir": limited})
    async with client_for(server) as client:
        with pytest.raises(RateLimited) as caught:
            await client.directory()
    assert caught.value.retry_after == MAX_ERROR_RETRY_AFTER


async def test_new_nonce_without_replay_nonce(serve: Callable[..., Awaitable[TestServer]]) -> None:
    ref: list[TestServer] = []

    async def nonce(request: web.Request) -> web.Response:
        return web.Response(headers={"Replay-Nonce": "bad nonce with spaces"})

    server = await serve({"/dir": directory_handler(ref), "/nonce": nonce})
    ref.append(server)
    async with client_for(server) as client:
        with pytest.raises(AcmeProtocolError, match="without a usable Replay-Nonce"):
            await client.lookup_account()


async def test_bad_nonce_retries_are_bounded_and_use_the_errors_nonce(
    serve: Callable[..., Awaitable[TestServer]],
) -> None:
    ref: list[TestServer] = []
    seen_nonces: list[str] = []
    counter = iter(range(1000))

    async def nonce(request: web.Request) -> web.Response:
        return web.Response(headers={"Replay-Nonce": f"fromHead{next(counter)}"})

    async def account(request: web.Request) -> web.Response:
        body = await request.json()
        protected = json.loads(base64.urlsafe_b64decode(body["protected"] + "=="))
        seen_nonces.append(protected["nonce"])
        return web.json_response(
            {"type": "urn:ietf:params:acme:error:badNonce", "detail": "stale"},
            status=400,
            headers={"Replay-Nonce": f"fromError{next(counter)}"},
        )

    server = await serve({"/dir": directory_handler(ref), "/nonce": nonce, "/account": account})
    ref.append(server)
    async with client_for(server, bad_nonce_retries=3) as client:
        with pytest.raises(BadNonce):
            await client.lookup_account()
    assert len(seen_nonces) == 4
    assert seen_nonces[0].startswith("fromHead")
    assert all(n.startswith("fromError") for n in seen_nonces[1:])
    assert client.request_count == 1 + 1 + 4  # directory, newNonce, four POSTs


async def test_new_account_without_location(serve: Callable[..., Awaitable[TestServer]]) -> None:
    ref: list[TestServer] = []
    headers_seen: list[dict[str, str]] = []

    async def nonce(request: web.Request) -> web.Response:
        return web.Response(headers={"Replay-Nonce": "abc"})

    async def account(request: web.Request) -> web.Response:
        headers_seen.append(dict(request.headers))
        return web.json_response({"status": "valid"}, status=201, headers={"Replay-Nonce": "def"})

    server = await serve({"/dir": directory_handler(ref), "/nonce": nonce, "/account": account})
    ref.append(server)
    async with client_for(server, user_agent="autotls-test/1") as client:
        with pytest.raises(AcmeProtocolError, match="newAccount response has no Location header"):
            await client.new_account()
    assert headers_seen[0]["Content-Type"] == "application/jose+json"
    assert headers_seen[0]["User-Agent"] == "autotls-test/1"


async def test_bad_directory_url_is_rejected() -> None:
    with pytest.raises(AcmeInputError, match="http"):
        AcmeClient("ftp://ca.test/dir", generate_account_key())


def test_an_unusable_ca_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(AcmeInputError, match="CA file"):
        AcmeClient("https://ca.test/dir", generate_account_key(), ca_file=tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(AcmeInputError, match="CA file"):
        AcmeClient("https://ca.test/dir", generate_account_key(), ca_file=garbage)
