"""A broker that answers like anything but a broker: every such answer is a classified broker
error at the port boundary (the real BrokerAdapter and BrokerClient, over HTTP), one WARNING
line with no traceback, and a retry with backoff -- never an "unexpected" error, and never
Failed for what a captive portal or a misrouted load balancer did."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import web

from autotls.adapters import BrokerAdapter
from autotls.broker import BrokerError, BrokerProtocolError
from autotls.fsm import operator
from autotls.fsm.clock import ManualClock
from autotls.fsm.errors import ErrorClass
from autotls.fsm.machine import State, Trigger
from autotls.fsm.ports import EngineSettings, Ports
from autotls.fsm.worker import Worker
from autotls.peerid import PrivateKey
from autotls.persistence.store import Store
from tests.fakes.ports import FakeCA, FakeDns, FakeInstaller

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def html_200(request: web.Request) -> web.StreamResponse:
    return web.Response(
        status=200, text="<html>Welcome to Airport Wi-Fi</html>", content_type="text/html"
    )


async def empty_204(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


async def truncated_200(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = 4096
    await response.prepare(request)
    await response.write(b'{"status": "o')
    assert request.transport is not None
    request.transport.close()  # the connection dies mid-body
    return response


async def html_502(request: web.Request) -> web.StreamResponse:
    return web.Response(
        status=502, text="<html><h1>502 Bad Gateway</h1></html>", content_type="text/html"
    )


async def json_500(request: web.Request) -> web.StreamResponse:
    return web.json_response({"error": "backend exploded", "code": 17}, status=500)


async def redirect_302(request: web.Request) -> web.StreamResponse:
    return web.Response(status=302, headers={"Location": "https://login.example/portal"})


@dataclass
class Probe:
    answer: Answer
    error: str  # the exception type the port raises
    words: str  # what the one line must say


PROBES = {
    "2xx-html-on-challenge": Probe(html_200, "BrokerProtocolError", "answered 200"),
    "204-on-challenge": Probe(empty_204, "BrokerProtocolError", "answered 204"),
    "truncated-200": Probe(truncated_200, "BrokerProtocolError", "answered 200"),
    "html-502": Probe(html_502, "BrokerUnavailable", "502"),
    "json-500-not-a-problem": Probe(json_500, "BrokerUnavailable", "500"),
    "redirect-302": Probe(redirect_302, "BrokerProtocolError", "redirect"),
}


@dataclass
class Rig:
    store: Store
    clock: ManualClock
    ca: FakeCA
    ports: Ports
    peer: str
    answer: list[Answer]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    answer: list[Answer] = []

    async def register(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await answer[0](request)

    async def health(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/v1/_acme-challenge", register)
    app.router.add_get("/v1/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    key = PrivateKey.generate()
    peer = key.peer_id.to_base36()
    clock = ManualClock()
    ca = FakeCA(clock)
    dns = FakeDns()
    broker = BrokerAdapter(
        identity=lambda p: key if p == peer else None,
        addresses=lambda _p: ["/ip4/1.2.3.4/tcp/4001"],
        base_url=f"http://127.0.0.1:{port}",
        timeout=5,
    )
    ports = Ports(
        acme=ca,
        broker=broker,
        dns=dns,
        installer=FakeInstaller(),
        clock=clock,
        settings=EngineSettings(),
        rng=random.Random(3),
    )
    store = await Store.open(f"sqlite:///{tmp_path / 'probe.db'}")
    try:
        yield Rig(store, clock, ca, ports, peer, answer)
    finally:
        await store.close()
        await broker.close()
        await runner.cleanup()


@pytest.mark.parametrize("name", list(PROBES))
async def test_a_broker_that_is_not_a_broker_is_retried_with_one_warning(
    rig: Rig, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = PROBES[name]
    rig.answer.append(probe.answer)
    order = await operator.create_order(
        rig.store, rig.peer, f"*.{rig.peer}.libp2p.direct", now=rig.clock.now()
    )
    worker = Worker(rig.store, rig.ports, worker_id="w")
    for _ in range(3):  # account key, account, newOrder intent
        await worker.run_once()
    assert (await rig.store.get_order(order.id)).state == State.REGISTERED.value
    await worker.run_once()  # newOrder, and its authorization: Challenged
    assert (await rig.store.get_order(order.id)).state == State.CHALLENGED.value
    caplog.clear()
    with caplog.at_level(logging.INFO):
        await worker.run_once()
    snap = await rig.store.get_order(order.id)
    assert (snap.state, snap.last_error_class) == (State.CHALLENGED.value, ErrorClass.TRANSIENT)
    assert snap.attempts == 1
    delay = snap.next_run_at - rig.clock.now()
    assert timedelta(seconds=1) <= delay <= timedelta(seconds=2), "jittered backoff, step 1"
    assert probe.words in (snap.last_error_message or ""), snap.last_error_message
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].exc_info is None and "Traceback" not in caplog.text
    assert probe.words in warnings[0].getMessage()
    assert "internal" not in warnings[0].getMessage()
    # The journal names the broker's exception class for the operator.
    errors = [j for j in await rig.store.journal(order.id) if j.kind == "error"]
    assert [(e.trigger, e.detail["error_class"]) for e in errors] == [
        (Trigger.RETRY_LATER, "transient")
    ]
    # Backoff grows while the broker keeps answering like that; the order never fails.
    rig.clock.set(snap.next_run_at)
    await worker.run_once()
    later = await rig.store.get_order(order.id)
    assert later.state == State.CHALLENGED.value and later.attempts == 2
    assert later.next_run_at - rig.clock.now() > timedelta(seconds=1)
    # What the port raised, as the adapter hands it to the engine.
    with pytest.raises(BrokerError) as info:
        await rig.ports.broker.register(rig.peer, str(snap.data["dns_value"]))
    assert type(info.value).__name__ == probe.error


def test_the_protocol_error_is_transient() -> None:
    assert BrokerProtocolError("x").error_class is ErrorClass.TRANSIENT
