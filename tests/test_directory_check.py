"""A --ca that is not an ACME server is refused with one line before any order is touched
(AcmeAdapter.check_directory, which AutoTLS.start runs); a CA that is merely down is not."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from autotls.adapters import AcmeAdapter
from autotls.fsm.errors import ConfigurationError
from tests.fakes.acme_server import FakeAcmeServer

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _text(status: int, body: str, kind: str, **headers: str) -> Answer:
    async def answer(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, content_type=kind, headers=headers)

    return answer


NOT_ACME: dict[str, tuple[Answer, str]] = {
    "html": (_text(200, "<html><body>Welcome</body></html>", "text/html"), "not valid JSON"),
    "invalid-json": (_text(200, '{"newOrder": ', "application/json"), "not valid JSON"),
    "json-array": (_text(200, '["newOrder"]', "application/json"), "list, not an object"),
    "no-newOrder": (
        _text(200, '{"newNonce": "a", "newAccount": "b"}', "application/json"),
        "newOrder",
    ),
    "404": (_text(404, "not found", "text/plain"), "HTTP 404"),
    "302": (_text(302, "", "text/plain", Location="https://elsewhere.example/"), "redirect"),
}


@pytest.fixture
async def server() -> AsyncIterator[tuple[list[Answer], str]]:
    answers: list[Answer] = []

    async def directory(request: web.Request) -> web.StreamResponse:
        return await answers[0](request)

    app = web.Application()
    app.router.add_get("/directory", directory)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield answers, f"http://127.0.0.1:{port}/directory"
    await runner.cleanup()


@pytest.mark.parametrize("case", list(NOT_ACME))
async def test_a_ca_that_is_not_acme_is_one_configuration_line(
    server: tuple[list[Answer], str], case: str
) -> None:
    answers, url = server
    answer, words = NOT_ACME[case]
    answers.append(answer)
    adapter = AcmeAdapter(url)
    try:
        with pytest.raises(ConfigurationError) as info:
            await adapter.check_directory()
    finally:
        await adapter.close()
    message = str(info.value)
    assert "\n" not in message and url in message and "not an ACME directory" in message
    assert words in message, message


async def test_a_ca_in_trouble_is_not_a_configuration_error(
    server: tuple[list[Answer], str], caplog: pytest.LogCaptureFixture
) -> None:
    answers, url = server
    answers.append(_text(503, "<html>maintenance</html>", "text/html", **{"Retry-After": "60"}))
    adapter = AcmeAdapter(url)
    try:
        with caplog.at_level(logging.WARNING, logger="autotls"):
            assert await adapter.check_directory() is None
    finally:
        await adapter.close()
    assert "in trouble now" in caplog.text or "not reachable now" in caplog.text


async def test_a_real_directory_passes_and_plaintext_http_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with FakeAcmeServer() as ca:
        adapter = AcmeAdapter(ca.directory_url)
        try:
            with caplog.at_level(logging.WARNING, logger="autotls"):
                directory = await adapter.check_directory()
        finally:
            await adapter.close()
    assert directory is not None and directory.new_order
    assert "plaintext http://" in caplog.text and "private test CA" in caplog.text
